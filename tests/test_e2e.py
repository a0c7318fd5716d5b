"""End to end through Flower's real runtime (Ray): files, accuracy, and `flwr run`.

Marked ``slow``: each run starts Ray. ``make test`` runs them; ``pytest -m "not slow"``
is the quick subset.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import check_run_folder, copy_app, simulation_superlink, small_config

pytestmark = pytest.mark.slow


def test_flwr_run_drives_the_same_apps(tmp_path):
    """`flwr run .` against a SuperLink this test starts (and stops, by PID)."""
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists():
        pytest.skip("flwr CLI not installed beside this Python")
    app_dir = tmp_path / "app"
    copy_app(app_dir)
    with simulation_superlink(tmp_path) as env:
        out = tmp_path / "out"
        result = subprocess.run(
            [str(flwr), "run", str(app_dir), "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
             "--run-config", f"strategy='local' num-server-rounds=2 simulation.num_devices=3 "
                             f"partition.min_samples=5 output.dir='{out}'"],
            env=env, capture_output=True, text=True, timeout=400,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "results:" in result.stdout and "round" in result.stdout
        check_run_folder(out, 2)
        # the [tool.flwr.federations] rule: flwr must not have rewritten our pyproject
        assert "[tool.flwr.app.config]" in (app_dir / "pyproject.toml").read_text()


def test_compare_shows_sd_dist_beating_local_only_then_resumes_finished_runs_and_survives_a_failing_one(
        tmp_path, monkeypatch):
    """`hetkd compare` through Flower's runtime: same partitions, models and seed, only the strategy
    differs, and SD-Dist beats local-only on the global test set; the comparison's files; then the
    same comparison resumed from its runs (one set of simulations serves every half)."""
    import hetkd.simulations.runner as runner
    from hetkd.simulations.compare import compare

    # 3 local epochs, 4 rounds: SD-Dist 0.61 global / 0.79 personalised against local-only's 0.42 / 0.59
    common = ("training.local_epochs=3", "num-server-rounds=4", "reference.size=300", "partition.min_samples=10",
              "strategy.sd_dist.num_neighbours=5", "strategy.sd_dist.num_candidates=7")
    cfg = small_config(tmp_path, *common, devices=10)
    first = compare(cfg, ["central", "local", "sd-dist"], [0], tmp_path / "cmp")
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file()
    table = first["strategies"]
    assert set(table) == {"central", "local", "sd-dist"}
    local, sd = table["local"], table["sd-dist"]
    assert sd["final_global_accuracy_mean"]["mean"] >= local["final_global_accuracy_mean"]["mean"] + 0.08, table
    assert sd["final_personalised_accuracy_mean"]["mean"] >= local["final_personalised_accuracy_mean"]["mean"]
    sd_run = Path(sd["run_dirs"][0])
    assert (sd_run / "similarity.png").is_file()
    # predictions only: far below what one model's weights would cost
    summary = json.loads((sd_run / "summary.json").read_text())
    assert summary["mean_bytes_up_per_device_per_round"] < 0.1 * summary["largest_model_bytes"]
    assert table["central"]["final_global_accuracy_mean"]["mean"] > 0.5
    assert table["central"]["bytes_per_device_per_round"]["mean"] == 0
    assert sd["bytes_per_device_per_round"]["mean"] > local["bytes_per_device_per_round"]["mean"]
    # the communication claim: predictions cost far under 1 % of FedAvg with the zoo's largest model
    assert sd["zoo_largest_model"]["architecture"] == "resnet32"
    assert 0 < sd["bytes_fraction_of_fedavg_zoo_largest"] < 0.01
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sd-dist |" in text and "± " in text and "resnet32" in text

    def broken(cfg):
        raise RuntimeError(f"no simulation allowed ({cfg.strategy.name}, lr {cfg.training.lr})")

    monkeypatch.setattr(runner, "run", broken)
    again = compare(cfg, ["central", "local"], [0], tmp_path / "cmp", resume=True)  # read back, nothing run
    for name in ("central", "local"):
        assert again["strategies"][name]["final_personalised_accuracy_mean"] == \
            first["strategies"][name]["final_personalised_accuracy_mean"]
        assert again["strategies"][name]["bytes_per_device_per_round"] == first["strategies"][name]["bytes_per_device_per_round"]
    assert "Read back from earlier runs" in (tmp_path / "cmp" / "compare.md").read_text()
    # settings a strategy never reads do not invalidate its runs; settings it reads do
    kd_only = small_config(tmp_path, *common, "strategy.kd.rho=0.9", "strategy.sd_dist.num_neighbours=1", devices=10)
    kept = compare(kd_only, ["central", "local"], [0], tmp_path / "cmp", resume=True)
    assert all(kept["strategies"][name]["reused_seeds"] == [0] for name in ("central", "local"))
    student = small_config(tmp_path, *common, "strategy.ensemble.student=mlp_s", devices=10)
    rerun = compare(student, ["central", "local"], [0], tmp_path / "cmp", resume=True)
    assert rerun["strategies"]["local"]["reused_seeds"] == [0]
    assert rerun["strategies"]["central"]["failed_runs"][0]["error"].startswith("RuntimeError: no simulation allowed")
    # a different config is not the finished run: it is run (here: fails), reported, and the other goes on
    changed = small_config(tmp_path, *common, "training.lr=0.01", devices=10)
    result = compare(changed, ["central", "local"], [0], tmp_path / "cmp", resume=True)
    assert result["strategies"]["local"]["failed_runs"][0]["error"].startswith("RuntimeError: no simulation allowed")
    assert result["strategies"]["local"]["final_personalised_accuracy_mean"]["mean"] is None
    assert "local, seed 0 failed" in (tmp_path / "cmp" / "compare.md").read_text()
