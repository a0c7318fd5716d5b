"""The `hetkd` command line and the central (pooled data) baseline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hetkd.results import read_metrics
from hetkd.simulations import run
from hetkd.simulations.cli import main
from tests.conftest import small_config, superlink_lock


def test_config_prints_the_resolved_yaml(capsys):
    assert main(["config", "partition.alpha=0.3", "strategy=fedmd"]) == 0
    out = capsys.readouterr().out
    assert "alpha: 0.3" in out and "name: fedmd" in out


def test_bad_key_exits_2_naming_the_key(capsys):
    assert main(["config", "partition.alpah=0.3"]) == 2
    err = capsys.readouterr().err
    assert "partition.alpah" in err and "did you mean 'partition.alpha'" in err


def test_bad_seed_count_is_rejected(capsys):
    assert main(["compare", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "hetkd.simulations.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "compare" in out.stdout and "run" in out.stdout


def test_central_baseline_scores_every_device_with_its_architecture(tmp_path):
    summary = run(small_config(tmp_path, "strategy=central", "num-server-rounds=2"))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 2 and set(rows[-1]["devices"]) == {"0", "1", "2", "3"}
    assert summary["final_global_accuracy_mean"] > 0.5  # pooled data learns fast
    assert summary["mean_bytes_up_per_device_per_round"] == 0


def test_make_stop_stops_the_local_superlink_and_not_itself():
    """`make stop` (the README's way to stop the SuperLink `make run` leaves behind) finds it by its
    command line; its own shell's command line holds the same words and must not be the match."""
    if shutil.which("make") is None or shutil.which("pgrep") is None:
        pytest.skip("needs make and pgrep")
    def make_stop():
        done = subprocess.run(["make", "--no-print-directory", "stop"], cwd=Path(__file__).parents[1],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr  # not killed by itself
        return done.stdout

    with superlink_lock(exclusive=True):  # no other test's SuperLink runs meanwhile
        pattern = ["pgrep", "-f", "[f]lower-superlink.*--simulation"]
        if subprocess.run(pattern, capture_output=True).returncode == 0:
            pytest.skip("a local SuperLink is running; make stop would stop it")
        assert "no local SuperLink running" in make_stop()
        stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                                     "flower-superlink", "--simulation"])
        try:
            assert f"stopped local SuperLink (pid {stand_in.pid})" in make_stop()
            assert stand_in.wait(timeout=10) != 0
        finally:
            stand_in.kill()
            stand_in.wait()
