"""``hetkd compare``: strategies side by side on identical partitions, models and seeds.

    hetkd compare CONFIG --strategies central,local,fedmd,sd-dist --seeds 3 [--out DIR] [key=value ...]

Every strategy runs on the same config (only ``strategy.name`` changes), so
partitions, architectures and initial weights are identical; each seed is run
for every strategy. Writes into ``DIR``:

* ``compare.json`` per strategy: mean, std and per-seed values of the final
  personalised accuracy (mean, worst 10 %, sample-weighted, sparse devices),
  global accuracy, bytes per device per round and wall seconds; the run folders;
* ``compare.md``   the same as a table;
* ``compare.png``  personalised and global accuracy per round (mean over seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

import hetkd.simulations.runner as runner
from hetkd.config import ConfigError, HetkdConfig, to_yaml
from hetkd.interrupt import RunInterrupted, stop_on_signals
from hetkd.results import read_metrics
from hetkd.simulations.checkpoint import CHECKPOINT_FILE
from hetkd.simulations.cli import add_items_arguments, config_from_args
from hetkd.simulations.experiment import resolve_data_path
from hetkd.simulations.registry import CENTRAL, check_strategy, unread_settings

__all__ = ["compare", "add_parser", "FIGURES"]

#: figures compared, as (summary key, column title, is a fraction)
FIGURES = (
    ("final_personalised_accuracy_mean", "personalised", True),
    ("final_personalised_accuracy_worst10", "worst 10%", True),
    ("final_personalised_accuracy_weighted", "pers. sample-weighted", True),
    ("best_personalised_accuracy_weighted", "pers. sample-weighted, best round", True),
    ("best_personalised_accuracy_mean", "pers. best round", True),
    ("final_global_accuracy_mean", "global", True),
    ("final_honest_personalised_accuracy_mean", "personalised, honest devices", True),
    ("final_honest_global_accuracy_mean", "global, honest devices", True),
    ("final_student_accuracy", "global student", True),
    ("final_personalised_accuracy_sparse", "sparse devices", True),
    ("final_epsilon_max", "ε, largest device", None),
    ("final_epsilon_mean", "ε, mean device", None),
    ("bytes_per_device_per_round", "bytes/device/round", False),
    ("wall_seconds", "wall s", False),
)
#: columns shown only where some run has them (adversarial devices, DP devices)
OPTIONAL_FIGURES = ("_honest_", "_epsilon_")


def _stats(values: list[float | None]) -> dict[str, Any]:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "values": values}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "values": values}


def _with_total_bytes(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` plus ``bytes_per_device_per_round`` (up + down)."""
    up = summary.get("mean_bytes_up_per_device_per_round") or 0.0
    down = summary.get("mean_bytes_down_per_device_per_round") or 0.0
    return summary | {"bytes_per_device_per_round": up + down}


def finished_run(cfg: HetkdConfig) -> dict[str, Any] | None:
    """The summary of a run of exactly ``cfg`` already complete in ``cfg.output.dir``, if any.

    Complete means ``summary.json`` records every round, and the ``config.yaml``
    beside it is :func:`the same run <same_run>`.
    """
    summary_file = Path(cfg.output.dir) / "summary.json"
    if not (summary_file.is_file() and same_run(cfg)):
        return None
    summary = json.loads(summary_file.read_text())
    if summary.get("failed") or summary.get("interrupted"):
        return None
    if summary.get("rounds") != cfg.simulation.num_rounds and cfg.strategy.name != CENTRAL:
        return None
    return summary


def same_run(cfg: HetkdConfig) -> bool:
    """Whether the ``config.yaml`` in ``cfg.output.dir`` equals ``cfg`` in everything but the
    ``output`` settings, where devices keep their state, and the sections the strategy never
    reads (:func:`~hetkd.simulations.registry.unread_settings`: a change to
    ``strategy.sd_dist`` reruns SD-Dist, not local-only)."""
    config_file = Path(cfg.output.dir) / "config.yaml"
    if not config_file.is_file():
        return False
    unread = unread_settings(cfg.strategy.name)

    def settings(text: str) -> dict[str, Any]:
        values: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(text))  # type: ignore[assignment]
        values.pop("output", None)
        (values.get("simulation") or {}).pop("state_store", None)
        for section in unread:
            *parents, key = section.split(".")
            holder = values
            for parent in parents:
                holder = holder.get(parent) or {}
            holder.pop(key, None)
        return values

    return settings(config_file.read_text()) == settings(to_yaml(resolve_data_path(cfg)))


def _run(cfg: HetkdConfig, resume: bool) -> dict[str, Any]:
    """``cfg``'s summary: read back when complete in its folder (with ``resume``), the interrupted
    run there gone on with when it can be, run from the start otherwise."""
    finished = finished_run(cfg) if resume else None
    if finished is not None:
        return finished | {"reused": True}
    if resume and (Path(cfg.output.dir) / CHECKPOINT_FILE).is_file() and same_run(cfg):
        try:
            return runner.run(cfg, resume=True)  # the module's, so tests can stand in for it
        except ConfigError:  # another config, or the devices' state is gone: start over
            pass
    return runner.run(cfg)


def compare(
    cfg: HetkdConfig, strategies: list[str], seeds: list[int], out: Path, command: str = "", resume: bool = False
) -> dict[str, Any]:
    """Run every strategy for every seed; write and return the comparison.

    A run that fails is reported (``failed_runs`` in ``compare.json``, a line in
    ``compare.md``) and left out of the statistics; the others go on. ``command``
    (the command line that asked for the comparison) is written beside the table.
    With ``resume``, runs already complete in ``out`` with the same config
    (:func:`finished_run`) are read back instead of run again, so an
    interrupted comparison goes on where it stopped. SIGINT / SIGTERM stop
    the comparison after the current run's last completed round: the table is
    written for the runs finished before, then
    :class:`~hetkd.interrupt.RunInterrupted` is raised.
    """
    if not strategies:
        raise ConfigError("--strategies", "name at least one strategy")
    for name in strategies:
        check_strategy(replace(cfg, strategy=replace(cfg.strategy, name=name)))
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    import ray
    from rich.console import Console
    from rich.progress import Progress


    console = Console(highlight=False, soft_wrap=True)
    results: dict[str, dict[str, Any]] = {name: {"runs": [], "failed": [], "reused": []} for name in strategies}
    interrupted: RunInterrupted | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(runner.ray_environment(cfg))
        # one Ray session for all runs; none when only the pooled baseline runs (in this process)
        if any(name != CENTRAL for name in strategies) and runner.start_ray(cfg):
            stack.callback(ray.shutdown)
        stack.enter_context(stop_on_signals())  # one request stops the comparison, not just its current run
        with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
            task = progress.add_task("compare", total=len(strategies) * len(seeds))
            for seed in seeds:
                if interrupted is not None:
                    break
                for name in strategies:
                    run_cfg = replace(
                        cfg,
                        seed=seed,
                        strategy=replace(cfg.strategy, name=name),
                        output=replace(cfg.output, dir=str(out / name / f"seed{seed}"), run_name="",
                                       quiet=True, progress=False),
                    )
                    t0 = time.perf_counter()
                    try:
                        summary = _with_total_bytes(_run(run_cfg, resume))
                        finished = summary.pop("reused", False)
                    except RunInterrupted as err:
                        interrupted = err
                        console.print(f"{name:>10} seed {seed}: stopped ({err}); `--resume` goes on from here")
                        break
                    except Exception as err:  # one broken run must not lose the others
                        results[name]["failed"].append({"seed": seed, "error": f"{type(err).__name__}: {err}"})
                        console.print(f"{name:>10} seed {seed}: FAILED ({type(err).__name__}: {err})")
                        progress.advance(task)
                        continue
                    results[name]["runs"].append(summary)
                    if finished:
                        results[name]["reused"].append(seed)
                    console.print(
                        f"{name:>10} seed {seed}: personalised {summary.get('final_personalised_accuracy_mean') or 0:.3f}"
                        f"  global {summary.get('final_global_accuracy_mean') or 0:.3f}  ({time.perf_counter() - t0:.0f}s)"
                    )
                    progress.advance(task)

    table: dict[str, Any] = {}
    for name, entry in results.items():
        runs = entry["runs"]
        table[name] = {key: _stats([r.get(key) for r in runs]) for key, _, _ in FIGURES}
        table[name]["run_dirs"] = [r["out_dir"] for r in runs]
        table[name]["failed_runs"] = entry["failed"]
        table[name]["reused_seeds"] = entry["reused"]
        table[name]["largest_model_bytes"] = max((r.get("largest_model_bytes") or 0 for r in runs), default=0)
        zoo = next((r["zoo_largest_model"] for r in runs if r.get("zoo_largest_model")), None)
        table[name]["zoo_largest_model"] = zoo
        sent = table[name]["bytes_per_device_per_round"]["mean"]
        # what this strategy sends per device per round, against FedAvg with the zoo's largest model
        table[name]["bytes_fraction_of_fedavg_zoo_largest"] = sent / (2 * zoo["bytes"]) if sent and zoo else None
    payload = {"seeds": seeds, "strategies": table, "command": command,
               "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    if interrupted is not None:
        payload["interrupted"] = str(interrupted)
    (out / "compare.json").write_text(json.dumps(payload, indent=1) + "\n")
    stopped = f"\nStopped early ({interrupted}): the same command with `--resume` finishes it.\n" if interrupted else ""
    (out / "compare.md").write_text(_markdown(table, seeds, command) + stopped)
    _plot(table, out / "compare.png")
    console.print(_markdown(table, seeds, command))
    console.print(f"comparison written to {out}")
    if interrupted is not None:  # the table holds the runs finished before the stop
        raise interrupted
    return payload


def _cell(stat: dict[str, Any], fraction: bool | None) -> str:
    """``fraction``: a percentage; ``False``: a count; ``None``: a privacy budget ε."""
    if stat["mean"] is None:
        return "–"
    if fraction is None:
        return f"{stat['mean']:.2f} ± {stat['std']:.2f}"
    if fraction:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:,.0f} ± {stat['std']:,.0f}"


def _markdown(table: dict[str, Any], seeds: list[int], command: str = "") -> str:
    # the honest devices' columns only where some run had adversarial devices (adversary.fraction),
    # the privacy budget's where some had DP devices (privacy.enabled)
    figures = [f for f in FIGURES if not any(part in f[0] for part in OPTIONAL_FIGURES)
               or any(row[f[0]]["mean"] is not None for row in table.values())]
    head = "| strategy | " + " | ".join(title for _, title, _ in figures) + " |"
    rule = "|" + "---|" * (len(figures) + 1)
    lines = [f"Made with `{command}`.", ""] if command else []
    lines += [f"Accuracy in %, mean ± std over seeds {seeds} (final round unless noted).", "", head, rule]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[key], frac) for key, _, frac in figures) + " |")
    for name, row in table.items():
        for failure in row.get("failed_runs", []):
            lines.append(f"\n{name}, seed {failure['seed']} failed and is left out: {failure['error']}")
    reused = [f"{name} (seeds {', '.join(map(str, row['reused_seeds']))})"
              for name, row in table.items() if row.get("reused_seeds")]
    if reused:
        lines += ["", "Read back from earlier runs of the same settings in this folder (`--resume`): "
                  + "; ".join(reused) + "."]
    largest = max((row.get("largest_model_bytes") or 0 for row in table.values()), default=0)
    zoo = next((row["zoo_largest_model"] for row in table.values() if row.get("zoo_largest_model")), None)
    if largest or zoo:
        lines += ["", "For scale, FedAvg moves a model's weights down and up every round:"]
    if largest:
        lines.append(f"- with the largest model in these runs: {2 * largest:,} bytes per device per round;")
    if zoo:
        lines.append(f"- with the largest model of the zoo for this data ({zoo['architecture']}): "
                     f"{2 * zoo['bytes']:,} bytes per device per round.")
        shares = [f"{name} {100 * row['bytes_fraction_of_fedavg_zoo_largest']:.2g}%" for name, row in table.items()
                  if row.get("bytes_fraction_of_fedavg_zoo_largest")]
        if shares:
            lines.append("Bytes per device per round as a share of the latter: " + ", ".join(shares) + ".")
    return "\n".join(lines) + "\n"


def _plot(table: dict[str, Any], path: Path) -> None:
    from hetkd.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, row in table.items():
        for ax, key in zip(axes, ("personalised_accuracy_mean", "global_accuracy_mean")):
            curves = [read_metrics(Path(d) / "metrics.jsonl") for d in row["run_dirs"]]
            rounds = sorted({r["round"] for c in curves for r in c if r.get(key) is not None})
            means = [np.mean([r[key] for c in curves for r in c if r["round"] == k and r.get(key) is not None])
                     for k in rounds]
            ax.plot(rounds, means, marker="o", markersize=3, label=name)
    for ax, title in zip(axes, ("personalised accuracy (mean over devices)", "global accuracy (mean over devices)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmd(args: argparse.Namespace) -> int:

    if args.seeds < 1:
        raise ConfigError("--seeds", f"must be >= 1, got {args.seeds}")
    cfg = config_from_args(args.items)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = [cfg.seed + k for k in range(args.seeds)]
    name = Path(args.items[0]).stem if args.items and "=" not in args.items[0] else "default"
    out = Path(args.out) if args.out else Path(cfg.output.root) / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = " ".join(["hetkd compare", *map(shlex.quote, args.items), "--strategies", args.strategies,
                        "--seeds", str(args.seeds)])
    if args.resume:
        command += " --resume"
    if args.resume and not args.out:
        raise ConfigError("--resume", "needs --out DIR: the folder of the comparison to go on with")
    compare(cfg, strategies, seeds, out, command, resume=args.resume)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("compare", help="run several strategies on identical partitions and seeds")
    add_items_arguments(p)
    p.add_argument("--strategies", default="central,local,fedmd,sd-dist",
                   help="comma-separated strategy names (plus 'central', the pooled-data upper bound)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (config seed, seed+1, ...)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs already complete in --out with the same config, as far as their strategy "
                        "reads it (go on after an interruption; change one strategy's settings)")
    p.set_defaults(func=_cmd)
