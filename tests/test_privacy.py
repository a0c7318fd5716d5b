"""Differentially private devices (hetkd.privacy): DP-SGD steps, the per-device ledger, the budget,
the models DP-SGD refuses, and what a DP device sends."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from torch import nn
from torch.nn import functional as F

from hetkd import protocol as P
from hetkd.clients import DiskStateStore, make_client_app
from hetkd.clients.device import DistillClient
from hetkd.clients.handlers import train_round
from hetkd.config import ConfigError, resolve_config, to_yaml
from hetkd.data import build_federation
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.losses import KDTerm, KLLoss, ReferenceKD
from hetkd.models import build_model
from hetkd.models.zoo import ARCHITECTURES
from hetkd.privacy import (
    DeviceAccountant,
    PrivacyError,
    PrivacySettings,
    dp_step,
    dp_training,
    planned_steps,
    poisson_steps,
    private_model,
    public_step,
    unsupported_layers,
)
from hetkd.results import final_figures
from hetkd.simulations.compare import _markdown
from hetkd.simulations.experiment import prepare
from hetkd.simulations.registry import build_strategy
from hetkd.strategies import SDDist
from hetkd.training import TrainingConfig, cross_entropy_step
from tests.conftest import InProcessGrid, small_config

DP = ("privacy.enabled=true", "privacy.fix_layers=true", "training.local_epochs=1", "training.batch_size=16",
      "models.architectures=[mlp_s,cnn_s]")


def _device(tmp_path, *overrides, device_id=1):
    cfg = small_config(tmp_path, *DP, *overrides)
    return DistillClient.from_config(cfg, device_id), cfg


def _independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    return get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0]


# --------------------------------------------------------------------------- accounting


def test_epsilon_grows_each_round_and_matches_the_accountant_computed_here(tmp_path):
    client, cfg = _device(tmp_path, "privacy.noise_multiplier=1.3", "training.local_epochs=2")
    n = len(client.data.train)
    per_round = 2 * math.ceil(n / 16)
    reported = []
    for round_ in (1, 2, 3):
        metrics = client.fit(round_)
        reported.append(metrics["epsilon"])
        expected = _independent_epsilon(1.3, 16 / n, round_ * per_round, cfg.privacy.delta)
        assert metrics["epsilon"] == pytest.approx(expected, rel=1e-6)
        assert metrics["privacy_exhausted"] is False and math.isnan(metrics["train_loss"])  # the loss stays home
    assert reported[0] < reported[1] < reported[2]
    assert client.accountant.steps == 3 * per_round


def test_a_target_epsilon_calibrates_the_noise_for_the_planned_rounds(tmp_path):
    client, cfg = _device(tmp_path, "privacy.target_epsilon=4", "num-server-rounds=3")
    planned = planned_steps(num_train=len(client.data.train), batch_size=16, local_epochs=1, rounds=3)
    assert client.accountant.steps == 0 and client.accountant.epsilon() == 0.0
    assert client.accountant.epsilon(planned) == pytest.approx(4.0, rel=0.02)  # the plan ends at the target
    for round_ in (1, 2, 3):
        metrics = client.fit(round_)
    assert 3.5 < metrics["epsilon"] <= 4.0 + 1e-6
    # a planned bound: more models or steps per round make more noise
    assert planned_steps(num_train=90, batch_size=32, local_epochs=2, rounds=5, models=2) == 60
    assert planned_steps(num_train=90, batch_size=32, local_epochs=2, rounds=5, max_steps=4) == 20
    assert poisson_steps(90, 32) == 3 and poisson_steps(90, 32, min_steps=10) == 10


def test_a_device_that_would_exceed_its_budget_stops_training_and_says_so(tmp_path):
    client, _ = _device(tmp_path, "privacy.noise_multiplier=1.0")
    first = client.fit(1)["epsilon"]
    budget = first * 1.05  # room for less than a second round
    client.accountant.settings = PrivacySettings(enabled=True, noise_multiplier=1.0, max_epsilon=budget)
    before = copy.deepcopy(client.model.state_dict())
    metrics = client.fit(2)
    assert metrics["privacy_exhausted"] is True and metrics["samples_seen"] == 0
    assert metrics["epsilon"] == pytest.approx(first)  # nothing spent
    assert all(torch.equal(before[k], v) for k, v in client.model.state_dict().items())
    assert client.predict(client.reference_inputs()).shape[0] == len(client.reference)  # it still answers


def test_the_ledger_travels_with_the_device_state_and_refuses_other_settings(tmp_path):
    client, cfg = _device(tmp_path, "privacy.noise_multiplier=1.1")
    client.fit(1)
    state = client.state_dict()
    again = DistillClient.from_config(cfg, 1)
    again.load_state_dict(state)
    assert again.accountant.steps == client.accountant.steps and again.accountant.epsilon() == client.accountant.epsilon()
    other = DistillClient.from_config(small_config(tmp_path, *DP, "privacy.noise_multiplier=2.0"), 1)
    with pytest.raises(PrivacyError, match="noise_multiplier=1.1"):
        other.load_state_dict(state)
    plain = DistillClient.from_config(small_config(tmp_path, "models.architectures=[mlp_s,cnn_s]"), 1)
    plain.fit(1)
    with pytest.raises(PrivacyError, match="trained without privacy.enabled"):
        DistillClient.from_config(cfg, 1).load_state_dict(plain.state_dict())


def test_distillation_steps_beyond_the_private_ones_are_public_and_free(tmp_path, monkeypatch):
    client, _ = _device(tmp_path, "privacy.noise_multiplier=1.0")
    private_steps = math.ceil(len(client.data.train) / 16)
    public_calls = []
    public_loss = ReferenceKD.public_loss
    monkeypatch.setattr(ReferenceKD, "public_loss", lambda self, *a: public_calls.append(1) or public_loss(self, *a))
    targets = torch.randn(len(client.reference), 10)
    metrics = client.fit_towards(1, targets, KDTerm(rho=0.5, batch_size=8, min_steps=3 * private_steps),
                                 KLLoss(temperature=2.0, scale=1.0))
    assert client.accountant.steps == private_steps  # only the steps on private batches are counted
    assert len(public_calls) == 3 * private_steps  # min_steps adds distillation on public inputs only
    assert metrics["epsilon"] == pytest.approx(client.accountant.epsilon())


def test_with_rho_one_the_devices_model_reads_no_private_data_and_spends_nothing(tmp_path, monkeypatch):
    client, _ = _device(tmp_path, "privacy.noise_multiplier=1.0")
    drawn = []
    poisson = type(client.data.train).poisson_batches
    monkeypatch.setattr(type(client.data.train), "poisson_batches",
                        lambda self, *a, **k: (drawn.append(b) or b for b in poisson(self, *a, **k)))
    before = copy.deepcopy(client.model.state_dict())
    metrics = client.fit_towards(1, torch.randn(len(client.reference), 10), KDTerm(rho=1.0, batch_size=8, min_steps=4),
                                 KLLoss(temperature=2.0, scale=1.0))
    assert not drawn and client.accountant.steps == 0 and metrics["epsilon"] == 0.0
    assert metrics["samples_seen"] == 0
    assert any(not torch.equal(before[k], v) for k, v in client.model.state_dict().items())  # it learnt, publicly


@pytest.mark.parametrize(("strategy", "private_architecture"), [("fedmd", ""), ("sd-dist", ""), ("sd-dist", "linear")])
def test_private_answers_at_rho_one_spend_what_local_training_spends(tmp_path, strategy, private_architecture):
    """With answer_model=private and rho = 1 only the private model reads private data: the
    noise is planned for one model, every device's epsilon is what local-only training of
    that model costs, and the predictions sent are the private model's. A private model of
    its own architecture (models.private_architecture) trains from the first round, and the
    device's own model then never reads a private example."""
    common = (*DP, "privacy.target_epsilon=4", "reference.size=100", "num-server-rounds=3")
    cfg = small_config(tmp_path, *common, f"strategy={strategy}", "strategy.kd.answer_model=private",
                       "strategy.kd.rho=1", "strategy.kd.min_steps=2",
                       f"models.private_architecture={private_architecture!r}")
    grid = InProcessGrid(4)
    reports = []
    build_strategy(cfg, build_federation(cfg), to_yaml(cfg)).start(grid=grid, num_rounds=3,
                                                                 on_round_end=reports.append)
    local_cfg = small_config(tmp_path / "local", *common)
    local = [DistillClient.from_config(local_cfg, d) for d in range(4)]
    for round_ in (1, 2, 3):
        spent = [client.fit(round_)["epsilon"] for client in local]
    assert reports[-1].metrics["epsilon_max"] == pytest.approx(max(spent), rel=1e-9)
    assert reports[-1].metrics["epsilon_max"] <= 4.0 + 1e-6
    last = [t for t in grid.traffic if t.message.metadata.message_type == "train.reference_distill"][-4:]
    for t in last:
        request = P.ReferenceDistill.from_record(t.message.content)
        reply = P.ReferencePredictions.from_record(t.reply.content)
        assert request.answer_model == "private" and reply.distilled
        assert reply.private_train_loss is None and reply.epsilon > 0  # a DP device keeps its loss home
    if private_architecture:
        replies = [P.ReferencePredictions.from_record(t.reply.content) for t in grid.traffic
                   if t.message.metadata.message_type == "train.reference_distill"]
        assert all(r.samples_seen == 0 and r.private_train_seconds is not None for r in replies)


@pytest.mark.parametrize("rho", [1.0, 0.5])
def test_a_round_without_targets_leaves_a_rho_one_model_to_the_others_and_spends_one_models_steps(tmp_path, rho):
    """Once a device keeps a private answer model, a round in which no targets come (no teacher
    replied) trains that model on the private data; at rho = 1 the device's own model learns
    from the others only, so it is left as it is and the round costs one model's DP steps, as
    the budget plans. At rho < 1 the own model trains on its private data as well."""
    client, _ = _device(tmp_path, "privacy.noise_multiplier=1.0")
    kd = KDTerm(rho=rho, batch_size=8, min_steps=2)
    targets = torch.randn(len(client.reference), 10)
    train_round(client, 1, True, lambda: client.fit_towards(1, targets, kd, KLLoss(temperature=2.0, scale=1.0)), rho)
    one_model = math.ceil(len(client.data.train) / 16)  # DP steps of one model's epoch
    assert client.accountant.steps == (1 if rho == 1 else 2) * one_model
    own, private = (copy.deepcopy(m.state_dict()) for m in (client.model, client.private_model))
    spent = client.accountant.steps
    metrics = train_round(client, 2, True, None, rho)
    own_changed = any(not torch.equal(own[k], v) for k, v in client.model.state_dict().items())
    assert any(not torch.equal(private[k], v) for k, v in client.private_model.state_dict().items())
    if rho == 1:
        assert not own_changed and metrics["samples_seen"] == 0
        assert client.accountant.steps == spent + one_model
    else:
        assert own_changed and client.accountant.steps == spent + 2 * one_model
    assert metrics["epsilon"] == pytest.approx(client.accountant.epsilon())


# --------------------------------------------------------------------------- one DP-SGD step


def _linear(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def _ledger(**settings) -> DeviceAccountant:
    return DeviceAccountant(PrivacySettings(enabled=True, **settings), num_train=100, batch_size=8)


def test_without_noise_and_clipping_a_dp_step_is_the_plain_mean_gradient_step():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model, reference = _linear(), _linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with dp_training(model, optimizer, _ledger(noise_multiplier=1e-12, max_grad_norm=1e6),
                     noise_seed=0) as (dp_model, dp_optimizer):
        dp_step(dp_model, dp_optimizer, cross_entropy_step, x, y, weight=0.25)
    F.cross_entropy(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q.detach() - 0.5 * 0.25 * q.grad, atol=1e-6)
    assert not hasattr(dp_model._module, "_forward_hooks") or not dp_model._module._forward_hooks  # hooks gone


def test_each_example_is_clipped_and_an_empty_draw_still_adds_noise():
    x, y = 100 * torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with dp_training(model, optimizer, _ledger(noise_multiplier=1e-12, max_grad_norm=0.1),
                     noise_seed=0) as (dp_model, dp_optimizer):
        dp_step(dp_model, dp_optimizer, cross_entropy_step, x, y)
    moved = torch.cat([(p.detach() - s).flatten() for p, s in zip(model.parameters(), start)]).norm()
    assert 0 < moved <= 0.1 + 1e-6  # 8 examples, each at most 0.1, averaged over 8
    model = _linear()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with dp_training(model, optimizer, _ledger(noise_multiplier=1.0),
                     noise_seed=0) as (dp_model, dp_optimizer):
        dp_step(dp_model, dp_optimizer, cross_entropy_step, x[:0], y[:0])
    assert any(not torch.equal(p.detach(), s) for p, s in zip(model.parameters(), start))


def test_the_public_half_of_a_distillation_step_is_a_plain_step():
    inputs, targets = torch.randn(20, 4), torch.randn(20, 3)
    model, reference = _linear(), _linear()
    term = ReferenceKD(inputs, targets, 0.8, 5, KLLoss(temperature=2.0, scale=1.0), torch.Generator().manual_seed(3))
    same = ReferenceKD(inputs, targets, 0.8, 5, KLLoss(temperature=2.0, scale=1.0), torch.Generator().manual_seed(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    with dp_training(model, optimizer, _ledger(noise_multiplier=5.0),
                     noise_seed=0) as (dp_model, dp_optimizer):
        public_step(dp_model, dp_optimizer, term, torch.device("cpu"))
    same.public_loss(reference).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q.detach() - 0.5 * q.grad, atol=1e-6)  # no noise, no clipping


def test_poisson_batches_draw_each_example_independently(tmp_path):
    client, _ = _device(tmp_path)
    view, n = client.data.train, len(client.data.train)
    sizes = [len(y) for _, y in view.poisson_batches(8, 400, torch.Generator().manual_seed(0))]
    assert len(sizes) == 400 and len(set(sizes)) > 3
    assert sum(sizes) / 400 == pytest.approx(min(8, n), rel=0.15)
    assert 0 in [len(y) for _, y in view.poisson_batches(1, 200, torch.Generator().manual_seed(0))] or n > 40


# --------------------------------------------------------------------------- models


def test_a_layer_dp_sgd_cannot_train_is_refused_by_name(tmp_path):
    model = build_model("resnet8", (1, 8, 8), 10)
    layers = unsupported_layers(model)
    assert "features.1 (BatchNorm2d)" in layers
    with pytest.raises(PrivacyError, match=r"architecture 'resnet8'.*features\.1 \(BatchNorm2d\).*privacy\.fix_layers"):
        private_model(model, "resnet8", PrivacySettings(enabled=True))
    fixed = private_model(build_model("resnet8", (1, 8, 8), 10), "resnet8", PrivacySettings(enabled=True, fix_layers=True))
    assert unsupported_layers(fixed) == [] and any(isinstance(m, nn.GroupNorm) for m in fixed.modules())
    with pytest.raises(PrivacyError, match="'gru'.*gru \\(GRU\\)"):
        private_model(build_model("gru", (1, 40), 10), "gru", PrivacySettings(enabled=True))
    # the run refuses before any device starts, naming the key
    cfg = small_config(tmp_path, "privacy.enabled=true", "models.architectures=[mlp_s,resnet8]")
    with pytest.raises(ConfigError, match="privacy.fix_layers.*'resnet8'.*BatchNorm2d"):
        prepare(cfg)
    private = small_config(tmp_path, "privacy.enabled=true", "models.architectures=[mlp_s]",
                           "models.private_architecture=resnet8")  # the private answer model too
    with pytest.raises(ConfigError, match="privacy.fix_layers.*'resnet8'.*BatchNorm2d"):
        prepare(private)
    with pytest.raises(PrivacyError, match="'resnet8'"):
        DistillClient.from_config(private, 0)
    # a device built with its own model goes through the same check
    with pytest.raises(PrivacyError, match="'my-resnet'"):
        plain = DistillClient.from_config(small_config(tmp_path), 2)
        DistillClient(2, "my-resnet", build_model("resnet8", (1, 8, 8), 10), plain.data, plain.global_test,
                      plain.training, privacy=PrivacySettings(enabled=True))


def test_without_opacus_a_private_run_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "opacus", None)  # import opacus now raises ImportError
    with pytest.raises(ConfigError, match=r"privacy\.enabled.*pip install 'hetkd\[dp\]'"):
        prepare(small_config(tmp_path, *DP))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_the_zoo_marks_which_architectures_dp_sgd_trains_as_they_are(name):
    architecture = ARCHITECTURES[name]
    shape = (1, 40) if architecture.inputs == "signal" else (1, max(8, architecture.min_size), max(8, architecture.min_size))
    assert (unsupported_layers(build_model(name, shape, 10)) == []) == architecture.dp_compatible


def test_bad_privacy_settings_are_refused_naming_the_key():
    for override, key in [("privacy.delta=0", "privacy.delta"), ("privacy.max_grad_norm=0", "privacy.max_grad_norm"),
                          ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
                          ("privacy.accountant=gdpx", "privacy.accountant")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            resolve_config(None, [override])


# --------------------------------------------------------------------------- in a federation


@pytest.mark.parametrize("strategy", ["fedmd", "feddf"])
def test_a_dp_device_sends_its_predictions_and_its_epsilon_nothing_about_its_training(tmp_path, strategy):
    cfg = small_config(tmp_path, *DP, f"strategy={strategy}", "privacy.noise_multiplier=1.0", "reference.size=100",
                       "strategy.kd.min_steps=0", "strategy.ensemble.min_steps=0", "strategy.ensemble.warmup_rounds=1",
                       "strategy.ensemble.server_steps=2", "strategy.ensemble.num_queries=32", "num-server-rounds=3")
    grid = InProcessGrid(4)
    strategy_ = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy_.start(grid=grid, num_rounds=3, on_round_end=reports.append)
    trains = [t for t in grid.traffic if t.message.metadata.message_type.startswith("train.")]
    assert trains
    for t in trains:
        reply = (P.QueryAnswers if strategy == "feddf" else P.ReferencePredictions).from_record(t.reply.content)
        assert math.isnan(reply.train_loss) and reply.epsilon > 0 and reply.privacy_exhausted is False
        if strategy == "feddf":
            assert reply.private_train_loss is None
    for report in reports:
        assert report.metrics["epsilon_max"] >= report.metrics["epsilon_mean"] > 0
        assert report.metrics["privacy_exhausted_devices"] == 0
    assert reports[-1].metrics["epsilon_max"] > reports[0].metrics["epsilon_max"]
    final = final_figures([r.as_row() for r in reports])
    assert final["final_epsilon_max"] == pytest.approx(reports[-1].metrics["epsilon_max"])


def test_the_compare_table_shows_epsilon_only_for_dp_runs():
    def stat(mean):
        return {"mean": mean, "std": 0.0 if mean is not None else None, "values": [mean]}

    from hetkd.simulations.compare import FIGURES

    row = {key: stat(0.5) for key, _, _ in FIGURES}
    plain = {key: stat(None if "epsilon" in key or "honest" in key else 0.5) for key, _, _ in FIGURES}
    assert "ε, largest device" in _markdown({"fedmd": row}, [0]) and "0.50 ± 0.00" in _markdown({"fedmd": row}, [0])
    assert "ε" not in _markdown({"fedmd": plain}, [0])


def test_your_own_devices_answer_with_a_private_model_of_the_architecture_you_give(tmp_path):
    """make_client_app(private_model_fn=...): under DP at rho = 1 the user's linear model is the
    one that reads the private data (it is in each device's state), their own Net learns from
    the others only, and a private_model_fn that is not callable is refused naming it."""
    from tests.test_dropin import Net, _data

    app = make_client_app(lambda ctx: Net(), _data, num_classes=10, training=TrainingConfig(local_epochs=1),
                          state_dir=tmp_path, privacy=PrivacySettings(enabled=True, noise_multiplier=1.0),
                          private_model_fn=lambda ctx: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    exchange = ReferenceDistillSettings(answer_model="private", rho=1.0, min_steps=2)
    strategy, reports = SDDist(num_classes=10, num_devices=3, exchange=exchange), []
    strategy.start(grid=InProcessGrid(3, client_app=app), num_rounds=2, on_round_end=reports.append)
    assert reports[-1].metrics["epsilon_max"] > reports[0].metrics["epsilon_max"] > 0
    for device in range(3):
        state = DiskStateStore(tmp_path, device).load()
        assert {k: tuple(v.shape) for k, v in state["private_model"].items()} == {"1.weight": (10, 64), "1.bias": (10,)}
        assert state["model"].keys() == Net().state_dict().keys()
    with pytest.raises(TypeError, match="private_model_fn must be callable"):
        make_client_app(lambda ctx: Net(), _data, num_classes=10, private_model_fn="linear")


def test_your_own_devices_train_privately_and_a_batchnorm_model_is_refused_at_set_up():
    from tests.test_dropin import Net, _data

    class NormNet(Net):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))

    settings = PrivacySettings(enabled=True, noise_multiplier=1.0)
    private = make_client_app(lambda ctx: Net(), _data, num_classes=10, training=TrainingConfig(local_epochs=1),
                              privacy=settings)
    strategy, reports = SDDist(num_classes=10, num_devices=3), []
    strategy.start(grid=InProcessGrid(3, client_app=private), num_rounds=2, on_round_end=reports.append)
    assert reports[-1].metrics["epsilon_max"] > reports[0].metrics["epsilon_max"] > 0
    refused = make_client_app(lambda ctx: NormNet(), _data, num_classes=10, training=TrainingConfig(local_epochs=1),
                              privacy=settings)
    strategy, reports = SDDist(num_classes=10, num_devices=3, wait_for_devices=5), []
    strategy.start(grid=InProcessGrid(3, client_app=refused), num_rounds=1, on_round_end=reports.append)
    assert len(reports[0].failures) == 3
    assert all(f["phase"] == "setup" and "'NormNet'" in f["reason"] and "body.2 (BatchNorm1d)" in f["reason"]
               for f in reports[0].failures)
