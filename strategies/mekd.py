"""MEKD in place of weight averaging: source-blind generative distillation across devices.

Ma et al., "Aligning Logits Generatively for Principled Black-Box Knowledge
Distillation" (CVPR 2024), run federated: the devices' models are black-box
teachers, seen only through their answers; the server keeps a generator G
(latent size = number of classes), a discriminator D trained on its
unlabelled public proxy set, and a global student of any architecture.

1. **warm-up** (``warmup_rounds``): devices train on their private data.
2. **deprivatization** (``deprivatize_rounds``): each round the server sends G's
   weights and a seed (or the samples themselves, when they are the smaller
   payload); every device answers on ``G(z)`` for the round's
   ``steps x batch`` latent codes (soft probabilities or hard labels); the
   server runs that many D-then-G updates (:class:`~hetkd.distill.deprivatization.Deprivatizer`),
   each weighting G's information term by the ensemble's confidence on the
   corresponding batch. The answers describe G as it was when the round
   began, so within a round they lag G by at most ``steps`` updates (the
   price of one exchange per round instead of one per step). Then G is frozen.
   With ``reference_queries`` the last deprivatization round's query also
   starts with that many reference rows: the ensemble's answers on them teach
   the student that round and the devices the next, as in step 3, so
   distillation starts as early as FedDF's.
3. **distillation** (the remaining rounds): devices answer on a fresh batch of
   ``num_queries`` inputs, samples of the frozen G after ``reference_queries``
   reference rows, or reference rows only when ``reference_queries`` is
   ``num_queries`` (a seed travels, G's weights only once per device, and
   not at all when neither the queries nor the devices' loss need G); the
   server forms the ensemble (mean, or per device by similarity of the
   answers; corrected to a uniform class prior over G's samples and over the
   reference rows, each on its own, unless ``balance_classes=False``), distils its student with the mapping-emulation
   loss ``w_f · L1(G(s/T_g), G(t/T_g)) + w_kl · T · KL(t/T ‖ s/T)`` (G's term on G's samples
   alone, the reference rows on KL, with ``emulation_inputs="generated"``), and sends each
   device its targets, which it distils into its own architecture the same
   way beside its private cross-entropy (or with KL alone: ``device_loss="kl"``).

Only G's weights (or samples), seeds, answers on generated inputs and scalar
metrics cross the wire: devices never see the proxy set, the server never sees device data
or weights.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hetkd import protocol as P
from hetkd.distill.deprivatization import Deprivatizer
from hetkd.distill.emulation import EmulationLoss, MEKDSettings, freeze
from hetkd.distill.generative import Generator, default_output_range, default_width
from hetkd.distill.queries import GeneratorSpec, QuerySpec, query_latents, resolve_queries
from hetkd.models import state_bytes
from hetkd.strategies.base import Figures, RoundPlan
from hetkd.strategies.ensemble_distill import EnsembleDistill, EnsembleRound
from hetkd.training import derive_seed, seeded, to_cpu

__all__ = ["MEKD", "MEKDRound"]


@dataclass
class MEKDRound(EnsembleRound):
    """An MEKD round also remembers which version of G it sent to which device."""

    sent_versions: dict[int, int] = field(default_factory=dict)


class MEKD(EnsembleDistill):
    """MEKD as a Flower strategy (see the module docstring).

    Parameters
    ----------
    mekd : MEKDSettings | None
        What devices answer with (``response``), G and D's training (``gan``)
        and the distillation loss and student optimizer (``distill``); default:
        the run config's ``mekd`` defaults.
    input_shape : tuple[int, ...] | None
        Shape of one input (without the batch axis), for G and D (default:
        the public inputs').
    output_range : tuple[float, float] | None
        The range of G's outputs (default: by input kind, see
        :func:`hetkd.distill.generative.default_output_range`).
    **kwargs
        The arguments of :class:`~hetkd.strategies.EnsembleDistill`
        (``public_inputs`` is the proxy set D trains on; ``ensemble`` holds
        ``deprivatize_rounds``).
    """

    round_type = MEKDRound

    def __init__(
        self,
        *,
        mekd: MEKDSettings | None = None,
        input_shape: tuple[int, ...] | None = None,
        output_range: tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.mekd = mekd if mekd is not None else MEKDSettings()
        super().__init__(response=self.mekd.response, distill=self.mekd.distill, **kwargs)
        self.input_shape = tuple(int(d) for d in (input_shape or self.public_inputs.shape[1:]))
        if tuple(self.public_inputs.shape[1:]) != self.input_shape:
            raise ValueError(f"public_inputs have shape {tuple(self.public_inputs.shape[1:])}, "
                             f"input_shape is {self.input_shape}")
        self.gan = self.mekd.gan
        self.output_range = output_range
        self.deprivatizer = Deprivatizer(self.input_shape, self.num_classes, self.gan, seed=self.seed,
                                         output_range=output_range, device=self.torch_device)
        self.generator: Generator = self.deprivatizer.generator
        problem = self.mekd.reference_queries_problem(self.ensemble.num_queries, len(self.public_inputs))
        if problem:
            raise ValueError(f"mekd.reference_queries ({self.mekd.reference_queries}): {problem}")
        #: bumped whenever G's weights change; devices are sent the weights once per version
        self.generator_version = 0
        self._device_version: dict[int, int] = {}  # device id -> G version it acknowledged
        self._proxy_rng = torch.Generator().manual_seed(derive_seed(self.seed, "mekd-proxy"))
        self._proxy_order, self._proxy_cursor = torch.randperm(len(self.public_inputs), generator=self._proxy_rng), 0

    def settings(self) -> dict[str, Any]:
        return super().settings() | {"mekd": self.mekd}

    # ------------------------------------------------------------------ schedule

    def phase(self, server_round: int) -> str:
        e = self.ensemble
        if server_round <= e.warmup_rounds:
            return "warmup"
        if server_round <= e.warmup_rounds + e.deprivatize_rounds:
            return "deprivatize"
        return "distill"

    def gan_steps_per_round(self) -> int:
        return math.ceil(self.gan.steps / self.ensemble.deprivatize_rounds) if self.gan.steps else 0

    def last_deprivatization(self, server_round: int) -> bool:
        """Whether G is final after this round (the last deprivatization round)."""
        return self.phase(server_round) == "deprivatize" and self.phase(server_round + 1) != "deprivatize"

    def student_learns(self, server_round: int) -> bool:
        """The ``distill`` rounds and, with ``reference_queries``, the last deprivatization round: its
        query starts with the reference rows, so distillation starts as early as FedDF's."""
        return super().student_learns(server_round) or (
            self.mekd.reference_queries > 0 and self.last_deprivatization(server_round))

    def make_query(self, server_round: int, phase: str) -> QuerySpec | None:
        seed = derive_seed(self.seed, "mekd-query", server_round)
        if phase == "deprivatize":
            references = self.mekd.reference_queries if self.student_learns(server_round) else 0
            generated = self.gan_steps_per_round() * self.gan.batch_size
            if generated == 0:
                return QuerySpec(source="reference", seed=seed, count=references) if references else None
            return QuerySpec(source="generator", seed=seed, count=references + generated,
                             batch_size=self.gan.batch_size, train_mode=True, reference_count=references)
        if phase == "distill":
            if self.mekd.reference_queries == self.ensemble.num_queries:  # real rows only: G is in the loss
                return QuerySpec(source="reference", seed=seed, count=self.ensemble.num_queries)
            return QuerySpec(source="generator", seed=seed, count=self.ensemble.num_queries,
                             batch_size=self.gan.batch_size, train_mode=False,
                             reference_count=self.mekd.reference_queries)
        return None

    def emulation_loss(self) -> EmulationLoss:
        """The student's loss: with ``mekd.emulation_inputs = "generated"`` G's term on G's samples only."""
        return replace(self.distill.loss(), generated_only=self.mekd.emulation_inputs == "generated")

    def devices_loss(self) -> EmulationLoss:
        """The loss the devices distil with: the student's, or KL alone with ``mekd.device_loss = "kl"``."""
        loss = self.emulation_loss()
        return replace(loss, w_f=0.0) if self.mekd.device_loss == "kl" else loss

    def request(self, server_round: int, query: QuerySpec | None) -> P.EnsembleDistill:
        return replace(super().request(server_round, query), loss=self.devices_loss())

    def asks_about_reference_rows(self) -> bool:
        return self.mekd.reference_queries > 0

    def query_inputs(self, query: QuerySpec) -> torch.Tensor:
        return resolve_queries(query, generator=self.generator, reference_inputs=self.public_inputs)

    def loss_generator(self) -> nn.Module | None:
        return self.generator if not self.generator.training else None

    # ------------------------------------------------------------------ G on the wire

    def generator_spec(self) -> GeneratorSpec:
        """What a device needs to rebuild G before loading its weights, and which version."""
        low, high = self.output_range or default_output_range(self.input_shape)
        return GeneratorSpec(version=self.generator_version,
                             width=self.gan.generator_width or default_width(self.input_shape),
                             low=float(low), high=float(high))

    def generator_fields(self, device_id: int, plan: EnsembleRound, targets: bool) -> dict[str, Any]:
        """G's spec, and its weights unless the device acknowledged this version already; in
        deprivatization, G's samples instead when they are the smaller payload."""
        query = plan.query
        if not self.devices_need_generator(query, targets):
            return {}
        holds_g = self._device_version.get(device_id) == self.generator_version
        if query is not None and query.train_mode and not targets and not holds_g:
            # deprivatization: G changes every round; ship whichever is smaller, G or its samples
            inputs = plan.inputs
            assert inputs is not None
            if inputs.numel() * inputs.element_size() < state_bytes(self.generator):
                return {"query": replace(query, source="inputs", reference_count=0), "query_inputs": inputs.numpy()}
        spec = self.generator_spec()
        if holds_g:
            return {"generator": spec}
        assert isinstance(plan, MEKDRound)
        plan.sent_versions[device_id] = spec.version
        return {"generator": spec, "generator_weights": {k: v.detach().to("cpu", copy=True)
                                                         for k, v in self.generator.state_dict().items()}}

    def devices_need_generator(self, query: QuerySpec | None, targets: bool) -> bool:
        """Whether the devices need G this round: to draw the inputs of the query or of the targets
        they are sent, or for G's term in their loss (:meth:`devices_loss`), sent in any round with a
        query or targets (so with a query alone it arrives before the targets it will be needed for)."""
        drawn = [query, self.targets.query if targets and self.targets is not None else None]
        if any(q is not None and q.source == "generator" for q in drawn):
            return True
        return self.devices_loss().w_f > 0 and (query is not None or targets)

    def on_device_failed(self, device_id: int, reason: str, phase: str) -> None:
        """A device that failed may have lost its copy of G: send the weights again next time."""
        self._device_version.pop(device_id, None)

    def learn(self, server_round: int, plan: RoundPlan, replies: dict[int, P.Reply]) -> Figures:
        assert isinstance(plan, MEKDRound)
        for device in replies:  # valid replies: the device now holds the version it was sent
            if device in plan.sent_versions:
                self._device_version[device] = plan.sent_versions[device]
        figures = super().learn(server_round, plan, replies)
        self.finish_generator(server_round)  # also when nobody answered: G is final as it stands
        return figures

    def finish_generator(self, server_round: int) -> None:
        """After the last deprivatization round G is final (once): frozen, distillation uses its
        running statistics, and it is a new version for the devices."""
        if self.last_deprivatization(server_round) and self.generator.training:
            freeze(self.generator)
            self.generator_version += 1

    # ------------------------------------------------------------------ learning

    def _proxy_batch(self, size: int) -> torch.Tensor:
        if self._proxy_cursor + size > len(self._proxy_order):
            self._proxy_order = torch.randperm(len(self.public_inputs), generator=self._proxy_rng)
            self._proxy_cursor = 0
        idx = self._proxy_order[self._proxy_cursor : self._proxy_cursor + size]
        self._proxy_cursor += size
        return self.public_inputs[idx]

    def learn_answers(self, server_round: int, plan: EnsembleRound, device_ids: list[int],
                      answers: torch.Tensor) -> Figures:
        if plan.phase != "deprivatize":
            return super().learn_answers(server_round, plan, device_ids, answers)
        query, inputs = plan.query, plan.inputs
        assert query is not None and inputs is not None
        references = query.reference_row_count
        figures = Figures()
        if query.source == "generator":
            figures = self.learn_generator(server_round, query, answers[:, references:])
        self.finish_generator(server_round)
        if references:  # the reference rows teach the student (and the devices next round) with the final G
            rows = QuerySpec(source="reference", seed=query.seed, count=references, batch_size=query.batch_size)
            figures.add(self.learn_from_ensemble(server_round, rows, inputs[:references], device_ids,
                                                 answers[:, :references]))
        return figures

    def learn_generator(self, server_round: int, query: QuerySpec, answers: torch.Tensor) -> Figures:
        """One round of deprivatization: a D-then-G update per batch of the query's samples of G,
        on the ensemble of the devices' ``answers`` to them."""
        generated = replace(query, count=query.generated_count, reference_count=0)  # the answers are on these only
        ensemble, kind = self.mean_ensemble(generated, answers,
                                            self.screened(answers, self.answer_quality(generated, answers)))
        z = query_latents(query.seed, query.generated_count, self.num_classes)  # the codes behind the answers
        batch = min(query.batch_size, len(self.public_inputs))
        d_losses, g_losses = [], []
        with seeded(self.seed, "mekd-deprivatize", server_round):  # D's dropout: same seed, same G
            for z_k, answers_k in zip(z.split(query.batch_size), ensemble.split(query.batch_size)):
                d_losses.append(self.deprivatizer.discriminator_step(self._proxy_batch(batch)))
                g_losses.append(self.deprivatizer.generator_step(z_k, answers_k, kind)["g_loss"])
        self.generator_version += 1
        return Figures({"d_loss": sum(d_losses) / len(d_losses), "g_loss": sum(g_losses) / len(g_losses),
                        "gan_steps": len(g_losses)})

    # ------------------------------------------------------------------ checkpoints and outputs

    def state_dict(self) -> dict[str, Any]:
        """The student's state (:class:`EnsembleDistill`), G and D with their optimizers (on the CPU)
        and random streams, G's version and the proxy data's order (which devices hold which G is
        not kept: a resumed run's devices start without one)."""
        d = self.deprivatizer
        return super().state_dict() | to_cpu({
            "generator": d.generator.state_dict(), "discriminator": d.discriminator.state_dict(),
            "generator_optimizer": d.opt_g.state_dict(), "discriminator_optimizer": d.opt_d.state_dict(),
        }) | {
            "latent_rng": d.latent_rng.get_state(), "generator_frozen": not any(
                p.requires_grad for p in d.generator.parameters()),
            "generator_version": self.generator_version, "proxy_rng": self._proxy_rng.get_state(),
            "proxy_order": self._proxy_order, "proxy_cursor": self._proxy_cursor,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        d = self.deprivatizer
        d.generator.load_state_dict(state["generator"])
        d.discriminator.load_state_dict(state["discriminator"])
        d.opt_g.load_state_dict(state["generator_optimizer"])
        d.opt_d.load_state_dict(state["discriminator_optimizer"])
        d.latent_rng.set_state(state["latent_rng"])
        if state["generator_frozen"]:
            freeze(d.generator)
        self.generator_version = int(state["generator_version"])
        self._device_version.clear()
        self._proxy_rng.set_state(state["proxy_rng"])
        self._proxy_order, self._proxy_cursor = state["proxy_order"], int(state["proxy_cursor"])

    # ------------------------------------------------------------------ outputs

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """``student.pt``, ``generator.pt`` and ``samples.png`` (G's samples by the student's label)."""
        paths = super().write_artifacts(out_dir)
        path = out_dir / "generator.pt"
        spec = self.generator_spec()
        torch.save({"state_dict": to_cpu(self.generator.state_dict()), "input_shape": self.input_shape,
                    "generator-width": spec.width, "generator-low": spec.low, "generator-high": spec.high}, path)
        paths.append(path)
        if self.student is not None:
            from hetkd.plots import plot_generator_samples

            generator, student = self.generator, self.student
            if self.torch_device.type != "cpu":  # the plot samples on the CPU
                generator, student = copy.deepcopy(generator).cpu(), copy.deepcopy(student).cpu()
            paths.append(plot_generator_samples({"ensemble": generator}, student, self.num_classes,
                                                out_dir / "samples.png", title="G, labelled by the global student"))
        return paths
