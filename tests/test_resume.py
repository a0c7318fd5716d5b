"""Resuming an interrupted run: ``hetkd run --resume DIR`` goes on from the last completed round, with
the server's state from its checkpoint and every device's state put back to that round, and computes
what the uninterrupted run computes; a changed config, a run without device state on disk and a
complete run are refused with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from hetkd.clients import DiskStateStore
from hetkd.config import ConfigError, resolve_config
from hetkd.interrupt import RunInterrupted, request_stop, stop_on_signals
from hetkd.results import read_metrics
from hetkd.simulations import cli
from hetkd.simulations.checkpoint import CHECKPOINT_FILE, resumed_config
from hetkd.simulations.experiment import prepare, run_on_grid
from tests.conftest import InProcessGrid, assert_every_process_ends, small_config

ROUNDS = 4
ENSEMBLE = ("strategy.ensemble.warmup_rounds=1", "strategy.ensemble.deprivatize_rounds=2", "mekd.gan.steps=40",
            "mekd.gan.batch_size=16", "strategy.ensemble.server_steps=20", "strategy.ensemble.num_queries=64",
            "strategy.ensemble.min_steps=0", "reference.size=100")
#: figures a resumed round must repeat exactly (time and memory figures are the machine's)
SAME = ("personalised_accuracy_mean", "global_accuracy_mean", "student_accuracy", "trained", "neighbour_churn",
        "neighbour_distance_mean", "student_loss", "g_loss", "d_loss")


def _config(tmp_path: Path, strategy: str, folder: str):
    extra = ENSEMBLE if strategy in ("feddf", "mekd") else ()
    devices = ("models.assignment=homogeneous",) if strategy == "fedavg" else ()
    return small_config(tmp_path, f"strategy={strategy}", f"num-server-rounds={ROUNDS}", "training.local_epochs=1",
                        "simulation.state_store=disk", *extra, *devices, f"output.dir={tmp_path / folder}",
                        devices=3)


def _stop_while_training(round_to_stop: int):
    """A fault (on a device that trains every round) that asks the run to stop as it trains in ``round_to_stop``."""
    seen = []

    def fault(reply: Message) -> Message:
        if reply.metadata.message_type.startswith("train"):
            seen.append(reply)
            if len(seen) == round_to_stop:
                request_stop(signal.SIGINT)
        return reply

    return fault


def _figures(row: dict) -> dict:
    devices = {d: {k: v for k, v in fig.items() if k.endswith("accuracy")} for d, fig in row["devices"].items()}
    return {k: row.get(k) for k in SAME} | {"devices": devices}


@pytest.mark.parametrize("strategy", ["local", "fedmd", "sd-dist", "feddf", "mekd", "fedavg"])
def test_a_resumed_run_repeats_the_uninterrupted_rounds_exactly(tmp_path, strategy):
    whole = prepare(_config(tmp_path, strategy, "whole"), shared_output=True)
    run_on_grid(InProcessGrid(3), whole)
    expected = read_metrics(Path(whole.cfg.output.dir) / "metrics.jsonl")

    cfg = _config(tmp_path, strategy, "cut")
    grid = InProcessGrid(3)
    grid.faults[grid.node_ids[0]] = _stop_while_training(3)
    with stop_on_signals(), pytest.raises(RunInterrupted) as err:
        run_on_grid(grid, prepare(cfg, shared_output=True))
    assert err.value.resumable and "--resume" in str(err.value)
    out = Path(cfg.output.dir)
    assert [row["round"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]
    assert DiskStateStore(out / "device-state", 0).saved_round() == 3, "the abandoned round's training was saved"

    summary = run_on_grid(InProcessGrid(3), prepare(cfg, shared_output=True, resume=True))  # fresh nodes
    rows = read_metrics(out / "metrics.jsonl")
    assert [row["round"] for row in rows] == list(range(1, ROUNDS + 1)) and summary["rounds"] == ROUNDS
    for got, want in zip(rows, expected):
        assert _figures(got) == _figures(want), f"round {want['round']}"
        if strategy != "mekd":  # MEKD sends G again to devices that restarted without it
            assert got["bytes_up_per_device"] == want["bytes_up_per_device"]
            assert got["bytes_down_per_device"] == want["bytes_down_per_device"]
    if strategy in ("feddf", "mekd"):
        assert summary["final_student_accuracy"] == json.loads(
            (Path(whole.cfg.output.dir) / "summary.json").read_text())["final_student_accuracy"]


def test_a_device_store_keeps_the_round_before_and_rewinds_to_it(tmp_path):
    store = DiskStateStore(tmp_path, 1)
    for r in (1, 2, 2, 3):
        store.save({"model": {"w": torch.tensor([float(r)])}}, r)
    assert store.saved_round() == 3 and not (tmp_path / "device-1.pt.tmp").exists()
    store.rewind(2)
    assert store.saved_round() == 2 and float(store.load()["model"]["w"]) == 2.0
    store.rewind(2)  # nothing later to undo
    store.save({"model": {"w": torch.tensor([9.0])}}, None)  # set-up: the round stays
    assert DiskStateStore(tmp_path, 1).saved_round() == 2
    store.save({"model": {"w": torch.tensor([3.0])}}, 3)
    store.save({"model": {"w": torch.tensor([4.0])}}, 4)
    with pytest.raises(RuntimeError, match="no state of round 2 or before"):
        store.rewind(2)


def _interrupted_run(tmp_path: Path, **overrides: str) -> Path:
    cfg = _config(tmp_path, "sd-dist", "cut")
    grid = InProcessGrid(3)
    grid.faults[grid.node_ids[0]] = _stop_while_training(2)
    with stop_on_signals(), pytest.raises(RunInterrupted):
        run_on_grid(grid, prepare(cfg, shared_output=True))
    return Path(cfg.output.dir)


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    out = _interrupted_run(tmp_path)
    with pytest.raises(ConfigError, match=r"--resume.*training.lr: 0.05 -> 0.5"):
        resumed_config(out, (None, ["training.lr=0.5"]))
    assert resumed_config(out, (None, ["output.quiet=true"])).output.quiet  # how it shows results may change
    code = cli.main(["run", "--resume", str(out), "strategy.kd.rho=0.9"])
    assert code == 2


def test_resume_refuses_what_it_cannot_go_on_with(tmp_path, capsys):
    assert cli.main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "holds no config.yaml" in capsys.readouterr().err
    out = _interrupted_run(tmp_path)
    (out / CHECKPOINT_FILE).write_bytes(b"torn")
    assert cli.main(["run", "--resume", str(out)]) == 2
    assert f"cannot read {out / CHECKPOINT_FILE}" in capsys.readouterr().err
    memory = small_config(tmp_path, "num-server-rounds=3", "simulation.state_store=context",
                          f"output.dir={tmp_path / 'memory'}", devices=2)
    grid = InProcessGrid(2)
    grid.faults[grid.node_ids[0]] = _stop_while_training(2)
    with stop_on_signals(), pytest.raises(RunInterrupted) as err:
        run_on_grid(grid, prepare(memory, shared_output=True))
    assert not err.value.resumable
    with pytest.raises(ConfigError, match="did not keep their models on disk"):
        prepare(memory, shared_output=True, resume=True)


def test_hetkd_run_does_not_start_over_a_folder_holding_a_run(tmp_path, capsys):
    out = _interrupted_run(tmp_path)
    before = (out / "metrics.jsonl").read_text()
    assert cli.main(["run", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "config key 'output.dir'" in message and f"hetkd run --resume {out}" in message
    assert (out / "metrics.jsonl").read_text() == before
    assert cli.main(["run", "--resume", str(out), "--out", str(out)]) == 2


@pytest.mark.slow
def test_hetkd_run_resume_after_ctrl_c_equals_the_uninterrupted_run(tmp_path, ray_tmpdir):
    """The CLI on Ray: interrupt a run, resume it, and compare every round with the same run never
    stopped, made in this process without Ray (the server takes replies in device order, so neither
    Ray's delivery order nor the runtime changes a figure)."""
    args = ["num-server-rounds=3", "simulation.num_devices=4", "training.local_epochs=1", "output.progress=false"]
    whole = tmp_path / "whole"
    run_on_grid(InProcessGrid(4), prepare(resolve_config(None, [*args, f"output.dir={whole}"]), shared_output=True))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "hetkd.simulations.cli", "run", *args, "--out", str(cut)],
                            env=dict(os.environ, RAY_TMPDIR=ray_tmpdir), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(read_metrics(cut / "metrics.jsonl")) < 1 if (cut / "metrics.jsonl").is_file() else True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code = proc.wait(timeout=120)
        seconds = time.monotonic() - sent
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 130 and f"hetkd run --resume {cut}" in log, log
    assert "hetkd: stopped: interrupted by SIGINT: rounds 1-" in log and seconds < 30, f"{seconds:.1f}s: {log}"
    assert_every_process_ends(proc.pid, ray_tmpdir)
    stopped_after = len(read_metrics(cut / "metrics.jsonl"))
    resumed = subprocess.run([sys.executable, "-m", "hetkd.simulations.cli", "run", "--resume", str(cut)],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed after round {stopped_after}" in resumed.stdout
    got, want = read_metrics(cut / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [r["round"] for r in got] == list(range(1, 4))
    assert [_figures(r) for r in got] == [_figures(r) for r in want]
