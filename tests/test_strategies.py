"""Strategies on an in-process grid: the round loop, failures, sampling, FedAvg."""

from __future__ import annotations

import math
import threading
import time

import pytest
from flwr.app import ArrayRecord

from hetkd.config import to_yaml
from hetkd.data import build_federation
from hetkd.interrupt import RunInterrupted, request_stop, stop_on_signals
from hetkd.sampling import wait_until
from hetkd.simulations.registry import build_strategy, initial_arrays
from hetkd.strategies import FedAvg, HeterogeneousModelsError, LocalOnly, RoundReport
from tests.conftest import InProcessGrid, corrupt_metric, small_config


def _run(cfg, grid, rounds=2):
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports: list[RoundReport] = []
    result = strategy.start(grid=grid, initial_arrays=initial_arrays(cfg, build_federation(cfg)),
                            num_rounds=rounds, on_round_end=reports.append)
    return strategy, reports, result


def test_local_only_rounds_report_every_figure(tmp_path):
    cfg = small_config(tmp_path)
    strategy, reports, result = _run(cfg, InProcessGrid(4))
    assert isinstance(strategy, LocalOnly)
    assert [r.round for r in reports] == [1, 2]
    row = reports[-1].as_row()
    for key in ("personalised_accuracy_mean", "personalised_accuracy_std", "personalised_accuracy_worst10",
                "personalised_accuracy_weighted", "global_accuracy_mean", "bytes_up_per_device",
                "bytes_down_per_device", "seconds", "server_peak_rss_mb", "device_peak_rss_mb"):
        assert row[key] is not None and not (isinstance(row[key], float) and math.isnan(row[key])), key
    assert set(row["devices"]) == {"0", "1", "2", "3"}
    assert row["failures"] == []
    # Flower's Result carries the same figures, so the strategy works in any ServerApp
    assert result.evaluate_metrics_clientapp[2]["personalised-accuracy-mean"] == row["personalised_accuracy_mean"]


def test_same_seed_same_numbers_different_node_ids(tmp_path):
    cfg = small_config(tmp_path, "strategy.fraction_train=0.5")
    _, first, _ = _run(cfg, InProcessGrid(4))
    grid = InProcessGrid(4)
    grid.node_ids = list(reversed([5000 + i for i in range(4)]))  # other ids, other order
    grid.contexts = {n: grid.contexts[o] for n, o in zip(grid.node_ids, list(grid.contexts))}
    for ctx, n in zip(grid.contexts.values(), grid.node_ids):
        ctx.node_id = n
    grid.connected = set(grid.node_ids)
    _, second, _ = _run(cfg, grid)
    for a, b in zip(first, second):
        assert a.as_row()["devices"] == b.as_row()["devices"]
        assert a.metrics["personalised_accuracy_mean"] == b.metrics["personalised_accuracy_mean"]


def test_sampling_takes_the_configured_fraction(tmp_path):
    cfg = small_config(tmp_path, "strategy.fraction_train=0.5")
    _, reports, _ = _run(cfg, InProcessGrid(4))
    assert all(r.sampled == 2 and r.trained == 2 for r in reports)
    assert len(reports[-1].devices) == 4  # everyone evaluates


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("error", "simulated device crash"),
        ("drop", "no reply"),
        (corrupt_metric("num_examples"), "non-finite"),
        (corrupt_metric("personalised_accuracy", 0.5), None),  # a plausible value is fine
    ],
)
def test_a_failing_device_is_left_out_reported_and_the_round_goes_on(tmp_path, fault, reason):
    cfg = small_config(tmp_path)
    grid = InProcessGrid(4)
    bad_node = grid.node_ids[1]
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    strategy.setup_devices(grid, block=True)
    grid.faults[bad_node] = fault
    reports: list[RoundReport] = []
    strategy.start(grid=grid, num_rounds=2, on_round_end=reports.append)
    assert len(reports) == 2
    for report in reports:
        failed = {f["device"] for f in report.failures}
        if reason is None:
            assert failed == set()
        else:
            assert failed == {1} and reason in report.failures[0]["reason"]
            assert report.trained == 3
            assert not math.isnan(report.metrics["personalised_accuracy_mean"])


def test_fedavg_averages_one_architecture(tmp_path):
    cfg = small_config(tmp_path, "strategy=fedavg", "models.assignment=homogeneous", "models.architectures=[cnn_s]")
    strategy, reports, result = _run(cfg, InProcessGrid(4))
    assert isinstance(strategy, FedAvg)
    assert len(result.arrays) > 0
    # weights travel both ways: far more bytes than a metrics-only strategy
    assert reports[-1].metrics["bytes_up_per_device"] > 10_000
    assert reports[-1].metrics["bytes_down_per_device"] > 10_000
    accs = [d["global_accuracy"] for d in reports[-1].devices.values()]
    assert max(accs) - min(accs) < 1e-9, "all devices evaluate the same global model"


def test_fedavg_refuses_heterogeneous_devices_at_runtime(tmp_path):
    cfg = small_config(tmp_path)  # round robin over five architectures
    strategy = FedAvg(num_devices=4, device_config=to_yaml(cfg))
    with pytest.raises(HeterogeneousModelsError, match="same architecture"):
        strategy.start(grid=InProcessGrid(4), initial_arrays=ArrayRecord(), num_rounds=1)


def test_evaluate_every_skips_rounds_but_not_the_last(tmp_path):
    cfg = small_config(tmp_path, "strategy.evaluate_every=2")
    _, reports, _ = _run(cfg, InProcessGrid(4), rounds=3)
    evaluated = [r.round for r in reports if "personalised_accuracy_mean" in r.metrics]
    assert evaluated == [2, 3]


def test_missing_devices_stop_the_start_with_advice(tmp_path):
    cfg = small_config(tmp_path)
    strategy = LocalOnly(num_devices=4, min_devices=4, wait_for_devices=1.0, device_config=to_yaml(cfg))
    grid = InProcessGrid(4)
    grid.connected = set(grid.node_ids[:2])
    with pytest.raises(RuntimeError, match="num-supernodes=4"):
        strategy.start(grid=grid, num_rounds=1)


def test_wait_until_stops_when_ready_or_when_the_time_is_up():
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), seconds=5, poll=0.01)
    started = time.monotonic()
    assert not wait_until(lambda: False, seconds=0.2, poll=0.05)
    assert 0.2 <= time.monotonic() - started < 2
    for bad in ({"seconds": -1}, {"seconds": 1, "poll": 0}):
        with pytest.raises(ValueError, match="seconds=|poll="):
            wait_until(lambda: True, **bad)
    started = time.monotonic()
    with stop_on_signals(), pytest.raises(RunInterrupted, match="waiting for devices"):
        request_stop()  # Ctrl-C while a round waits for its devices
        wait_until(lambda: False, seconds=60)
    assert time.monotonic() - started < 5


def _drop_every_node_after_round_one(grid: InProcessGrid, back_after: float | None):
    """An ``on_round_end`` that disconnects every node after round 1 (missed heartbeats) and, after
    ``back_after`` seconds, reconnects them, node 0 under a new node id (a restarted SuperNode)."""
    reports: list[RoundReport] = []

    def come_back() -> None:
        old = grid.node_ids[0]
        grid.node_ids[0] = new = old + 10_000
        grid.contexts[new] = grid.contexts.pop(old)
        grid.contexts[new].node_id = new
        grid.connected = set(grid.node_ids)

    def on_round_end(report: RoundReport) -> None:
        reports.append(report)
        if report.round == 1:
            grid.connected = set()
            if back_after is not None:
                threading.Timer(back_after, come_back).start()

    return reports, on_round_end


def test_a_round_waits_for_devices_that_dropped_off_and_sets_up_those_back_under_new_ids(tmp_path):
    cfg = small_config(tmp_path, "strategy.min_devices=4", "strategy.wait_for_devices=30")
    grid = InProcessGrid(4)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports, on_round_end = _drop_every_node_after_round_one(grid, back_after=1.0)
    started = time.monotonic()
    strategy.start(grid=grid, num_rounds=2, on_round_end=on_round_end)
    assert time.monotonic() - started < 25, "it waited for the devices, not for the whole allowance"
    assert [(r.sampled, r.trained) for r in reports] == [(4, 4), (4, 4)]
    # the rejoiner's set-up is booked as set-up, not as round 2's training traffic
    assert reports[1].metrics["bytes_down_per_device"] == reports[0].metrics["bytes_down_per_device"]
    assert reports[1].failures == [] and sorted(strategy.devices.values(), key=lambda d: d.device_id)[0].node_id \
        == grid.node_ids[0]


def test_a_round_whose_devices_never_come_back_goes_on_after_the_wait(tmp_path):
    cfg = small_config(tmp_path, "strategy.wait_for_devices=1")
    grid = InProcessGrid(4)
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports, on_round_end = _drop_every_node_after_round_one(grid, back_after=None)
    started = time.monotonic()
    strategy.start(grid=grid, num_rounds=3, on_round_end=on_round_end)
    assert time.monotonic() - started >= 2, "rounds 2 and 3 each waited wait_for_devices"
    assert [r.sampled for r in reports] == [4, 0, 0]


def test_a_node_that_cannot_be_set_up_is_reported_once_and_not_asked_again(tmp_path):
    cfg = small_config(tmp_path)  # 4 devices expected
    grid = InProcessGrid(5)  # one SuperNode too many: partition-id 4 is out of range
    strategy = build_strategy(cfg, build_federation(cfg), to_yaml(cfg))
    reports: list[RoundReport] = []
    strategy.start(grid=grid, num_rounds=2, on_round_end=reports.append)
    assert len(strategy.devices) == 4 and grid.node_ids[4] in strategy.rejected
    assert "partition-id" in reports[0].failures[0]["reason"]
    assert reports[1].failures == []
    setups = [t for t in grid.traffic if t.message.metadata.dst_node_id == grid.node_ids[4]]
    assert len(setups) == 1


def test_central_training_gives_the_process_its_thread_count_back(tmp_path):
    """``hetkd compare`` runs central and then the strategies' server side in one process:
    a thread count left behind would change the order of the server's float reductions."""
    import torch

    from hetkd.simulations.central import run_central
    from hetkd.training import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        run_central(small_config(tmp_path, "training.num_threads=1", "num-server-rounds=1", devices=3))
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="number of threads"):
            torch_threads(bad)  # type: ignore[arg-type]
