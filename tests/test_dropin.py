"""Drop-in for a Flower user's own setup: their model as the global student, their run config's
training settings on the devices, ``result.arrays`` that means something, the reference size
learnt from the devices, and round logs without NaN."""

from __future__ import annotations

import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from sklearn.datasets import load_digits
from torch import nn

from hetkd.clients import DeviceDataset, DiskStateStore, make_client_app
from hetkd.clients.state import ContextStateStore
from hetkd.distill.ensemble import EnsembleSettings
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.strategies import MEKD, FedDF, LocalOnly, SDDist
from hetkd.training import TrainingConfig
from tests.conftest import InProcessGrid


class Net(nn.Module):
    """A user's model, unknown to hetkd's zoo."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    return torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0, torch.tensor(bunch.target)


X, Y = _digits()
PUBLIC, TEST = X[:200], (X[-300:], Y[-300:])


def _data(context: Context, reference_rows: int = 200, global_test: bool = True) -> DeviceDataset:
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    rows = list(range(200, len(Y) - 300))[pid::n]
    cut = int(0.8 * len(rows))
    return DeviceDataset(train=(X[rows[:cut]], Y[rows[:cut]]), test=(X[rows[cut:]], Y[rows[cut:]]),
                         reference=X[:reference_rows], global_test=TEST if global_test else None)


def _app(training: TrainingConfig | None = None, **kwargs):
    return make_client_app(lambda ctx: Net(), _data, num_classes=10,
                           training=training or TrainingConfig(local_epochs=1), **kwargs)


def _device_lr(grid: InProcessGrid, node: int) -> float:
    state = ContextStateStore(grid.contexts[node]).load()
    (lr,) = {group["lr"] for group in state["optimizer"]["param_groups"]}
    return lr


def test_the_run_configs_lr_reaches_the_devices_optimizer():
    """A Flower template's run config (``lr``, ``local-epochs``) and the ServerApp's ``train_config``
    decide a device's training; ``make_client_app``'s arguments are the defaults."""
    app = _app(TrainingConfig(local_epochs=1, lr=0.05))
    grid = InProcessGrid(2, client_app=app, run_config={"lr": 0.0123, "local-epochs": 2})
    LocalOnly(num_devices=2, wait_for_devices=5).start(grid=grid, num_rounds=1)
    assert [_device_lr(grid, n) for n in grid.node_ids] == [0.0123, 0.0123]
    # the ServerApp's train_config wins over the run config, round by round
    LocalOnly(num_devices=2, wait_for_devices=5).start(grid=grid, num_rounds=1, train_config=ConfigRecord({"lr": 0.2}))
    assert [_device_lr(grid, n) for n in grid.node_ids] == [0.2, 0.2]
    # without either, the device trains with what make_client_app was given
    plain = InProcessGrid(1, client_app=app)
    LocalOnly(num_devices=1, wait_for_devices=5).start(grid=plain, num_rounds=1)
    assert _device_lr(plain, plain.node_ids[0]) == 0.05


def test_feddf_trains_the_users_own_model_and_returns_it_in_result_arrays():
    """The quickstart's save line (``result.arrays.to_torch_state_dict()``) saves the trained student,
    which the user's own ``Net`` loads and which scores what the log printed."""
    grid = InProcessGrid(3, client_app=_app(TrainingConfig(local_epochs=3)))
    start = Net()
    initial = ArrayRecord(start.state_dict())
    strategy = FedDF(num_classes=10, public_inputs=PUBLIC, student=Net(), global_test=TEST, num_devices=3,
                     wait_for_devices=5, ensemble=EnsembleSettings(warmup_rounds=1, num_queries=200, server_steps=60))
    reports = []
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=4, on_round_end=reports.append)
    saved = Net()
    saved.load_state_dict(result.arrays.to_torch_state_dict())
    with torch.no_grad():
        accuracy = float((saved(TEST[0]).argmax(1) == TEST[1]).float().mean())
    assert accuracy == pytest.approx(reports[-1].metrics["student_accuracy"], abs=1e-6)
    assert accuracy > 0.5  # chance: 0.1
    first = {k: v for k, v in start.state_dict().items()}
    assert any(not torch.equal(first[k], v) for k, v in saved.state_dict().items()), "the student trained"


def test_initial_arrays_that_do_not_fit_the_student_are_refused_naming_it():
    strategy = FedDF(num_classes=10, public_inputs=PUBLIC, num_devices=1, wait_for_devices=5)  # the zoo's resnet8
    with pytest.raises(ValueError, match="initial_arrays do not fit the global student.*student="):
        strategy.start(grid=InProcessGrid(1, client_app=_app()), initial_arrays=ArrayRecord(Net().state_dict()),
                       num_rounds=3)


def test_without_a_global_model_result_arrays_is_empty_and_the_log_says_where_the_models_are(caplog, tmp_path):
    grid = InProcessGrid(2, client_app=_app(state_dir=tmp_path / "models"))
    strategy = SDDist(num_classes=10, num_devices=2, wait_for_devices=5,
                      exchange=ReferenceDistillSettings(warmup_rounds=0))
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=2)
    assert len(result.arrays) == 0, "an untrained initial model must not come back as the final one"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    (said,) = [m for m in warnings if "result.arrays" in m]
    assert "SDDist keeps no global model" in said and "state_dir" in said and "DiskStateStore" in said
    # ... and the personalised models are where it says
    weights = DiskStateStore(tmp_path / "models", 1).load()["model"]
    device = Net()
    device.load_state_dict(weights)
    assert strategy.num_reference == 200  # learnt from the devices' set-up replies


def test_a_device_with_another_reference_set_is_refused_naming_both_sizes():
    def data(context: Context) -> DeviceDataset:
        pid = int(context.node_config["partition-id"])
        return _data(context, reference_rows=150 if pid == 2 else 200)

    grid = InProcessGrid(3, client_app=make_client_app(lambda ctx: Net(), data, num_classes=10,
                                                       training=TrainingConfig(local_epochs=1)))
    strategy = SDDist(num_classes=10, num_devices=3, wait_for_devices=5)
    reports = []
    strategy.start(grid=grid, num_rounds=1, on_round_end=reports.append)
    (failure,) = reports[0].failures
    assert failure["device"] == 2 and failure["phase"] == "setup"
    assert "150 rows" in failure["reason"] and "200" in failure["reason"]
    assert sorted(d.device_id for d in strategy.devices.values()) == [0, 1]


def test_rounds_without_a_global_test_set_log_no_nan(caplog):
    app = make_client_app(lambda ctx: Net(), lambda ctx: _data(ctx, global_test=False), num_classes=10,
                          training=TrainingConfig(local_epochs=1))
    strategy = LocalOnly(num_devices=2, wait_for_devices=5)
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = strategy.start(grid=InProcessGrid(2, client_app=app), num_rounds=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert lines and all("nan" not in line for line in lines)
    assert "personalised_accuracy_mean" in lines[0] and "global" not in lines[0]
    metrics = result.evaluate_metrics_clientapp[1]
    assert "personalised-accuracy-mean" in metrics and not any(k.startswith("global") for k in metrics)


def test_devices_without_the_servers_reference_set_are_refused_when_queries_name_its_rows():
    """FedDF's queries, and MEKD's with ``reference_queries``, name reference rows by index: a device
    holding another set (or none) is refused at set-up, naming both sizes, instead of failing every round."""
    from hetkd.distill import MEKDSettings

    def data(context: Context) -> DeviceDataset:
        pid = int(context.node_config["partition-id"])
        return _data(context, reference_rows=150 if pid == 1 else 200)

    for strategy in (FedDF(num_classes=10, public_inputs=PUBLIC, student=Net(), num_devices=2, wait_for_devices=5),
                     MEKD(num_classes=10, public_inputs=PUBLIC, student=Net(), num_devices=2, wait_for_devices=5,
                          mekd=MEKDSettings(reference_queries=64))):
        grid = InProcessGrid(2, client_app=make_client_app(lambda ctx: Net(), data, num_classes=10,
                                                           training=TrainingConfig(local_epochs=1)))
        reports = []
        strategy.start(grid=grid, num_rounds=1, on_round_end=reports.append)
        (failure,) = reports[0].failures
        assert failure["device"] == 1 and failure["phase"] == "setup"
        assert "150 rows" in failure["reason"] and "200" in failure["reason"]
        assert [d.device_id for d in strategy.devices.values()] == [0]
    # MEKD asking about G's samples only needs no reference set on the devices
    plain = MEKD(num_classes=10, public_inputs=PUBLIC, student=Net(), num_devices=2, wait_for_devices=5)
    grid = InProcessGrid(2, client_app=make_client_app(lambda ctx: Net(), data, num_classes=10,
                                                       training=TrainingConfig(local_epochs=1)))
    reports = []
    plain.start(grid=grid, num_rounds=1, on_round_end=reports.append)
    assert not reports[0].failures
