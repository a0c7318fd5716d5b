"""Per-round statistics and the files a run writes as it goes."""

from __future__ import annotations

import json
import math

import pytest

from hetkd.results import RunRecorder, accuracy_summary, final_figures, read_metrics
from tests.conftest import RUN_FILES


def test_accuracy_summary_closed_form():
    acc = [0.9, 0.5, 0.7, 1.0]
    n = [10, 30, 20, 40]
    s = accuracy_summary(acc, n, "p_")
    assert s["p_mean"] == pytest.approx(0.775)
    assert s["p_std"] == pytest.approx(math.sqrt(((0.125**2) + (0.275**2) + (0.075**2) + (0.225**2)) / 4))
    assert s["p_worst10"] == pytest.approx(0.5)  # ceil(10% of 4) = 1 device
    assert s["p_weighted"] == pytest.approx((9 + 15 + 14 + 40) / 100)


def test_accuracy_summary_worst10_uses_a_tenth_of_the_devices_and_skips_nan():
    acc = [i / 20 for i in range(20)] + [math.nan]
    s = accuracy_summary(acc)
    assert s["worst10"] == pytest.approx((0.0 + 0.05) / 2)
    assert all(math.isnan(v) for v in accuracy_summary([math.nan]).values())
    with pytest.raises(ValueError, match="weights"):
        accuracy_summary([0.5, 0.5], [1.0])


def test_recorder_writes_each_round_as_it_ends(tmp_path):
    rec = RunRecorder(tmp_path / "run", plots=True, progress=False)
    rec.start("seed: 0\n", {"devices": []})
    row = {"round": 1, "seconds": 1.5, "personalised_accuracy_mean": 0.5, "global_accuracy_mean": math.nan,
           "bytes_up_per_device": 100.0, "failures": []}
    rec.record(row)
    # after one round, the round and a summary are already on disk
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["personalised_accuracy_mean"] == 0.5
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["global_accuracy_mean"] is None  # NaN -> null
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 1
    rec.record(dict(row, round=2, personalised_accuracy_mean=0.7))
    summary = rec.finish({"strategy": "local"})
    assert summary["final_personalised_accuracy_mean"] == 0.7
    assert summary["best_personalised_accuracy_mean"] == 0.7
    assert summary["strategy"] == "local"
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).is_file(), name


def test_a_torn_last_line_loses_only_that_round(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert [r["round"] for r in read_metrics(path)] == [1, 2]


def test_final_figures_best_and_last():
    rows = [
        {"round": 1, "personalised_accuracy_mean": 0.6, "seconds": 1.0},
        {"round": 2, "personalised_accuracy_mean": 0.8, "seconds": 1.0},
        {"round": 3, "personalised_accuracy_mean": 0.7, "seconds": 2.0},
    ]
    f = final_figures(rows)
    assert f["final_personalised_accuracy_mean"] == 0.7
    assert f["best_personalised_accuracy_mean"] == 0.8
    assert f["wall_seconds"] == 4.0
