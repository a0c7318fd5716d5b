"""MEKD core: generators, the mapping-emulation loss, the black-box contract, baselines, config."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from hetkd.config import ConfigError, HetkdConfig, resolve_config
from hetkd.data import load_dataset
from hetkd.distill.blackbox import (
    active_mixup,
    deprivatize,
    distill,
    kd_on_generated,
    kd_on_proxy,
    least_confident,
    mixup_candidates,
)
from hetkd.distill.deprivatization import Deprivatizer, GanSettings, discriminator_loss, generator_loss
from hetkd.distill.emulation import (
    DistillSettings,
    MappingEmulationDistiller,
    mapping_emulation_loss,
    mapping_emulation_terms,
)
from hetkd.distill.ensemble import (
    check_responses,
    combine_responses,
    label_smoothing_margin,
    responses_from_logits,
    teacher_confidence,
    teacher_logits,
)
from hetkd.distill.generative import make_discriminator, make_generator
from hetkd.distill.teacher import BlackBoxError, BlackBoxTeacher
from hetkd.models import ModelError, build_model
from hetkd.simulations.b2kd import B2KDRunConfig
from hetkd.training import evaluate_accuracy, make_optimizer, seeded, torch_threads, train_epoch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is fastest and avoids oversubscribing a shared CPU."""
    with torch_threads(1):
        yield

# --------------------------------------------------------------------------- generators


@pytest.mark.parametrize(
    "shape, default_range",
    [((1, 8, 8), (-1.0, 1.0)), ((1, 28, 28), (-1.0, 1.0)), ((3, 32, 32), (-1.0, 1.0)),
     ((1, 40), (-4.0, 4.0)), ((2, 30), (-4.0, 4.0)), ((20,), (-4.0, 4.0))],
)
def test_generator_and_discriminator_shapes_and_output_range(shape, default_range):
    torch.manual_seed(0)
    g = make_generator(shape, 10)
    d = make_discriminator(shape)
    assert g.latent_dim == 10 and g.output_shape == shape
    z = torch.randn(6, 10) * 50  # far outside N(0, I): the bounded output must still hold
    x = g(z)
    assert x.shape == (6, *shape)
    low, high = default_range
    assert x.min() >= low and x.max() <= high
    assert x.max() - x.min() > 0.1  # not a constant map
    assert d(x).shape == (6,)
    narrow = make_generator(shape, 3, output_range=(0.0, 0.5))
    y = narrow(torch.randn(4, 3) * 50)
    assert y.min() >= 0.0 and y.max() <= 0.5


@pytest.mark.parametrize("shape", [(1, 10, 10), (1, 3), (1, 2, 8, 8), ()])
def test_generator_rejects_unusable_shapes_naming_them(shape):
    with pytest.raises(ValueError, match="input_shape|divisible|length"):
        make_generator(shape, 10)


def test_generator_rejects_a_latent_of_the_wrong_size():
    g = make_generator((1, 8, 8), 10)
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        g(torch.randn(4, 9))
    with pytest.raises(ValueError, match="num_classes"):
        make_generator((1, 8, 8), 1)


# --------------------------------------------------------------------------- losses on hand-made tensors


def _softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_mapping_emulation_loss_matches_its_closed_form(distance):
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    t, t_g, w_f, w_kl = 2.0, 4.0, 0.7, 1.3
    weight = torch.tensor([[2.0, -1.0, 0.5], [1.0, 3.0, -2.0]])  # G(z) = z @ W: 2-D latent -> 3 "pixels"

    def generator(z):
        return z @ weight

    # by hand: the generated points and the KL with plain floats
    diffs = []
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        for k in range(3):
            diffs.append(sum((s_row[i] - t_row[i]) / t_g * weight[i, k].item() for i in range(2)))
    f = sum(abs(v) for v in diffs) / 6 if distance == "l1" else sum(v * v for v in diffs) / 6
    kl = sum(
        _kl(_softmax([v / t for v in t_row]), _softmax([v / t for v in s_row]))
        for s_row, t_row in zip(student.tolist(), teacher.tolist())
    ) / 2
    expected = w_f * f + w_kl * t * kl  # KL scaled by T, not T^2

    loss = mapping_emulation_loss(student, teacher, generator, temperature=t, generator_temperature=t_g,
                                  w_f=w_f, w_kl=w_kl, distance=distance)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    f_term, kl_term = mapping_emulation_terms(student, teacher, generator, temperature=t,
                                              generator_temperature=t_g, distance=distance)
    assert f_term.item() == pytest.approx(f, rel=1e-5) and kl_term.item() == pytest.approx(t * kl, rel=1e-5)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_w_f_zero_is_plain_kd_and_needs_no_generator():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    with_g = mapping_emulation_loss(s, t, lambda z: z * 3, w_f=0.0, temperature=3.0)
    without = mapping_emulation_loss(s, t, None, w_f=0.0, temperature=3.0)
    assert with_g.item() == pytest.approx(without.item())
    with pytest.raises(ValueError, match="generator"):
        mapping_emulation_loss(s, t, None, w_f=1.0)
    with pytest.raises(ValueError, match="distance"):
        mapping_emulation_loss(s, t, lambda z: z, distance="l3")


def test_gs_term_on_generated_rows_only_weighs_them_as_among_all_rows():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4)
    generated = torch.tensor([False, True, False, True, True, False])

    def generator(z):
        return torch.tanh(z * 2)

    f_all, kl_all = mapping_emulation_terms(s, t, generator, temperature=2.0, generator_temperature=1.0)
    f_gen, kl_gen = mapping_emulation_terms(s, t, generator, temperature=2.0, generator_temperature=1.0,
                                            generated=generated)
    f_sub, _ = mapping_emulation_terms(s[generated], t[generated], generator, temperature=2.0,
                                       generator_temperature=1.0)
    assert kl_gen.item() == pytest.approx(kl_all.item()), "KL stays on every row"
    assert f_gen.item() == pytest.approx(f_sub.item() * 3 / 6)
    every = mapping_emulation_terms(s, t, generator, generated=torch.ones(6, dtype=torch.bool))[0]
    assert every.item() == pytest.approx(mapping_emulation_terms(s, t, generator)[0].item())
    none, _ = mapping_emulation_terms(s, t, generator, generated=torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0.0
    # the real rows get no gradient from G's term: only KL moves them
    loss = mapping_emulation_loss(s, t, generator, w_kl=0.0, generated=generated)
    loss.backward()
    assert s.grad[~generated].abs().sum() == 0 and s.grad[generated].abs().sum() > 0
    for bad in (torch.ones(5, dtype=torch.bool), torch.ones(6)):
        with pytest.raises(ValueError, match="generated"):
            mapping_emulation_terms(s, t, generator, generated=bad)


def test_a_loss_bound_for_generated_rows_only_needs_the_mask():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.tensor([True, False, False, True])
    paper = DistillSettings(w_f=1.0).loss()
    assert not paper.generated_only, "the paper's loss: G's term on every row"
    every_row = paper.bind(torch.tanh)
    assert every_row(s, t, mask).item() == pytest.approx(every_row(s, t).item()), "the mask only counts when asked"
    bound = replace(paper, generated_only=True).bind(torch.tanh)
    assert bound(s, t, mask).item() == pytest.approx(
        mapping_emulation_loss(s, t, torch.tanh, generated=mask, temperature=5.0, generator_temperature=5.0).item())
    with pytest.raises(ValueError, match="generated"):
        bound(s, t)
    kl_only = replace(paper, generated_only=True, w_f=0.0).bind(None)
    assert kl_only(s, t).item() == pytest.approx(kl_only(s, t, mask).item())


def test_identical_logits_give_zero_loss_and_the_teacher_side_carries_no_gradient():
    s = torch.randn(3, 5, requires_grad=True)
    t = s.detach().clone().requires_grad_(True)
    loss = mapping_emulation_loss(s, t, lambda z: torch.tanh(z), distance="l2")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    (loss + (s * 0).sum()).backward()
    assert t.grad is None


def test_gan_losses_closed_form():
    zero = torch.zeros(4)
    assert discriminator_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    conf = torch.tensor([1.0, 0.5, 0.25, 0.0])
    adversarial, information = generator_loss(zero, conf)
    assert adversarial.item() == pytest.approx(math.log(2))
    assert information.item() == pytest.approx(math.log(2) * conf.mean().item())
    big = torch.full((4,), 30.0)  # D sure the fakes are real: G's losses vanish
    assert generator_loss(big, conf)[0].item() < 1e-10
    with pytest.raises(ValueError, match="confidence"):
        generator_loss(zero, torch.ones(3))


# --------------------------------------------------------------------------- responses


def test_hard_responses_are_one_hot_argmax_and_soft_ones_are_distributions():
    logits = torch.randn(32, 7)
    model = nn.Linear(7, 7)
    hard = BlackBoxTeacher(lambda x: x, "hard")(logits)
    assert hard.shape == (32, 7)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and (hard.sum(1) == 1).all()
    assert (hard.argmax(1) == logits.argmax(1)).all()
    soft = BlackBoxTeacher(model, "soft")(logits)
    assert torch.allclose(soft.sum(1), torch.ones(32)) and (soft >= 0).all()
    check_responses(hard, "hard")
    check_responses(soft, "soft")
    with pytest.raises(ValueError, match="one-hot"):
        check_responses(soft, "hard")
    with pytest.raises(ValueError, match="probability"):
        check_responses(logits, "soft")
    with pytest.raises(ValueError, match="NaN"):
        check_responses(torch.full((2, 3), float("nan")), "logits")
    with pytest.raises(ValueError, match="expected responses for 4 inputs"):
        check_responses(soft, "soft", batch_size=4)


def test_soft_responses_give_the_same_teacher_logits_as_raw_logits():
    logits = torch.randn(16, 10) * 3
    from_logits = teacher_logits(logits, "logits")
    from_soft = teacher_logits(responses_from_logits(logits, "soft"), "soft")
    assert torch.allclose(from_logits, from_soft, atol=1e-4)
    assert torch.allclose(from_logits.mean(1), torch.zeros(16), atol=1e-5)
    hard = responses_from_logits(logits, "hard")
    assert torch.equal(teacher_logits(hard, "hard"), hard)  # the one-hot stands in for the logits
    assert torch.equal(teacher_logits(hard, "hard", hard_margin=4.5), 4.5 * hard)
    with pytest.raises(ValueError, match="hard_margin must be > 0, got 0"):
        teacher_logits(hard, "hard", hard_margin=0)
    assert torch.equal(teacher_confidence(hard, "hard"), torch.ones(16))
    assert torch.allclose(teacher_confidence(logits, "logits"), torch.softmax(logits, 1).max(1).values)


def test_combine_responses_averages_probabilities_and_votes_hard_labels():
    a = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    b = torch.tensor([[0.5, 0.5], [0.6, 0.4]])
    mixed, kind = combine_responses([a, b], "soft", weights=[3, 1])
    assert kind == "soft" and torch.allclose(mixed, (3 * a + b) / 4)
    votes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 1.0]])]
    assert combine_responses(votes, "hard")[0].tolist() == [[0.0, 1.0]]
    assert combine_responses(votes, "hard", weights=[5, 1, 1])[0].tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="shape"):
        combine_responses([a, torch.ones(3, 2) / 2], "soft")


# --------------------------------------------------------------------------- the black-box contract


class ForwardOnlyTeacher:
    """A teacher that records every call's grad mode and fails on anything but a forward call."""

    def __init__(self, in_features: int, num_classes: int = 10) -> None:
        gen = torch.Generator().manual_seed(0)
        object.__setattr__(self, "_w", torch.randn(in_features, num_classes, generator=gen))
        object.__setattr__(self, "grad_modes", [])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled() or x.requires_grad)
        return x.flatten(1) @ self._w

    def __getattr__(self, name: str):
        raise AssertionError(f"the teacher was asked for '{name}'")


def test_black_box_teacher_refuses_everything_but_a_forward_call():
    model = nn.Linear(4, 3)
    teacher = BlackBoxTeacher(model, "soft")
    out = teacher(torch.randn(5, 4))
    assert out.shape == (5, 3) and teacher.queries == 5 and not out.requires_grad
    for name in ("parameters", "state_dict", "weight", "grad", "model", "named_parameters", "_forward"):
        with pytest.raises(BlackBoxError, match="forward queries only"):
            getattr(teacher, name)
    assert not hasattr(teacher, "parameters")
    assert not any(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="float input batches"):
        teacher(torch.ones(3, dtype=torch.long))


def test_every_method_calls_the_teacher_only_under_no_grad():
    proxy = torch.rand(40, 1, 8, 8) * 2 - 1
    spy = ForwardOnlyTeacher(64)
    wrapped = BlackBoxTeacher(spy, "soft")
    g = deprivatize(wrapped, proxy, steps=3, batch_size=8, seed=0)
    student = build_model("mlp_s", (1, 8, 8), 10)
    distill(wrapped, student, g, steps=3, batch_size=8)
    kd_on_generated(wrapped, student, g, steps=2, batch_size=8)
    kd_on_proxy(wrapped, student, proxy, steps=2, batch_size=8)
    active_mixup(wrapped, student, proxy, steps=4, batch_size=8, rounds=1, candidates=10, queries=4)
    # a bare responder (what a strategy passes: answers collected from devices) is called the same way
    raw = ForwardOnlyTeacher(64)
    distill(lambda x: torch.softmax(raw(x), 1), student, g, response="soft", steps=2, batch_size=8)
    assert len(spy.grad_modes) > 10 and not any(spy.grad_modes)
    assert len(raw.grad_modes) == 2 and not any(raw.grad_modes)
    with pytest.raises(ValueError, match="response="):
        distill(raw, student, g, steps=1, batch_size=8)


def test_step_classes_accept_responses_collected_elsewhere():
    proxy = torch.rand(16, 1, 8, 8) * 2 - 1
    spy = ForwardOnlyTeacher(64)
    dep = Deprivatizer((1, 8, 8), 10, GanSettings(batch_size=8), seed=1)
    z = dep.sample_latent(8)
    with torch.no_grad():
        answers = torch.softmax(spy(dep.generator(z)), 1)  # "sent out", answered, returned
    dep.discriminator_step(proxy[:8])
    metrics = dep.generator_step(z, answers, "soft")
    assert set(metrics) == {"g_loss", "g_adversarial", "g_information"}
    distiller = MappingEmulationDistiller(build_model("mlp_s", (1, 8, 8), 10), dep.generator,
                                          DistillSettings(batch_size=8))
    x = distiller.sample_inputs()
    loss = distiller.step(x, responses_from_logits(spy(x), "hard"), "hard")
    assert math.isfinite(loss)
    with pytest.raises(ValueError, match="expected responses for 8"):
        distiller.step(x, torch.ones(7, 10) / 10, "soft")


# --------------------------------------------------------------------------- settings and determinism


def test_settings_reject_bad_values_naming_them():
    with pytest.raises(ValueError, match="distance"):
        DistillSettings(distance="l3")
    with pytest.raises(ValueError, match="milestones"):
        DistillSettings(milestones=(0.7, 0.3))
    with pytest.raises(ValueError, match="'w_kl': w_f and w_kl cannot both be 0"):
        DistillSettings(w_f=0.0, w_kl=0.0)
    with pytest.raises(ValueError, match="lr_discriminator"):
        GanSettings(lr_discriminator=0.0)
    g = make_generator((1, 8, 8), 10)
    with pytest.raises(TypeError, match="stepz"):
        distill(nn.Linear(64, 10), build_model("mlp_s", (1, 8, 8), 10), g, stepz=3)
    with pytest.raises(ValueError, match="response"):
        BlackBoxTeacher(nn.Linear(2, 2), "medium")


def _state(module: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in module.state_dict().values()]


def test_deprivatization_and_distillation_are_deterministic_under_a_seed():
    proxy = torch.rand(32, 1, 8, 8) * 2 - 1
    teacher = BlackBoxTeacher(ForwardOnlyTeacher(64), "hard")
    g1 = deprivatize(teacher, proxy, steps=5, batch_size=8, seed=7)
    g2 = deprivatize(teacher, proxy, steps=5, batch_size=8, seed=7)
    g3 = deprivatize(teacher, proxy, steps=5, batch_size=8, seed=8)
    assert all(torch.equal(a, b) for a, b in zip(_state(g1), _state(g2)))
    assert not all(torch.equal(a, b) for a, b in zip(_state(g1), _state(g3)))
    students = []
    for seed in (3, 3, 4):
        with seeded("student", 0):
            s = build_model("cnn_s", (1, 8, 8), 10)
        students.append(distill(teacher, s, g1, steps=4, batch_size=8, seed=seed))
    assert all(torch.equal(a, b) for a, b in zip(_state(students[0]), _state(students[1])))
    assert not all(torch.equal(a, b) for a, b in zip(_state(students[0]), _state(students[2])))


# --------------------------------------------------------------------------- end to end on digits


@pytest.fixture(scope="module")
def digits_teacher():
    """A ResNet-8 trained on 1000 digits; 400 other digits as proxy; 397 for testing."""
    ds = load_dataset("digits")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).numpy()
    train, proxy, test = ds.view(order[:1000]), ds.view(order[1000:1400]), ds.view(order[1400:])
    with seeded("test-teacher", 0) as rng:
        teacher = build_model("resnet8", ds.input_shape, 10)
        cfg = resolve_config(None, ["training.lr=0.05"]).training
        optimizer = make_optimizer(teacher, cfg)
        for _ in range(10):
            train_epoch(teacher, optimizer, train.batches(64, True, rng))
    return teacher.eval(), proxy, test


def test_mekd_end_to_end_beats_a_random_student_by_a_wide_margin(digits_teacher):
    teacher, proxy, test = digits_teacher
    teacher_acc = evaluate_accuracy(teacher, test.batches(512))[0]
    assert teacher_acc > 0.9
    oracle = BlackBoxTeacher(teacher, "soft")
    g = deprivatize(oracle, proxy, steps=400, seed=0)
    with seeded("e2e-student", 0):
        student = build_model("mobilenet_s", (1, 8, 8), 10)
    untrained = evaluate_accuracy(student, test.batches(512))[0]
    distill(oracle, student, g, steps=300, batch_size=64, seed=0)
    acc = evaluate_accuracy(student, test.batches(512))[0]
    assert acc > untrained + 0.4 and acc > 0.6, (untrained, acc, teacher_acc)
    assert oracle.queries == 400 * 64 + 300 * 64


# --------------------------------------------------------------------------- baselines' pieces


def test_mixup_candidates_mix_distinct_pairs_by_each_weight():
    x = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 2, 2).clone()
    first, second, mixes = mixup_candidates(x, 50, [0.25, 0.5], torch.Generator().manual_seed(0))
    assert mixes.shape == (50, 2, 1, 2, 2) and (first != second).all()
    expected = 0.25 * first.float() + 0.75 * second.float()
    assert torch.allclose(mixes[:, 0, 0, 0, 0], expected)


def test_least_confident_picks_the_most_uncertain_pairs_and_weights():
    probs = torch.tensor([
        [[0.9, 0.1], [0.6, 0.4]],    # pair 0: best mix has max prob 0.6 (weight 1)
        [[0.55, 0.45], [0.8, 0.2]],  # pair 1: 0.55 (weight 0)
        [[1.0, 0.0], [0.99, 0.01]],  # pair 2: 0.99
    ])
    pairs, weights = least_confident(probs, 2)
    assert pairs.tolist() == [1, 0] and weights.tolist() == [0, 1]


# --------------------------------------------------------------------------- config and the command


@pytest.mark.parametrize(
    "override, key",
    [("mekd.response=medium", "mekd.response"), ("mekd.device_loss=l2", "mekd.device_loss"),
     ("mekd.emulation_inputs=rows", "mekd.emulation_inputs"),
     ("mekd.distill.distance=l3", "mekd.distill.distance"),
     ("mekd.distill.temperature=0", "mekd.distill.temperature"),
     ("mekd.distill.milestones=[0.7,0.3]", "mekd.distill.milestones"),
     ("mekd.gan.batch_size=1", "mekd.gan.batch_size"), ("b2kd.methods=[mekd,dfme]", "b2kd.methods[1]"),
     ("b2kd.responses=[soft,soft]", "b2kd.responses"), ("b2kd.seeds=[]", "b2kd.seeds"),
     ("b2kd.mixup_queries=5000", "b2kd.mixup_queries")],
)
def test_config_validation_names_the_key(override, key):
    schema = B2KDRunConfig if override.startswith("b2kd.") else HetkdConfig  # b2kd.* belongs to `hetkd b2kd`
    with pytest.raises(ConfigError) as err:
        resolve_config(None, [override], schema=schema)
    assert err.value.key == key and key in str(err.value)


def test_config_rejects_unknown_architectures_and_lists_choices():
    with pytest.raises(ModelError, match="b2kd.teacher.*valid choices"):
        resolve_config(None, ["b2kd.teacher=resnet99"], schema=B2KDRunConfig)
    with pytest.raises(ConfigError, match="valid choices: active_mixup, kd_generated, kd_proxy, mekd"):
        resolve_config(None, ["b2kd.methods=[mekd,dfme]"], schema=B2KDRunConfig)


def test_b2kd_command_writes_its_files_with_disjoint_data(tmp_path):
    from hetkd.simulations.b2kd import b2kd_data
    from hetkd.simulations.cli import main

    config = str(ROOT / "configs" / "experiments" / "b2kd_digits.yaml")
    out, again = tmp_path / "run", tmp_path / "again"
    args = [config, "b2kd.seeds=[0]", "b2kd.methods=[mekd,kd_proxy]", "b2kd.responses=[hard]",
            "b2kd.teacher=cnn_s", "b2kd.student=mlp_s", "b2kd.teacher_epochs=1", "mekd.gan.steps=5",
            "mekd.distill.steps=5", "output.progress=false"]
    assert main(["b2kd", *args, "--out", str(out)]) == 0
    report = json.loads((out / "b2kd.json").read_text())
    assert {"b2kd.md", "samples.png", "teacher.pt", "config.yaml"} <= {p.name for p in out.iterdir()}
    runs = report["runs"]
    assert {(r["method"], r["response"]) for r in runs} == {("mekd", "hard"), ("kd_proxy", "hard")}
    assert all(r["ratio"] == pytest.approx(r["accuracy"] / report["teacher"]["accuracy"]) for r in runs)
    assert report["methods"]["mekd"]["hard"]["accuracy"]["values"] == [runs[0]["accuracy"]]
    assert "| mekd |" in (out / "b2kd.md").read_text()
    data = b2kd_data(resolve_config(config, schema=B2KDRunConfig))
    teacher_idx, proxy_idx = set(data.teacher_train.indices), set(data.proxy.indices)
    assert not teacher_idx & proxy_idx and not (teacher_idx | proxy_idx) & set(data.test.indices)
    # reloading the saved teacher skips training and gives the same teacher accuracy
    assert main(["b2kd", *args, f"b2kd.teacher_path={out / 'teacher.pt'}", "--out", str(again)]) == 0
    reloaded = json.loads((again / "b2kd.json").read_text())
    assert reloaded["teacher"]["accuracy"] == report["teacher"]["accuracy"]
    assert main(["b2kd", *args, "b2kd.teacher_path=/nonexistent/teacher.pt", "--out", str(again)]) == 2


def test_label_smoothing_margin_is_the_smoothed_labels_logit_gap():
    margin = label_smoothing_margin(0.1, 10)
    assert margin == pytest.approx(4.51, abs=0.01)
    probs = torch.softmax(margin * torch.eye(10)[:1], 1)[0]
    assert probs[0].item() == pytest.approx(1 - 0.1 + 0.1 / 10, abs=1e-6)  # the label keeps 1 - eps + eps/C
    assert probs[1:].sum().item() == pytest.approx(0.9 * 0.1, abs=1e-6)  # each other class eps/C
    with pytest.raises(ValueError, match="smoothing must be in"):
        label_smoothing_margin(0.0, 10)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        label_smoothing_margin(0.1, 1)
