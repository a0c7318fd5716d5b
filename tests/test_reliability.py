"""Failing before work, not after: an unwritable output folder and bad user data stop a run before
any device starts; a run whose devices stop training, or whose results cannot be written, ends
failed with one clear line and keeps every round it completed; a device that failed a round stays
out of that round's figures. SIGINT / SIGTERM stop a run (or a comparison) within seconds, keeping
the rounds done and leaving no process behind."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.serverapp import Grid

from hetkd.data import DataError, load_dataset
from hetkd.interrupt import RunInterrupted, raise_if_stopped, request_stop, stop_on_signals, stop_requested
from hetkd.results import RunRecorder, read_metrics
from hetkd.simulations import cli
from hetkd.simulations.experiment import RunFailedError, prepare, run_on_grid
from tests.conftest import InProcessGrid, assert_every_process_ends, small_config


@pytest.mark.parametrize("where", ["inside-a-file", "read-only"])
def test_an_unwritable_output_folder_fails_at_once_naming_the_key(tmp_path, capsys, where):
    if where == "inside-a-file":
        (tmp_path / "a-file").write_text("x")
        out = tmp_path / "a-file" / "run"
    elif os.geteuid() != 0:
        (tmp_path / "locked").mkdir(mode=0o500)
        out = tmp_path / "locked" / "run"
    elif Path("/sys").is_dir():
        out = Path("/sys/hetkd-results")  # read-only even for root
    else:
        pytest.skip("no read-only folder to try as root here")
    import ray

    started = time.monotonic()
    code = cli.main(["run", "num-server-rounds=1", "--out", str(out)])
    assert time.monotonic() - started < 5 and code == 2
    message = capsys.readouterr().err
    assert "config key 'output.dir'" in message and "cannot write results" in message and str(out) in message
    assert not ray.is_initialized(), "the folder is checked before Ray starts"


def _npz(tmp_path: Path, name: str, **arrays: np.ndarray) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    ("labels", "inputs", "fragment"),
    [
        ("stray", None, "labels run to 100 but classes 3..99 never occur"),
        ("negative", None, "labels must be >= 0; row 7 hold"),
        ("fractional", None, "labels must be whole numbers"),
        (None, "nan", "inputs must be finite; rows 2, 5 hold NaN"),
    ],
)
def test_bad_user_arrays_are_refused_naming_the_file_and_rows(tmp_path, labels, inputs, fragment):
    x = np.random.default_rng(0).random((30, 8)).astype(np.float32)
    y = np.arange(30) % 3
    if labels == "stray":
        y = y.copy()
        y[11] = 100
    elif labels == "negative":
        y = y.copy()
        y[7] = -1
    elif labels == "fractional":
        y = y.astype(np.float32) + 0.5
    if inputs == "nan":
        x[[2, 5], 3] = np.nan
    path = _npz(tmp_path, f"{labels or inputs}.npz", x=x, y=y)
    with pytest.raises(DataError, match=fragment) as err:
        load_dataset("npz", path=str(path))
    assert str(path) in str(err.value)


def test_the_class_count_can_be_given_and_is_checked(tmp_path):
    x, y = np.zeros((20, 4), np.float32), np.arange(20) % 3
    path = _npz(tmp_path, "three.npz", x=x, y=y)
    assert load_dataset("npz", path=str(path), num_classes=5).num_classes == 5  # classes 3, 4 absent here
    with pytest.raises(DataError, match="below dataset.num_classes=2; rows 2, 5"):
        load_dataset("npz", path=str(path), num_classes=2)
    with pytest.raises(DataError, match="dataset.num_classes=12, but dataset 'digits' has 10 classes"):
        load_dataset("digits", num_classes=12)


def test_an_unreadable_file_is_refused_naming_it(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip file")
    with pytest.raises(DataError, match="cannot be read as an .npz") as err:
        load_dataset("npz", path=str(corrupt))
    assert str(corrupt) in str(err.value)
    pickled = tmp_path / "objects.npz"
    np.savez(pickled, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="cannot be read as an .npz"):
        load_dataset("npz", path=str(pickled))


def test_bad_user_data_stops_the_run_before_any_device_starts(tmp_path):
    y = np.arange(60) % 4
    y[33] = 100
    path = _npz(tmp_path, "stray.npz", x=np.random.default_rng(1).random((60, 8)).astype(np.float32), y=y)
    cfg = small_config(tmp_path, "dataset.name=npz", f"dataset.path={path}", "reference.size=10", devices=2)
    with pytest.raises(DataError, match="row 33"):
        prepare(cfg)


def _error_on_training(reply: Message) -> Message:
    """What a device's training raising FloatingPointError looks like to the server."""
    if reply.metadata.message_type.startswith("train"):
        return Message(error=Error(code=0, reason="training loss became nan after 32 samples"), metadata=reply.metadata)
    return reply


def test_a_run_whose_devices_stop_training_fails_keeping_its_rounds(tmp_path):
    cfg = small_config(tmp_path, "num-server-rounds=6", "simulation.max_idle_rounds=2", devices=3)
    grid = InProcessGrid(3)
    prepared = prepare(cfg)
    grid.faults = {node: _error_on_training for node in grid.node_ids}
    with pytest.raises(RunFailedError, match="no device completed training in the last 2 rounds.*loss became nan"):
        run_on_grid(grid, prepared)
    out = Path(prepared.cfg.output.dir)
    assert [row["round"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] is True and summary["rounds"] == 2


def test_a_run_in_which_no_device_ever_trained_fails_at_its_end(tmp_path):
    cfg = small_config(tmp_path, "num-server-rounds=2", "simulation.max_idle_rounds=0", devices=2)
    grid = InProcessGrid(2)
    grid.faults = {node: _error_on_training for node in grid.node_ids}
    with pytest.raises(RunFailedError, match="no device completed training in any of the 2 rounds"):
        run_on_grid(grid, prepare(cfg))


def test_the_cli_exits_non_zero_when_a_run_fails(monkeypatch, capsys):
    import hetkd.simulations.runner as runner

    def failing(cfg, verbose=False, resume=False):
        raise RunFailedError("no device completed training in any of the 3 rounds")

    monkeypatch.setattr(runner, "run", failing)
    assert cli.main(["run", "num-server-rounds=3"]) == 1
    assert "hetkd: error: the run failed: no device completed training" in capsys.readouterr().err


def test_a_results_write_failure_keeps_the_earlier_rounds_and_says_so_once(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, "num-server-rounds=3", devices=2)
    prepared = prepare(cfg)
    record = RunRecorder.record

    def full_disk(self, row):
        if row["round"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        record(self, row)

    monkeypatch.setattr(RunRecorder, "record", full_disk)
    with pytest.raises(RunFailedError) as err:
        run_on_grid(InProcessGrid(2), prepared)
    assert "could not write round 2's results" in str(err.value) and "No space left on device" in str(err.value)
    assert "rounds 1-1 are in metrics.jsonl" in str(err.value)
    assert [row["round"] for row in read_metrics(Path(prepared.cfg.output.dir) / "metrics.jsonl")] == [1]


def test_a_device_that_failed_the_round_stays_out_of_its_figures(tmp_path):
    cfg = small_config(tmp_path, "num-server-rounds=1", devices=3)
    grid = InProcessGrid(3)
    prepared = prepare(cfg)
    grid.faults[grid.node_ids[1]] = _error_on_training
    rows = []
    run_on_grid(grid, prepared)
    rows = read_metrics(Path(prepared.cfg.output.dir) / "metrics.jsonl")
    (row,) = rows
    assert [f["device"] for f in row["failures"]] == [1] and row["trained"] == 2
    assert "personalised_accuracy" not in row["devices"].get("1", {})
    others = [row["devices"][d]["personalised_accuracy"] for d in ("0", "2")]
    assert math.isclose(row["personalised_accuracy_mean"], float(np.mean(others)))


# --------------------------------------------------------------------------- interrupts


def _stop_in_round(stop_round: int, signum: int = signal.SIGINT):
    """A fault that asks the run to stop while a device trains in ``stop_round`` (a Ctrl-C mid-round)."""

    trained = []

    def fault(reply: Message) -> Message:
        if reply.metadata.message_type.startswith("train"):
            trained.append(reply)
            if len(trained) == stop_round:
                request_stop(signum)
        return reply

    return fault


def test_a_stop_request_abandons_the_round_and_keeps_the_rounds_done(tmp_path):
    cfg = small_config(tmp_path, "num-server-rounds=4", devices=2)
    prepared = prepare(cfg)
    grid = InProcessGrid(2)
    grid.faults[grid.node_ids[0]] = _stop_in_round(3, signal.SIGTERM)
    with stop_on_signals(), pytest.raises(RunInterrupted) as err:
        run_on_grid(grid, prepared)
    assert err.value.signum == signal.SIGTERM and err.value.exit_code == 128 + signal.SIGTERM
    assert f"rounds 1-2 of 4 completed, kept in {prepared.cfg.output.dir}" in str(err.value)
    out = Path(prepared.cfg.output.dir)
    assert [row["round"] for row in read_metrics(out / "metrics.jsonl")] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["rounds"] == 2
    assert stop_requested() is None, "leaving the block clears the request"


class _SilentGrid(Grid):
    """A Flower grid whose nodes never answer."""

    def __init__(self) -> None:
        self.pulls = 0

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        return []

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - MeteredGrid pushes and pulls
        raise AssertionError("MeteredGrid waits itself, so that it can stop")

    def get_node_ids(self):
        return [11]

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def set_run(self, run_id):  # pragma: no cover
        raise NotImplementedError


def test_waiting_for_replies_stops_within_a_pull_interval_of_a_request():
    from flwr.app import ConfigRecord, RecordDict

    from hetkd.strategies import MeteredGrid

    InProcessGrid(1)  # Flower's task identity, as a ServerApp process has it
    grid = _SilentGrid()
    message = Message(RecordDict({"config": ConfigRecord()}), 11, "train.local")
    timer = threading.Timer(1.2, request_stop, args=(signal.SIGINT,))
    with stop_on_signals():
        started = time.monotonic()
        timer.start()
        with pytest.raises(RunInterrupted, match="'train.local' abandoned, waiting for 1 of 1 replies"):
            MeteredGrid(grid).send_and_receive([message], timeout=3600)
    assert time.monotonic() - started < 2.5 and grid.pulls >= 3  # it went on looking until the request


def test_the_first_signal_requests_a_stop_and_the_second_takes_the_usual_way():
    before = signal.getsignal(signal.SIGINT)
    with stop_on_signals():
        with stop_on_signals():  # nested (a run inside a comparison): one request for both
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop_requested() == signal.SIGINT
        with pytest.raises(RunInterrupted, match="interrupted by SIGINT"):
            raise_if_stopped()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before and stop_requested() is None


def test_an_interrupted_comparison_keeps_its_finished_runs_and_resume_goes_on(tmp_path, monkeypatch):
    """Stopped at its second run, a comparison keeps the first; ``--resume`` reads it back and runs the
    second (the pooled baseline, two seeds: real runs, in this process, without Ray)."""
    import hetkd.simulations.runner as runner
    from hetkd.simulations.compare import compare

    cfg = small_config(tmp_path, "num-server-rounds=2", devices=3)
    real_run = runner.run
    ran: list[int] = []

    def stopped_at_seed_1(run_cfg, verbose=False):
        if run_cfg.seed == 1:
            raise RunInterrupted(signal.SIGINT, "rounds 1-1 of 2 completed")
        ran.append(run_cfg.seed)
        return real_run(run_cfg)

    monkeypatch.setattr(runner, "run", stopped_at_seed_1)
    monkeypatch.setattr(runner, "start_ray", lambda cfg: pytest.fail("the pooled baseline alone needs no Ray"))
    with pytest.raises(RunInterrupted):
        compare(cfg, ["central"], [0, 1], tmp_path / "cmp")
    assert ran == [0], "nothing runs after the stop"
    payload = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert payload["interrupted"].startswith("interrupted by SIGINT")
    assert payload["strategies"]["central"]["final_personalised_accuracy_mean"]["mean"] > 0
    assert "--resume" in (tmp_path / "cmp" / "compare.md").read_text()

    def counted(run_cfg, verbose=False):
        ran.append(run_cfg.seed)
        return real_run(run_cfg)

    monkeypatch.setattr(runner, "run", counted)
    done = compare(cfg, ["central"], [0, 1], tmp_path / "cmp", resume=True)
    assert ran == [0, 1], "the finished run is read back, the interrupted one runs"
    assert done["strategies"]["central"]["reused_seeds"] == [0] and "interrupted" not in done
    assert len(done["strategies"]["central"]["run_dirs"]) == 2


@pytest.mark.parametrize("strategy, override, reused", [
    ("feddf", "mekd.gan.steps=7", True), ("feddf", "mekd.device_loss=kl", True),
    ("feddf", "mekd.reference_queries=3", True), ("feddf", "strategy.kd.rho=0.9", True),
    ("feddf", "mekd.distill.temperature=2", False), ("feddf", "strategy.ensemble.server_steps=3", False),
    ("mekd", "mekd.gan.steps=7", False), ("mekd", "mekd.device_loss=kl", False), ("local", "mekd.gan.steps=7", True),
])
def test_a_finished_run_is_reused_unless_a_setting_its_strategy_reads_changed(tmp_path, strategy, override, reused):
    """``hetkd compare --resume`` after a change to MEKD's generator keeps FedDF's runs, whose student reads
    ``mekd.distill`` and nothing else of ``mekd``."""
    from hetkd.config import to_yaml
    from hetkd.simulations.compare import same_run
    from hetkd.simulations.experiment import resolve_data_path

    finished = small_config(tmp_path, f"strategy={strategy}")
    Path(finished.output.dir).mkdir(parents=True)
    (Path(finished.output.dir) / "config.yaml").write_text(to_yaml(resolve_data_path(finished)))
    assert same_run(finished)
    assert same_run(small_config(tmp_path, f"strategy={strategy}", override)) is reused


@pytest.mark.slow
def test_hetkd_run_stops_on_sigterm_keeping_its_rounds_and_leaving_no_process(tmp_path, ray_tmpdir):
    """``kill``: the run stops within seconds, keeps its rounds and plots, and leaves no process
    (Ctrl-C, SIGINT, is the same handler: test_resume's Ctrl-C test checks it the same way)."""
    signum = signal.SIGTERM
    out = tmp_path / "run"
    env = dict(os.environ, RAY_TMPDIR=ray_tmpdir)
    proc = subprocess.Popen([sys.executable, "-m", "hetkd.simulations.cli", "run", "num-server-rounds=50",
                             "simulation.num_devices=3", "training.local_epochs=1", "output.progress=false",
                             "--out", str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.2)
        proc.send_signal(signum)
        sent = time.monotonic()
        code = proc.wait(timeout=60)
        seconds = time.monotonic() - sent
        log = proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 128 + signum, log
    assert seconds < 30, f"took {seconds:.1f}s to stop"
    name = signal.Signals(signum).name
    assert f"hetkd: stopped: interrupted by {name}: rounds 1-" in log
    rows = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == name and summary["rounds"] == len(rows) >= 1 and len(rows) < 50
    assert (out / "accuracy.png").is_file()
    assert_every_process_ends(proc.pid, ray_tmpdir)
