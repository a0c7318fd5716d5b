"""Whole black-box distillation runs: MEKD and the baselines it is compared with.

A black-box run sees the teacher only through its answers
(:mod:`hetkd.distill.teacher`): every method takes a teacher as a
:class:`~hetkd.distill.teacher.BlackBoxTeacher`, a model (wrapped into one),
or a responder callable with ``response=``, and may read unlabelled public
proxy inputs (:func:`~hetkd.distill.teacher.proxy_inputs`), never labels.
Settings come as :class:`~hetkd.distill.deprivatization.GanSettings` /
:class:`~hetkd.distill.emulation.DistillSettings` plus keyword overrides;
every run is deterministic given ``seed``, and every student update goes
through :func:`~hetkd.distill.emulation.kd_steps`.

* :func:`deprivatize` — MEKD step 1: train G against D on the proxy inputs
  and the teacher's answers (:class:`~hetkd.distill.deprivatization.Deprivatizer`);
  returns G frozen.
* :func:`distill` — MEKD step 2: distil the teacher into a student on fresh
  samples of G, asking the teacher every step, with the mapping-emulation
  loss (:mod:`hetkd.distill.emulation`).

The baselines take the same teacher, a student and the same
:class:`~hetkd.distill.emulation.DistillSettings` (same step budget, batch
size, SGD schedule and temperature as MEKD), and return the student trained
in place.

* :func:`kd_on_generated` — KD on G's samples, i.e. MEKD with ``w_f = 0``: the
  ablation that isolates the mapping-emulation term.
* :func:`kd_on_proxy` — Hinton KD on the real unlabelled proxy inputs: the
  teacher answers each proxy input once (a transfer set, as KnockoffNets
  builds it) and the student is fitted with ``T · KL`` for the same number of
  steps as MEKD. With ``response="hard"`` this is KD on proxy data with hard
  labels (the one-hot label stands in for the logits, as in MEKD).
* :func:`active_mixup` — Active Mixup (Wang et al., CVPR 2021, "Neural Networks
  Are More Productive Teachers Than Human Raters"; ``AM`` in the MEKD paper's
  comparison and reference code): start from the proxy transfer set, then in
  each round mix random proxy pairs ``w·x_i + (1-w)·x_j`` over a grid of
  ``w``, keep the mixes the *student* is least sure about (lowest maximum
  probability), ask the teacher about those only, add them to the transfer
  set and keep training. It fits our setting: it needs nothing but forward
  queries and spends them where the student is weakest.

  Simplifications with respect to the reference ``AM.py``: one SGD run whose
  step budget is split over the rounds (the reference retrains 200 epochs per
  round from the best checkpoint, chosen on the test set), random candidate
  pairs instead of all pairs, and the MEKD temperature-scaled KL in place of
  cross-entropy to soft targets.

Not implemented: DB3KD / ZSDB3KD (decision-based; they estimate boundary
distances with thousands of label queries per sample, far beyond a CPU
budget), DAFL and ML/AL (they need the teacher's features or gradients, or
train the teacher, which a black box forbids).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from hetkd.distill.deprivatization import Deprivatizer, GanSettings
from hetkd.distill.emulation import (
    DistillSettings,
    MappingEmulationDistiller,
    StepCallback,
    StudentOptimizer,
    freeze,
    kd_steps,
    transfer_batches,
)
from hetkd.distill.ensemble import teacher_logits
from hetkd.distill.generative import Generator
from hetkd.distill.losses import kd_kl
from hetkd.distill.teacher import BlackBoxTeacher, Responder, as_responder, proxy_inputs, query_teacher
from hetkd.settings import with_overrides
from hetkd.training import derive_seed, seeded

__all__ = [
    "METHODS",
    "progress_bar",
    "deprivatize",
    "distill",
    "kd_on_generated",
    "kd_on_proxy",
    "active_mixup",
    "mixup_candidates",
    "least_confident",
]

#: every black-box method the ``b2kd`` experiment can run: name -> what it is
METHODS: dict[str, str] = {
    "mekd": "MEKD: deprivatized generator + mapping-emulation loss",
    "kd_generated": "KD on generated inputs (MEKD with w_f = 0)",
    "kd_proxy": "KD on the real unlabelled proxy inputs",
    "active_mixup": "Active Mixup: proxy inputs + least-confident mixup queries",
}

#: the mixing weights Active Mixup tries for every pair (0.30, 0.34, ..., 0.70)
DEFAULT_MIX_WEIGHTS: tuple[float, ...] = tuple(round(0.30 + 0.04 * i, 2) for i in range(11))


# --------------------------------------------------------------------------- MEKD's two steps


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A transient ``rich`` progress bar; yields ``advance()`` (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)


def _num_classes(proxy_data: Any, teacher: Responder, inputs: torch.Tensor, kind: str) -> int:
    known = getattr(teacher, "num_classes", None) if isinstance(teacher, BlackBoxTeacher) else None
    if known:
        return int(known)
    if not isinstance(proxy_data, torch.Tensor) and getattr(proxy_data, "num_classes", None):
        return int(proxy_data.num_classes)
    return int(query_teacher(teacher, inputs[:2], kind).shape[1])


def deprivatize(
    teacher: Any,
    proxy_data: Any,
    *,
    response: str | None = None,
    settings: GanSettings | None = None,
    seed: int = 0,
    output_range: tuple[float, float] | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> Generator:
    """Train G (latent size = classes) on unlabelled proxy inputs and the teacher's answers; return it frozen.

    ``proxy_data``: a tensor, ``DataView`` or ``ArrayDataset`` of public inputs
    (labels, if any, are never read). ``settings`` / keyword ``overrides`` are
    :class:`~hetkd.distill.deprivatization.GanSettings` fields (``steps=``, ``batch_size=``,
    ``lr_generator=``, ``w_info=``...). Deterministic given ``seed``.
    """
    settings = with_overrides(GanSettings, settings, overrides)
    responder, kind = as_responder(teacher, response)
    inputs = proxy_inputs(proxy_data)
    with seeded("mekd-deprivatize", seed) as rng:
        classes = num_classes or _num_classes(proxy_data, responder, inputs, kind)
        trainer = Deprivatizer(inputs.shape[1:], classes, settings, seed=seed, output_range=output_range)
        batch = min(settings.batch_size, len(inputs))
        order, cursor = torch.randperm(len(inputs), generator=rng), 0
        with progress_bar(settings.steps, "deprivatization (G vs D)", progress) as advance:
            for step in range(settings.steps):
                if cursor + batch > len(order):
                    order, cursor = torch.randperm(len(inputs), generator=rng), 0
                real = inputs[order[cursor : cursor + batch]]
                cursor += batch
                d_loss = trainer.discriminator_step(real)
                metrics = trainer.generator_step(trainer.sample_latent(batch), responder, kind)
                if on_step is not None:
                    on_step(step, {"d_loss": d_loss, **metrics})
                advance()
    return freeze(trainer.generator)


def distill(
    teacher: Any,
    student: nn.Module,
    generator: Generator,
    *,
    response: str | None = None,
    settings: DistillSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> nn.Module:
    """Distil the black-box ``teacher`` into ``student`` on G's samples; returns ``student`` (trained in place).

    Each step draws ``batch_size`` inputs G(z), asks the teacher, and applies
    :func:`~hetkd.distill.emulation.mapping_emulation_loss`. ``settings`` / keyword ``overrides`` are
    :class:`~hetkd.distill.emulation.DistillSettings` fields (``steps=``, ``w_f=``, ``distance=``...);
    ``w_f=0`` is the KD-on-generated-inputs ablation. Deterministic given ``seed``.
    """
    settings = with_overrides(DistillSettings, settings, overrides)
    responder, kind = as_responder(teacher, response)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    with seeded("mekd-distill", seed):
        distiller = MappingEmulationDistiller(student, generator, settings, seed=seed)

        def next_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = distiller.sample_inputs()
            responses = query_teacher(responder, inputs, kind, distiller.num_classes)
            return inputs, distiller.targets(inputs, responses, kind)

        report = None if on_step is None else (
            lambda step, metrics: on_step(step, {**metrics, "lr": distiller.optimizer.scheduler.get_last_lr()[0]})
        )
        with progress_bar(settings.steps, "distillation", progress) as advance:
            kd_steps(distiller.optimizer, settings.steps, next_batch, distiller.loss, report, advance)
    student.eval()
    return student


# --------------------------------------------------------------------------- baselines


def kd_on_generated(
    teacher: Any,
    student: nn.Module,
    generator: Generator,
    *,
    response: str | None = None,
    settings: DistillSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> nn.Module:
    """KD on G's samples: :func:`distill` with ``w_f = 0``."""
    overrides["w_f"] = 0.0
    return distill(teacher, student, generator, response=response, settings=settings, seed=seed,
                   progress=progress, on_step=on_step, **overrides)


def _fit_transfer_set(
    optimizer: StudentOptimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    rng: torch.Generator,
    advance: Any,
    on_step: StepCallback | None,
) -> None:
    """``steps`` KD updates on random batches of a transfer set (inputs, teacher logits)."""
    s = optimizer.settings
    report = None if on_step is None else (
        lambda step, metrics: on_step(step, {**metrics, "transfer_set": float(len(inputs))})
    )
    kd_steps(optimizer, steps, transfer_batches(inputs, targets, s.batch_size, rng),
             lambda student_logits, t: kd_kl(student_logits, t, s.temperature, scale=s.temperature), report, advance)



def kd_on_proxy(
    teacher: Any,
    student: nn.Module,
    proxy_data: Any,
    *,
    response: str | None = None,
    settings: DistillSettings | None = None,
    seed: int = 0,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> nn.Module:
    """KD on real unlabelled proxy inputs: one teacher query per input, ``steps`` ``T·KL`` updates."""
    settings = with_overrides(DistillSettings, settings, overrides)
    responder, kind = as_responder(teacher, response)
    inputs = proxy_inputs(proxy_data)
    with seeded("kd-proxy", seed) as rng:
        targets = teacher_logits(query_teacher(responder, inputs, kind), kind, hard_margin=settings.hard_margin)
        optimizer = StudentOptimizer(student, settings)
        with progress_bar(settings.steps, "KD on proxy data", progress) as advance:
            _fit_transfer_set(optimizer, inputs, targets, settings.steps, rng, advance, on_step)
    student.eval()
    return student


def mixup_candidates(
    inputs: torch.Tensor, num_pairs: int, weights: Sequence[float], rng: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random pairs ``(i, j)``, ``i != j``, and their mixes for every weight.

    Returns ``(first, second, mixes)`` with ``mixes`` of shape
    ``(num_pairs, len(weights), *input_shape)``, ``mixes[p, k] = w_k x_i + (1 - w_k) x_j``.
    """
    if len(inputs) < 2:
        raise ValueError(f"mixup needs at least 2 inputs, got {len(inputs)}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    w = torch.as_tensor(list(weights), dtype=inputs.dtype)
    if w.dim() != 1 or len(w) == 0 or ((w < 0) | (w > 1)).any():
        raise ValueError(f"mix weights must be a non-empty list in [0, 1], got {list(weights)}")
    first = torch.randint(len(inputs), (num_pairs,), generator=rng)
    offset = torch.randint(1, len(inputs), (num_pairs,), generator=rng)
    second = (first + offset) % len(inputs)  # never equal to first
    shape = (1, -1) + (1,) * (inputs.dim() - 1)
    mixes = w.view(shape) * inputs[first].unsqueeze(1) + (1 - w.view(shape)) * inputs[second].unsqueeze(1)
    return first, second, mixes


def least_confident(probabilities: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For ``(pairs, weights, classes)`` probabilities: each pair's least-confident weight, and the
    ``count`` pairs whose best mix is least confident. Returns ``(pair indices, weight indices)``."""
    if probabilities.dim() != 3:
        raise ValueError(f"expected (pairs, weights, classes) probabilities, got shape {tuple(probabilities.shape)}")
    confidence = probabilities.max(2).values  # pairs x weights
    lowest, weight_idx = confidence.min(1)
    count = min(count, len(lowest))
    pairs = torch.argsort(lowest, stable=True)[:count]
    return pairs, weight_idx[pairs]


def active_mixup(
    teacher: Any,
    student: nn.Module,
    proxy_data: Any,
    *,
    response: str | None = None,
    settings: DistillSettings | None = None,
    seed: int = 0,
    rounds: int = 3,
    candidates: int = 2000,
    queries: int = 200,
    mix_weights: Sequence[float] = DEFAULT_MIX_WEIGHTS,
    progress: bool = False,
    on_step: StepCallback | None = None,
    **overrides: Any,
) -> nn.Module:
    """Active Mixup: KD on the proxy set, then ``rounds`` rounds of querying the
    ``queries`` least-confident of ``candidates`` mixup pairs and training on the
    grown transfer set. The ``steps`` budget is split evenly over ``rounds + 1`` phases."""
    settings = with_overrides(DistillSettings, settings, overrides)
    if rounds < 0 or candidates < 1 or not 1 <= queries <= candidates:
        raise ValueError(
            f"need rounds >= 0 and 1 <= queries <= candidates, got rounds={rounds}, "
            f"candidates={candidates}, queries={queries}"
        )
    responder, kind = as_responder(teacher, response)
    inputs = proxy_inputs(proxy_data)
    with seeded("active-mixup", seed) as rng:
        pair_rng = torch.Generator().manual_seed(derive_seed("active-mixup-pairs", seed))
        pool_x = inputs
        pool_t = teacher_logits(query_teacher(responder, inputs, kind), kind, hard_margin=settings.hard_margin)
        optimizer = StudentOptimizer(student, settings)
        phases = [settings.steps // (rounds + 1)] * (rounds + 1)
        phases[-1] += settings.steps - sum(phases)
        with progress_bar(settings.steps, "Active Mixup", progress) as advance:
            for phase, steps in enumerate(phases):
                if phase > 0:
                    first, second, mixes = mixup_candidates(inputs, candidates, mix_weights, pair_rng)
                    student.eval()
                    with torch.no_grad():
                        flat = mixes.flatten(0, 1)
                        probs = torch.cat([F.softmax(student(part), 1) for part in flat.split(1024)])
                    pairs, widx = least_confident(probs.view(len(mixes), len(mix_weights), -1), queries)
                    chosen = mixes[pairs, widx]
                    answers = teacher_logits(query_teacher(responder, chosen, kind, pool_t.shape[1]), kind,
                                             hard_margin=settings.hard_margin)
                    pool_x = torch.cat([pool_x, chosen])
                    pool_t = torch.cat([pool_t, answers])
                _fit_transfer_set(optimizer, pool_x, pool_t, steps, rng, advance, on_step)
    student.eval()
    return student
