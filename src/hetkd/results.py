"""Run results: per-round summaries, files written as the run goes, final figures.

A run folder holds

* ``config.yaml``   the resolved configuration (reload it with ``hetkd run``),
* ``federation.json`` dataset sizes and every device's architecture and labels,
* ``metrics.jsonl`` one JSON object per round, appended and flushed as soon as
  the round ends, so a crash loses at most the round in flight,
* ``summary.json``  the final figures (last and best round), rewritten after
  every round,
* ``accuracy.png``  personalised and global accuracy per round.

The accuracy statistics are pure functions (:func:`accuracy_summary`) so they
are tested alone and shared by every strategy. When the run has adversarial
devices (``adversary.fraction``, marked in ``federation.json``), every
evaluated round also gets the honest devices' figures (:func:`honest_figures`:
``honest_personalised_accuracy_mean``, ``honest_global_accuracy_mean``) and the
summary their last and best values.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["OutputConfig", "accuracy_summary", "RunRecorder", "final_figures", "read_metrics", "format_round",
           "subset_accuracy", "honest_figures", "HONEST_KEYS", "write_atomic"]


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """Where results go: ``root/run_name`` unless ``dir`` is set.

    ``plots`` writes figures, ``progress`` shows a progress bar on a terminal,
    ``quiet`` prints only where results went (no per-round table).
    """

    root: str = "outputs"
    dir: str = ""
    run_name: str = ""
    plots: bool = True
    progress: bool = True
    quiet: bool = False


def accuracy_summary(
    accuracies: Sequence[float], weights: Sequence[float] | None = None, prefix: str = ""
) -> dict[str, float]:
    """Mean, std, worst-10% and sample-weighted mean of per-device accuracies.

    ``worst10`` is the mean over the worst ceil(10%) of devices (the worst
    device when there are fewer than 20); ``weighted`` is total correct over
    total test samples, the figure HtFLlib/PFLlib report. NaNs (devices without
    test data) are ignored; with no finite value every figure is NaN.
    """
    acc = np.asarray(accuracies, dtype=np.float64)
    w = np.ones_like(acc) if weights is None else np.asarray(weights, dtype=np.float64)
    if acc.shape != w.shape:
        raise ValueError(f"{len(acc)} accuracies but {len(w)} weights")
    keep = np.isfinite(acc) & (w > 0)
    acc, w = acc[keep], w[keep]
    if len(acc) == 0:
        return {f"{prefix}{k}": math.nan for k in ("mean", "std", "worst10", "weighted")}
    k = max(1, math.ceil(0.1 * len(acc)))
    return {
        f"{prefix}mean": float(acc.mean()),
        f"{prefix}std": float(acc.std()),
        f"{prefix}worst10": float(np.sort(acc)[:k].mean()),
        f"{prefix}weighted": float((acc * w).sum() / w.sum()),
    }


def subset_accuracy(rows: Sequence[Mapping[str, Any]], device_ids: Sequence[int],
                    key: str = "personalised_accuracy") -> float | None:
    """Mean of a per-device figure over ``device_ids`` in the last round that has it."""
    wanted = {str(d) for d in device_ids}
    for row in reversed(rows):
        values = [v.get(key) for k, v in (row.get("devices") or {}).items() if k in wanted]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if values:
            return float(np.mean(values))
    return None


#: the honest devices' figures of a round with adversaries (see :func:`honest_figures`)
HONEST_KEYS = ("honest_personalised_accuracy_mean", "honest_global_accuracy_mean")


def honest_figures(row: Mapping[str, Any], adversaries: Sequence[int]) -> dict[str, float | None]:
    """The mean personalised and global accuracy of a round's honest devices: every device in
    the row's ``devices`` but the ``adversaries`` and the round's failures."""
    left_out = {str(d) for d in adversaries} | {str(f.get("device")) for f in row.get("failures") or []}
    out: dict[str, float | None] = {}
    for key, figure in zip(HONEST_KEYS, ("personalised_accuracy", "global_accuracy")):
        values = [v.get(figure) for k, v in (row.get("devices") or {}).items() if k not in left_out]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        out[key] = float(np.mean(values)) if values else None
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` (text is written as UTF-8) so that a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one: a temporary file beside
    it, flushed to disk, then renamed over it."""
    path = Path(path)
    blob = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rounds recorded in a ``metrics.jsonl`` (a torn last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


FINAL_KEYS = (
    "personalised_accuracy_mean",
    "personalised_accuracy_std",
    "personalised_accuracy_worst10",
    "personalised_accuracy_weighted",
    "global_accuracy_mean",
    "global_accuracy_std",
)


def final_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Last-round and best-round figures plus totals, from per-round rows."""
    out: dict[str, Any] = {"rounds": len(rows)}
    evaluated = [r for r in rows if r.get("personalised_accuracy_mean") is not None]
    for key in FINAL_KEYS:
        values = [r.get(key) for r in evaluated if r.get(key) is not None]
        out[f"final_{key}"] = values[-1] if values else None
        if not key.endswith("_std"):
            out[f"best_{key}"] = max(values) if values else None
    for key in HONEST_KEYS:  # runs with adversarial devices only
        values = [r[key] for r in evaluated if r.get(key) is not None]
        if values:
            out[f"final_{key}"], out[f"best_{key}"] = values[-1], max(values)
    spent: dict[str, float] = {}  # each DP device's latest epsilon (it only grows)
    for r in rows:
        spent.update({d: v["epsilon"] for d, v in (r.get("devices") or {}).items() if v.get("epsilon") is not None})
    if spent:
        out["final_epsilon_max"] = max(spent.values())
        out["final_epsilon_mean"] = float(np.mean(list(spent.values())))
    student = [r["student_accuracy"] for r in rows if r.get("student_accuracy") is not None]
    if student:  # the server's global student (ensemble-distillation strategies)
        out["final_student_accuracy"] = student[-1]
        out["best_student_accuracy"] = max(student)
    for key in ("bytes_up_per_device", "bytes_down_per_device"):
        values = [r[key] for r in rows if r.get(key) is not None]
        out[f"mean_{key}_per_round"] = float(np.mean(values)) if values else None
    out["wall_seconds"] = float(sum(r.get("seconds", 0.0) for r in rows))
    peaks = [r.get("server_peak_rss_mb") for r in rows if r.get("server_peak_rss_mb")]
    out["server_peak_rss_mb"] = max(peaks) if peaks else None
    peaks = [r.get("device_peak_rss_mb") for r in rows if r.get("device_peak_rss_mb")]
    out["device_peak_rss_mb"] = max(peaks) if peaks else None
    out["failures"] = int(sum(len(r.get("failures", [])) for r in rows))
    return out


def _pct(value: Any) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:5.1f}%"


def format_round(row: Mapping[str, Any]) -> str:
    """One line of the console table."""
    up = row.get("bytes_up_per_device") or 0
    down = row.get("bytes_down_per_device") or 0
    std = row.get("personalised_accuracy_std")
    std_txt = f"±{100 * std:4.1f}" if isinstance(std, float) and math.isfinite(std) else "     "
    return (
        f"{row['round']:>5}  {_pct(row.get('personalised_accuracy_mean'))}{std_txt}  "
        f"{_pct(row.get('personalised_accuracy_worst10'))}  {_pct(row.get('global_accuracy_mean'))}  "
        f"{up / 1024:9.1f}  {down / 1024:9.1f}  {row.get('seconds', 0):7.1f}  {len(row.get('failures', []))}"
    )


TABLE_HEADER = (
    "round  personalised   worst10  global     up KiB/dev  down KiB/dev  seconds  failed"
)


class RunRecorder:
    """Writes a run's files as it goes and prints a per-round table.

    Call :meth:`start` once with the config text and federation summary,
    :meth:`record` after every round, :meth:`finish` at the end.
    """

    def __init__(
        self, out_dir: str | Path, plots: bool = True, progress: bool = True, total_rounds: int = 0, quiet: bool = False
    ) -> None:
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.plots = plots
        self.quiet = quiet
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()
        self.total_rounds = total_rounds
        self._console = None
        self._progress = None
        self._task = None
        self._want_progress = progress
        #: the adversarial devices of the run (from ``federation.json``), whose figures honest ones leave out
        self.adversaries: list[int] = []

    @property
    def console(self):  # rich is imported lazily: devices never need it
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True)
        return self._console

    def start(self, config_yaml: str, federation: Mapping[str, Any] | None = None, header: str = "",
              rows: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Write the run's config and data picture; ``rows``: a resumed run's rounds so far (kept, and shown again)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.out_dir / "config.yaml", config_yaml)
        if federation is not None:
            self.adversaries = [d["device_id"] for d in federation.get("devices", []) if d.get("adversary")]
            write_atomic(self.out_dir / "federation.json", json.dumps(_clean(federation), indent=1, default=_json_default))
        self.rows = [dict(row) for row in rows or ()]
        write_atomic(self.out_dir / "metrics.jsonl",
                      "".join(json.dumps(row, default=_json_default) + "\n" for row in self.rows))
        if self.quiet:
            return
        if header:
            self.console.print(header)
        self.console.print(f"results: {self.out_dir}")
        self.console.print(TABLE_HEADER)
        for row in self.rows:
            self.console.print(format_round(row))
        if self._want_progress and self.console.is_terminal and self.total_rounds:
            from rich.progress import Progress

            self._progress = Progress(transient=True, console=self.console)
            self._progress.start()
            self._task = self._progress.add_task("rounds", total=self.total_rounds, completed=len(self.rows))

    def record(self, row: Mapping[str, Any]) -> None:
        """Append one round (a flat-ish dict with a ``round`` key) and flush it to disk."""
        row = _clean(dict(row))
        if self.adversaries and row.get("personalised_accuracy_mean") is not None:
            row.update(honest_figures(row, self.adversaries))
        self.rows.append(row)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        write_atomic(self.out_dir / "summary.json", json.dumps(final_figures(self.rows), indent=1))
        if not self.quiet:
            self.console.print(format_round(row))
        if self._progress is not None:
            self._progress.update(self._task, advance=1)

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write the final ``summary.json`` (plus ``extra``) and the plot; return the summary."""
        if self._progress is not None:
            self._progress.stop()
        summary = final_figures(self.rows)
        summary["total_seconds"] = time.time() - self.started
        summary["out_dir"] = str(self.out_dir)
        if self.adversaries:
            summary["adversarial_devices"] = list(self.adversaries)
        summary.update(_clean(dict(extra or {})))
        write_atomic(self.out_dir / "summary.json", json.dumps(summary, indent=1, default=_json_default))
        if self.plots and self.rows:
            from hetkd.plots import plot_accuracy

            plot_accuracy(self.rows, self.out_dir / "accuracy.png")
        fin = summary.get("final_personalised_accuracy_mean")
        glob = summary.get("final_global_accuracy_mean")
        if self.quiet:
            return summary
        student = summary.get("final_student_accuracy")
        self.console.print(
            f"final: personalised {_pct(fin)}  global {_pct(glob)}  "
            + (f"global student {_pct(student)}  " if student is not None else "")
            + (f"honest devices' global {_pct(summary.get('final_honest_global_accuracy_mean'))}  "
               if self.adversaries else "")
            + f"wall {summary['wall_seconds']:.1f}s  results in {self.out_dir}"
        )
        return summary
