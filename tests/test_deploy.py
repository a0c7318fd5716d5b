"""Deployment: a SuperLink and SuperNodes on 127.0.0.1 as real processes (Flower's Deployment Engine).

The Fleet API is gRPC on a port of its own up to Flower 1.39 and HTTP on the
SuperLink's port from 1.40 (:mod:`hetkd.simulations.fleet`); CI runs these tests
on the newest supported Flower and on 1.39.

Marked ``slow``; CI runs it. Every process has its own ``FLWR_HOME`` (a temporary
folder) and free ports, and is stopped by its process group, also when the test fails.
"""

from __future__ import annotations

import json

import pytest

from hetkd.clients import DiskStateStore
from hetkd.clients.device import DistillClient
from hetkd.config import resolve_config
from hetkd.results import read_metrics
from hetkd.simulations.deploy import LocalFederation, run_config_overrides, running_in_group
from hetkd.simulations.fleet import FLEET_ON_SUPERLINK_PORT, FLOWER_VERSION, fleet_address, superlink_address_args
from tests.conftest import copy_app


@pytest.fixture
def quick_task_polling(monkeypatch):
    """SuperExecs that look for a new ClientApp task every 0.1 s instead of Flower's 1 s (the
    SuperNodes inherit this process's environment): each message reaches its ClientApp up to
    0.9 s sooner, about 5 s less per test (Flower 1.40+; older releases ignore the variable)."""
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")


def test_the_fleet_api_layout_follows_the_installed_flower():
    assert FLEET_ON_SUPERLINK_PORT == (FLOWER_VERSION.release[:2] >= (1, 40))
    if FLEET_ON_SUPERLINK_PORT:
        assert fleet_address("h", 8000, None) == "h:8000"
        assert superlink_address_args("h", 8000, None) == ["--host", "h", "--port", "8000"]
    else:
        assert fleet_address("h", 8000, 9092) == "h:9092"
        assert superlink_address_args("h", 8000, 9092)[-2:] == ["--fleet-api-address", "h:9092"]
        with pytest.raises(ValueError, match="fleet_port"):
            fleet_address("h", 8000, None)


def test_run_config_overrides_name_only_what_differs_from_the_defaults(tmp_path):
    cfg = resolve_config(None, ["strategy=fedmd", "partition.alpha=0.1", "models.architectures=[mlp_s,cnn_s]",
                                f"output.dir={tmp_path}", "output.plots=false"])
    text = run_config_overrides(cfg)
    assert text.split(" ") == ['partition.alpha=0.1', 'models.architectures="mlp_s,cnn_s"', 'strategy.name="fedmd"',
                               f'output.dir="{tmp_path}"', 'output.plots=false']
    # what Flower's SuperLink would hand the ServerApp resolves to the same config
    from flwr.common.config import flatten_dict, parse_config_args

    assert resolve_config(None, flatten_dict(parse_config_args([text]))) == cfg


def test_federation_commands_use_the_chosen_ports_and_node_configs(tmp_path):
    fed = LocalFederation(2, tmp_path, node_configs=[{}, {"model": "mlp_s", "state-dir": "/tmp/s"}])
    fed.http_port, fed.fleet_port = 1234, 5678
    assert fed.node_config_text(1) == 'partition-id=1 num-partitions=2 model="mlp_s" state-dir="/tmp/s"'
    command = fed.supernode_command(1, 9999)
    # the Fleet API: the SuperLink's own port from Flower 1.40, a port of its own up to 1.39
    assert command[command.index("--superlink") + 1] == ("127.0.0.1:1234" if FLEET_ON_SUPERLINK_PORT
                                                         else "127.0.0.1:5678")
    assert command[command.index("--port") + 1] == "9999"
    superlink = fed.superlink_command()
    assert superlink[superlink.index("--port") + 1] == "1234"
    assert ("--fleet-api-address" in superlink) is not FLEET_ON_SUPERLINK_PORT
    assert 'address = "127.0.0.1:1234"' in fed.write_connection().read_text()
    with pytest.raises(ValueError, match="node_configs"):
        LocalFederation(3, tmp_path, node_configs=[{}])


@pytest.mark.slow
@pytest.mark.usefixtures("quick_task_polling")
def test_sd_dist_over_grpc_survives_a_supernode_killed_mid_round(tmp_path):
    """3 SuperNodes with 3 different models, 2 rounds of SD-Dist; SuperNode 2 is stopped while it trains
    in round 1 and started again: the run goes on without it and it trains again in round 2."""
    app_dir = tmp_path / "app"  # flwr run may rewrite an app's pyproject: give it a copy
    copy_app(app_dir)
    out = tmp_path / "out"
    cfg = resolve_config(None, [
        "strategy=sd-dist", "simulation.num_devices=3", "num-server-rounds=2",
        "models.assignment=per_device", "models.architectures=[mlp_s,cnn_s,mlp_m]",
        "reference.size=100", "partition.min_samples=5", "training.local_epochs=1",
        "simulation.round_timeout=180", "strategy.wait_for_devices=60",
        "strategy.evaluate_every=2",  # devices are scored after round 2 only: each message costs a ClientApp process
        # K and Q as the test was written for (min(5, n), min(7, n)): with the two devices on record in
        # round 2 the default fractions would leave Q = 1, so the best device would have nobody to learn from
        "strategy.sd_dist.neighbour_fraction=1.0", "strategy.sd_dist.candidate_fraction=1.0",
        "output.plots=false", "output.progress=false", f"output.dir={out}",
    ])
    fed = LocalFederation(3, tmp_path / "flwr-home")
    try:
        fed.start()
        first_node = fed.node_id(2)
        run = fed.submit(app_dir, run_config_overrides(cfg))
        fed.wait_for_log(2, r"Receiving: train\.reference_distill", timeout=240)  # mid-round 1
        fed.stop_supernode(2)
        assert not running_in_group(fed.supernodes[2].pid), "the SuperNode, its SuperExec and ClientApp stopped"
        fed.start_supernode(2)  # the same device comes back, under a new node id
        assert fed.node_id(2) != first_node
        assert run.popen.wait(timeout=300) == 0, run.log_text()[-4000:]
        rows = read_metrics(out / "metrics.jsonl")
        assert [r["round"] for r in rows] == [1, 2]
        # round 1: device 2 left out and reported; the other two trained
        assert rows[0]["trained"] == 2 and [(f["device"], f["phase"]) for f in rows[0]["failures"]] == [(2, "train")]
        assert "Node Unavailable" in rows[0]["failures"][0]["reason"]  # Flower's SuperLink answered for it at once
        assert sorted(rows[0]["devices"]) == ["0", "1"]
        # round 2: it rejoined and trained; the two with predictions on record distilled from the others'
        # (the newcomer gets targets once the server holds its predictions)
        assert rows[1]["trained"] == 3 and rows[1]["failures"] == []
        assert rows[1]["distilled_devices"] == 2 and rows[1]["devices_on_record"] == 3
        assert rows[1]["personalised_accuracy_mean"] > 0.2 and rows[1]["global_accuracy_mean"] > 0.15  # chance 0.1
        assert 0 < rows[1]["bytes_up_per_device"] < 10_000  # predictions on 100 reference rows, not weights
        summary = json.loads((out / "summary.json").read_text())
        assert sorted(d["architecture"] for d in summary["devices"].values()) == ["cnn_s", "mlp_m", "mlp_s"]
        assert "round" in run.log_text() and "results:" in run.log_text()
    finally:
        fed.stop()
    assert len(fed.started) == 6  # SuperLink, 3 SuperNodes, the restarted one, flwr run
    assert all(not running_in_group(pid) for pid in fed.pids()), "every process started was stopped"


def test_an_error_the_superlink_returns_for_a_departed_node_is_booked_to_that_node():
    """Flower's SuperLink answers for a SuperNode that left with an error from its own node id."""
    from flwr.app import ConfigRecord, Error, Message, RecordDict

    from hetkd.strategies import MeteredGrid
    from tests.conftest import InProcessGrid

    InProcessGrid(1)  # sets Flower's task identity, as a ServerApp process has it

    class LinkGrid:
        def send_and_receive(self, messages, *, timeout=None):
            replies = []
            for m in messages:
                m.metadata.__dict__["_message_id"] = m.object_id  # what Flower's grid does on push
                replies.append(Message(Error(code=4, reason="Node Unavailable"), reply_to=m))
            gone = replies[1]
            gone.metadata.__dict__["_src_node_id"] = 1  # the SuperLink's own node id
            return replies

    messages = [Message(RecordDict({"config": ConfigRecord()}), node, "train.local") for node in (11, 22)]
    replies = MeteredGrid(LinkGrid()).send_and_receive(messages, timeout=1)
    assert [r.metadata.src_node_id for r in replies] == [11, 22]
    assert all(r.has_error() and "Unavailable" in r.error.reason for r in replies)


def test_hetkd_deploy_rejects_a_bad_config_before_starting_anything(tmp_path, capsys):
    from hetkd.simulations.cli import main

    assert main(["deploy", "--devices", "2", "--home", str(tmp_path / "home"), "partition.alpah=0.1"]) == 2
    assert "partition.alpah" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # no FLWR_HOME, no process


@pytest.mark.slow
@pytest.mark.usefixtures("quick_task_polling")
def test_dp_devices_over_grpc_report_their_epsilon_and_keep_their_ledger_with_their_state(tmp_path):
    """2 SuperNodes training with DP-SGD (FedMD, private answers, rho = 1), 2 rounds: each device's
    epsilon reaches the round's metrics and grows, and the ledger is in the device's state file
    on its node: a device rebuilt from that file gives the epsilon it reported."""
    app_dir = tmp_path / "app"
    copy_app(app_dir)
    out, state_dir = tmp_path / "out", tmp_path / "device-state"
    cfg = resolve_config(None, [
        "strategy=fedmd", "simulation.num_devices=2", "num-server-rounds=2",
        "models.assignment=per_device", "models.architectures=[mlp_s,cnn_s]",
        "reference.size=100", "partition.min_samples=5", "training.local_epochs=1",
        "privacy.enabled=true", "privacy.noise_multiplier=1.0",
        "strategy.kd.answer_model=private", "strategy.kd.rho=1", "strategy.kd.min_steps=2",
        "strategy.evaluate_every=2",  # epsilon comes with the training replies; scored after round 2 only
        "simulation.round_timeout=180", "output.plots=false", "output.progress=false", f"output.dir={out}",
    ])
    fed = LocalFederation(2, tmp_path / "flwr-home", node_configs=[{"state-dir": str(state_dir)}] * 2)
    try:
        fed.start()
        run = fed.submit(app_dir, run_config_overrides(cfg))
        assert run.popen.wait(timeout=300) == 0, run.log_text()[-4000:]
    finally:
        fed.stop()
    assert all(not running_in_group(pid) for pid in fed.pids()), "every process started was stopped"
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in rows] == [1, 2] and rows[1]["distilled_devices"] == 2
    assert 0 < rows[0]["epsilon_max"] < rows[1]["epsilon_max"]
    for device in (0, 1):
        reported = rows[1]["devices"][str(device)]["epsilon"]
        rebuilt = DistillClient.from_config(cfg, device)
        rebuilt.load_state_dict(DiskStateStore(state_dir, device).load())
        assert rebuilt.accountant.steps > 0 and rebuilt.accountant.epsilon() == pytest.approx(reported, rel=1e-9)
