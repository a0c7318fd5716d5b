"""Plugging hetkd into Flower code of one's own: node configs, own models and data, drop-in strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hetkd import protocol as P
from hetkd.clients import DeviceDataset, NodeConfigError, make_client_app, parse_node_config
from hetkd.config import TrainingConfig, to_yaml
from hetkd.data import build_federation
from hetkd.distill.deprivatization import GanSettings
from hetkd.distill.emulation import MEKDSettings
from hetkd.distill.ensemble import EnsembleSettings
from hetkd.distill.exchange import ReferenceDistillSettings
from hetkd.distill.similarity import NeighbourSearch
from hetkd.simulations.registry import build_strategy
from hetkd.strategies import MEKD, SDDist
from tests.conftest import InProcessGrid, small_config

# --------------------------------------------------------------------------- node config


@pytest.mark.parametrize(
    "node_config, key",
    [
        ({}, "partition-id"),
        ({"partition-id": "two"}, "partition-id"),
        ({"partition-id": 7}, "partition-id"),
        ({"partition-id": 0, "num-partitions": "many"}, "num-partitions"),
        ({"partiton-id": 0}, "partiton-id"),
        ({"partition-id": 0, "model": 3}, "model"),
        ({"partition-id": 0, "state-dir": ""}, "state-dir"),
    ],
)
def test_malformed_node_config_is_rejected_naming_the_key(node_config, key):
    with pytest.raises(NodeConfigError) as info:
        parse_node_config(node_config, num_devices=4)
    assert info.value.key == key and f"'{key}'" in str(info.value)


def test_node_config_typo_gets_a_suggestion_and_good_configs_parse(tmp_path):
    with pytest.raises(NodeConfigError, match="did you mean 'partition-id'"):
        parse_node_config({"partiton-id": 0})
    node = parse_node_config({"partition-id": "2", "num-partitions": 3, "model": "mlp_s", "state-dir": str(tmp_path)}, 3)
    assert (node.partition_id, node.num_partitions, node.model, node.state_dir) == (2, 3, "mlp_s", tmp_path)
    assert parse_node_config({"partition-id": 1, "my-own-key": "x"}, strict=False).partition_id == 1


def test_a_supernode_with_a_malformed_node_config_is_left_out_with_the_key_named(tmp_path):
    """The run goes on without it; its setup failure names the key to fix."""
    cfg = small_config(tmp_path, devices=3)
    grid = InProcessGrid(3)
    bad = grid.node_ids[2]
    grid.contexts[bad].node_config["model"] = "resnet9000"  # unknown architecture
    grid.contexts[grid.node_ids[1]].node_config["partition-id"] = "one"
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports = []
    strategy.start(grid=grid, num_rounds=1, on_round_end=reports.append)
    assert [d.device_id for d in strategy.devices.values()] == [0]
    reasons = {f["node"]: f["reason"] for f in reports[0].failures}
    assert "node config 'model'" in reasons[bad] and "resnet9000" in reasons[bad]
    assert "node config 'partition-id'" in reasons[grid.node_ids[1]]


def test_node_config_model_and_state_dir_are_honoured(tmp_path):
    cfg = small_config(tmp_path, "strategy=local", devices=2)
    grid = InProcessGrid(2)
    node = grid.node_ids[0]
    grid.contexts[node].node_config.update({"model": "mlp_s", "state-dir": str(tmp_path / "state")})
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.start(grid=grid, num_rounds=1)
    assert strategy.devices[node].architecture == "mlp_s"
    assert (tmp_path / "state" / "device-0.pt").is_file()
    assert "hetkd.device-state" not in grid.contexts[node].state  # kept on disk, not in Flower's context


# --------------------------------------------------------------------------- bring your own model and data


class TinyNet(nn.Module):
    """A model hetkd's zoo does not know: an MLP of a given width on 8x8 images."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _digits():
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return x, torch.tensor(bunch.target)


X, Y = _digits()
PUBLIC = X[:200]


def _own_data(context: Context) -> DeviceDataset:
    pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    # label skew: device i holds mostly classes {3i .. 3i+4}
    rows = [r for r in range(200, len(Y)) if (int(Y[r]) - 3 * pid) % 10 < 5][pid::n]
    cut = int(0.75 * len(rows))
    train = DataLoader(TensorDataset(X[rows[:cut]], Y[rows[:cut]]), batch_size=16, shuffle=True)
    test = TensorDataset(X[rows[cut:]], Y[rows[cut:]])  # a Dataset works as well as a DataLoader
    return DeviceDataset(train=train, test=test, reference=PUBLIC, global_test=(X[-300:], Y[-300:]))


def _own_app():
    widths = [16, 48, 96]
    return make_client_app(lambda ctx: TinyNet(widths[int(ctx.node_config["partition-id"])]), _own_data,
                           num_classes=10, training=TrainingConfig(local_epochs=2, lr=0.05))


def test_own_model_and_data_become_sd_dist_devices():
    grid = InProcessGrid(3, client_app=_own_app())
    strategy = SDDist(num_classes=10, num_reference=200, reference_labels=Y[:200], num_devices=3,
                      search=NeighbourSearch(num_neighbours=2, num_candidates=3),
                      exchange=ReferenceDistillSettings(warmup_rounds=1), wait_for_devices=5)
    reports = []
    result = strategy.start(grid=grid, num_rounds=3, on_round_end=reports.append)
    assert sorted(d.architecture for d in strategy.devices.values()) == ["TinyNet"] * 3
    assert sorted(d.num_params for d in strategy.devices.values()) == sorted(
        sum(p.numel() for p in TinyNet(w).parameters()) for w in (16, 48, 96))
    assert all(r.failures == [] for r in reports) and reports[-1].trained == 3
    assert reports[-1].metrics["distilled_devices"] == 3  # targets reached every device after the warm-up
    for t in grid.traffic:
        if t.message.metadata.message_type == P.ReferenceDistill.message_type:
            assert set(t.reply.content.keys()) == {"metrics", "config", "arrays"}  # predictions, never weights
            assert P.ReferencePredictions.from_record(t.reply.content).reference_logits.shape == (200, 10)
    final = result.evaluate_metrics_clientapp[3]
    assert final["personalised-accuracy-mean"] > 0.6 and final["global-accuracy-mean"] > 0.3  # chance: 0.1


def test_own_devices_serve_mekd_without_a_global_test_set():
    def data_fn(context):
        own = _own_data(context)
        return DeviceDataset(train=own.train, test=own.test, reference=own.reference)

    app = make_client_app(lambda ctx: TinyNet(32), data_fn, num_classes=10, training=TrainingConfig(local_epochs=1))
    grid = InProcessGrid(2, client_app=app)
    student = TinyNet(32)
    strategy = MEKD(num_classes=10, input_shape=(1, 8, 8), public_inputs=PUBLIC, student=student,
                    global_test=(X[-300:], Y[-300:]), num_devices=2,
                    ensemble=EnsembleSettings(warmup_rounds=1, deprivatize_rounds=1, num_queries=32, server_steps=2),
                    mekd=MEKDSettings(gan=GanSettings(steps=4, batch_size=8)), wait_for_devices=5)
    reports = []
    strategy.start(grid=grid, num_rounds=3, on_round_end=reports.append)
    assert all(r.failures == [] for r in reports) and [r.trained for r in reports] == [2, 2, 2]
    evaluations = [t.reply.content for t in grid.traffic if t.message.metadata.message_type == "evaluate"]
    assert evaluations and all("global_accuracy" not in c["metrics"]  # no global test set: not reported
                               and P.EvaluateReply.from_record(c).global_accuracy is None for c in evaluations)


def test_own_data_errors_name_the_part():
    def bad_labels(context):
        return DeviceDataset(train=(X[:10], Y[:10] + 10), test=(X[:5], Y[:5]))

    app = make_client_app(lambda ctx: TinyNet(8), bad_labels, num_classes=10)
    context = Context(run_id=1, node_id=3, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    message = P.SetupRequest().message(3)
    message.metadata.__dict__["_message_id"] = message.object_id
    with pytest.raises(ValueError, match="'train' has labels outside 0..9"):
        app(message, context)
    with pytest.raises(ValueError, match="num_classes"):
        make_client_app(lambda ctx: TinyNet(8), bad_labels, num_classes=1)


# --------------------------------------------------------------------------- drop-in strategies


def test_quickstart_server_app_with_sd_dist_in_place_of_fedavg(capsys):
    """Flower's quickstart ServerApp, one line changed, drives the example devices of one's own."""
    from hetkd.simulations.examples.client_app import app as client_app
    from hetkd.simulations.examples.server_app import app as server_app

    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    from pathlib import Path

    import hetkd.simulations.examples as examples

    pyproject = tomllib.loads((Path(examples.__file__).parent / "pyproject.toml").read_text())
    run_config = pyproject["tool"]["flwr"]["app"]["config"]
    grid = InProcessGrid(3, client_app=client_app)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_app(grid, context)
    types = [t.message.metadata.message_type for t in grid.traffic]
    assert types.count(P.ReferenceDistill.message_type) == 3 * run_config["num-server-rounds"]
    assert any(P.ReferenceDistill.from_record(t.message.content).targets is not None for t in grid.traffic
               if t.message.metadata.message_type == P.ReferenceDistill.message_type), \
        "SD-Dist sent targets after the warm-up"
    assert all(not t.reply.has_error() for t in grid.traffic)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("round ")]
    assert len(lines) == run_config["num-server-rounds"]
    assert float(lines[-1].rsplit(" ", 1)[1]) > 0.5
    assert np.isfinite(float(lines[0].rsplit(" ", 1)[1]))
