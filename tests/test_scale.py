"""Scale: hundreds of devices within a memory bound, an existing Ray cluster, the bench command.

The simulations are marked ``slow`` (each starts Ray); the config checks and the
bench's neighbour-search part run in the quick subset.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hetkd.config import ConfigError, resolve_config
from hetkd.results import read_metrics
from hetkd.simulations.bench import BenchRunConfig, TreeMemoryMonitor, run_bench
from tests.conftest import check_run_folder, small_config

GIB = float(1 << 30)


def test_ray_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="simulation.ray_address"):
        resolve_config(None, ["simulation.ray_address=localhost"])
    with pytest.raises(ConfigError, match="simulation.gpus_per_device"):
        resolve_config(None, ["simulation.gpus_per_device=0.5"])  # training.device=cpu would leave it unused
    with pytest.raises(ConfigError, match="simulation.gpus_per_device"):
        resolve_config(None, ["simulation.gpus_per_device=1.5", "training.device=auto"])
    with pytest.raises(ConfigError, match="simulation.ray_num_cpus"):
        resolve_config(None, ["simulation.ray_address=auto", "simulation.ray_num_cpus=4"])
    with pytest.raises(ConfigError, match="strategy.sd_dist.search_sample"):
        resolve_config(None, ["strategy.sd_dist.search_sample=0"])
    ok = resolve_config(None, ["simulation.ray_address=ray://10.0.0.5:10001", "simulation.gpus_per_device=0.25",
                               "training.device=auto", "simulation.cpus_per_device=0.5"])
    assert ok.simulation.gpus_per_device == 0.25


def test_local_ray_runs_workers_at_the_drivers_priority_and_restores_the_environment(monkeypatch):
    from hetkd.simulations.runner import WORKER_NICENESS, ray_environment

    monkeypatch.delenv(WORKER_NICENESS, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/callers/own")
    local = resolve_config(None, [])
    with ray_environment(local):
        assert os.environ[WORKER_NICENESS] == "0"
        os.environ["PYTHONPATH"] = "/written/by/flower"
    assert WORKER_NICENESS not in os.environ
    assert os.environ["PYTHONPATH"] == "/callers/own"
    with ray_environment(resolve_config(None, ["simulation.ray_address=auto"])):
        assert WORKER_NICENESS not in os.environ, "a running cluster keeps its own settings"
    monkeypatch.setenv(WORKER_NICENESS, "5")
    with ray_environment(local):
        assert os.environ[WORKER_NICENESS] == "5", "the user's choice wins"


def test_compare_starts_ray_with_workers_at_the_drivers_priority(monkeypatch, tmp_path):
    """``hetkd compare`` starts one Ray session for all its runs: in the same environment as ``run``."""
    import ray

    import hetkd.simulations.runner as runner
    from hetkd.simulations.compare import compare

    seen: dict[str, str | None] = {}
    monkeypatch.delenv(runner.WORKER_NICENESS, raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("init", os.environ.get(runner.WORKER_NICENESS)))
    monkeypatch.setattr(ray, "shutdown", lambda: seen.setdefault("shutdown", "called"))

    def no_run(cfg, verbose=False):
        seen["run"] = os.environ.get(runner.WORKER_NICENESS)
        raise RuntimeError("not simulated here")

    monkeypatch.setattr(runner, "run", no_run)
    payload = compare(small_config(tmp_path), ["local"], [0], tmp_path / "cmp")
    assert seen == {"init": "0", "run": "0", "shutdown": "called"}
    assert payload["strategies"]["local"]["failed_runs"][0]["error"] == "RuntimeError: not simulated here"
    assert runner.WORKER_NICENESS not in os.environ


def test_tree_monitor_counts_child_processes():
    child = subprocess.Popen([sys.executable, "-c", "b = bytearray(200 * 2**20); import time; time.sleep(30)"])
    try:
        time.sleep(1.5)
        with TreeMemoryMonitor(interval=0.05) as monitor:
            time.sleep(0.3)
        assert monitor.peak_processes >= 2
        assert monitor.peak_total - monitor.peak_root >= 200 * 2**20, "the child's 200 MiB must be counted"
    finally:
        child.kill()
        child.wait()


def test_bench_similarity_part_writes_json_and_plot(tmp_path):
    cfg = resolve_config(None, ["bench.parts=[similarity]", "bench.similarity_sizes=[20,200]",
                                "bench.similarity_reference=30", "bench.similarity_exact_max=100", "bench.similarity_learners=[1.0]",
                                "strategy.sd_dist.exact_search_max=50", "strategy.sd_dist.search_sample=40"],
                         schema=BenchRunConfig)
    result = run_bench(cfg, tmp_path)
    rows = json.loads((tmp_path / "bench.json").read_text())["similarity"]["rows"]
    assert (tmp_path / "bench.png").is_file() and result["similarity"]["rows"] == rows
    assert {(r["devices"], r["mode"]) for r in rows} == {(20, "exact"), (20, "configured"), (200, "configured")}
    assert [r["sampled_search"] for r in rows if r["devices"] == 200 and r["rule"] == "distance"] == [True]
    assert all(r["seconds"] > 0 for r in rows)


def test_bench_startup_part_starts_device_processes_cold_then_warm(tmp_path):
    """A fresh device process imports Hugging Face ``datasets`` only to make a partition: with the
    partition cache warm it does not; scikit-learn's loaders are never imported for digits."""
    cfg = resolve_config(None, ["bench.parts=[startup]", "bench.startup_repeats=1"], schema=BenchRunConfig)
    result = run_bench(cfg, tmp_path)
    startup = json.loads((tmp_path / "bench.json").read_text())["startup"]
    assert (tmp_path / "bench.png").is_file() and result["startup"]["rows"] == startup["rows"]
    cold, warm = startup["rows"]
    assert (cold["start"], warm["start"]) == ("cold", "warm")
    assert cold["imported"]["datasets"] and not warm["imported"]["datasets"]
    assert not cold["imported"]["sklearn.datasets"] and not warm["imported"]["sklearn.datasets"]
    assert all(r["process_seconds"] > r["import_seconds"] + r["device_seconds"] > 0 for r in (cold, warm))
    with pytest.raises(ValueError, match="startup_repeats"):
        resolve_config(None, ["bench.startup_repeats=0"], schema=BenchRunConfig)


@pytest.mark.slow
def test_200_devices_stay_within_a_memory_bound(tmp_path):
    from hetkd.simulations import run

    cfg = small_config(
        tmp_path, "strategy=sd-dist", "partition.method=iid", "partition.min_samples=4", "reference.size=100",
        "models.architectures=[mlp_s,cnn_s]", "strategy.fraction_train=0.05", "strategy.fraction_evaluate=0.05",
        "training.local_epochs=1", "simulation.state_store=disk", "strategy.kd.warmup_rounds=1",
        "strategy.wait_for_devices=300", devices=200,
    )
    with TreeMemoryMonitor(interval=0.2) as monitor:
        summary = run(cfg)
    rows = read_metrics(Path(summary["out_dir"]) / "metrics.jsonl")
    assert [r["trained"] for r in rows] == [10, 10] and summary["failures"] == 0
    # the server's per-device record is one R x C prediction matrix per device that has trained
    assert 10 < rows[-1]["devices_on_record"] <= 20
    state_dir = Path(summary["out_dir"]) / "device-state"
    states = list(state_dir.glob("device-*[0-9].pt"))
    assert len(states) == 200, "every device's weights and optimizer live on disk between rounds"
    # beside the state of each device that trained twice, that of the round before (for --resume)
    assert 0 < len(list(state_dir.glob("device-*.previous.pt"))) <= 20
    # the driver (with pytest), Ray's own processes and two workers together; measured
    # 4.1 GiB on a 2-core machine, nearly all of it the fixed cost of Ray and torch in each
    # process (`hetkd bench` measured 4.25 GiB for 10 devices and 4.38 GiB for 1,000)
    assert monitor.peak_total / GIB < 6.0, f"peak RSS of all processes {monitor.peak_total / GIB:.2f} GiB"
    assert monitor.peak_processes > 3, "the monitor must see Ray's processes"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_runs_on_an_existing_ray_cluster(tmp_path, ray_tmpdir):
    """`ray start --head` as a user would, then a two-round FedAvg run with simulation.ray_address
    pointing at it: the whole run folder, learning, and the cluster left running (runs on a Ray of
    their own: test_e2e's comparison, the 200-device test above)."""
    from hetkd.simulations import run

    ray_bin = Path(sys.executable).with_name("ray")
    port = _free_port()
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmpdir}", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"},
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and head.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"the Ray head node did not open port {port} (exit code {head.poll()})")
        cfg = small_config(tmp_path, f"simulation.ray_address=127.0.0.1:{port}", "strategy=fedavg",
                           "models.assignment=homogeneous", "models.architectures=[cnn_m]", "output.plots=true",
                           "training.local_epochs=5", devices=4)
        pythonpath = os.environ.get("PYTHONPATH")
        summary = run(cfg)
        assert os.environ.get("PYTHONPATH") == pythonpath, "the run must leave the caller's environment as it was"
        assert head.poll() is None, "the run must disconnect from the cluster, not stop it"
        out = Path(summary["out_dir"])
        rows = check_run_folder(out, 2)
        assert [r["trained"] for r in rows] == [4, 4] and summary["failures"] == 0
        assert summary["final_personalised_accuracy_mean"] > 0.3, "10 classes: chance is 0.1"
        assert rows[-1]["global_accuracy_mean"] > 0.15
        assert json.loads((out / "summary.json").read_text())["strategy"] == "fedavg"
    finally:
        members = [head.pid] + [p.pid for p in psutil.Process(head.pid).children(recursive=True)] \
            if head.poll() is None else []
        try:
            os.killpg(head.pid, signal.SIGTERM)  # the session this test started, nothing else
        except ProcessLookupError:
            pass
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(10)
        for pid in members:  # anything of ours that left the process group
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
