"""``hetkd bench CONFIG [--out DIR]``: how hetkd scales, measured (``bench.json`` + ``bench.png``).

Four parts (``bench.parts``), each a function that returns plain JSON rows:

1. :func:`bench_scale` — real simulations (Flower + Ray, the config's
   strategy and state store) of ``bench.populations`` devices, and of the
   largest population with ``bench.sampled`` devices per round: wall time of
   every round, and the peak resident memory of this process and all its
   descendants (the Ray head, raylet and worker processes), summed, sampled
   every ``bench.memory_poll_seconds`` by :class:`TreeMemoryMonitor`;
2. :func:`bench_overhead` — the same local work (devices, epochs, batches,
   reference predictions, SD-Dist's targets) once as a plain PyTorch loop in
   this process and once through Flower + Ray with one actor, so both run one
   device at a time on one thread: the ratio Flower-time / plain-time per
   round, and where Flower's extra time goes (the device handler's set-up
   and state store vs Flower's messaging);
3. :func:`bench_bytes` — bytes per device and round, metered as Flower
   serialises them, for ``bench.byte_strategies`` with every zoo model that
   takes the data (short runs on an in-process grid, no Ray);
4. :func:`bench_similarity` — SD-Dist's neighbour search
   (:func:`hetkd.distill.neighbour_plan`, every device a learner) against
   population size, exact and as configured (sampled above
   ``strategy.sd_dist.exact_search_max``).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from hetkd.config import BENCH_PARTS, HetkdConfig, apply_overrides, to_yaml
from hetkd.results import read_metrics

__all__ = [
    "TreeMemoryMonitor",
    "bench_scale",
    "bench_overhead",
    "bench_bytes",
    "bench_similarity",
    "run_bench",
    "add_parser",
]

GIB = float(1 << 30)


class TreeMemoryMonitor:
    """Peak resident memory of a process and all its descendants, summed, sampled in a thread.

    Shared pages (e.g. Ray's object store mapped into several processes) count
    once per process, so the sum is an upper bound on what the tree holds.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.5) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.process = psutil.Process(pid if pid is not None else os.getpid())
        self.interval = interval
        self.peak_total = 0
        self.peak_root = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def sample(self) -> tuple[int, int, int]:
        """``(total RSS bytes, root RSS bytes, number of processes)`` now."""
        root = self.process.memory_info().rss
        total, count = root, 1
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
                count += 1
            except psutil.Error:  # it ended between listing and reading
                continue
        return total, root, count

    def _poll(self) -> None:
        while not self._stop.is_set():
            total, root, count = self.sample()
            self.peak_total = max(self.peak_total, total)
            self.peak_root = max(self.peak_root, root)
            self.peak_processes = max(self.peak_processes, count)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def as_row(self) -> dict[str, float]:
        return {
            "peak_rss_total_gib": self.peak_total / GIB,
            "peak_rss_server_gib": self.peak_root / GIB,
            "peak_rss_workers_gib": (self.peak_total - self.peak_root) / GIB if self.peak_total else 0.0,
            "max_processes": self.peak_processes,
        }


def _override(cfg: HetkdConfig, *items: str) -> HetkdConfig:
    """``cfg`` with dotted overrides, validated."""
    from omegaconf import OmegaConf

    from hetkd.config import validate_config

    merged = apply_overrides(OmegaConf.structured(cfg), list(items))
    result: HetkdConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate_config(result)
    return result


# --------------------------------------------------------------------------- 1. scale


def _simulate(cfg: HetkdConfig, out: Path, interval: float) -> dict[str, Any]:
    """One Flower + Ray simulation under a memory monitor: round times and peak memory."""
    from hetkd.simulations.runner import run

    started = time.perf_counter()
    with TreeMemoryMonitor(interval=interval) as monitor:
        run(cfg)
    total = time.perf_counter() - started
    rows = read_metrics(out / "metrics.jsonl")
    seconds = [float(r["seconds"]) for r in rows]
    return {
        "devices": cfg.simulation.num_devices,
        "sampled": max((int(r["sampled"]) for r in rows), default=0),
        "rounds_completed": len(rows),
        "round_seconds": seconds,
        "mean_round_seconds": float(np.mean(seconds)) if seconds else None,
        "total_seconds": total,
        "setup_seconds": total - sum(seconds),
        "failures": sum(len(r.get("failures", [])) for r in rows),
        "bytes_up_per_device": [r.get("bytes_up_per_device") for r in rows],
        "bytes_down_per_device": [r.get("bytes_down_per_device") for r in rows],
        **monitor.as_row(),
    }


def bench_scale(cfg: HetkdConfig, out: Path) -> dict[str, Any]:
    """Round time and peak memory against population size and against devices per round."""
    b = cfg.bench
    largest = max(b.populations)
    # (devices, sampled per round): the config's fraction at each population, then
    # the largest population with each count of sampled devices
    runs: dict[tuple[int, int], None] = {}
    for n in sorted(b.populations):
        runs[(n, max(1, int(round(cfg.strategy.fraction_train * n))))] = None
    for k in sorted(b.sampled):
        runs[(largest, min(k, largest))] = None
    rows = []
    for n, k in runs:
        run_dir = out / "runs" / f"scale-n{n}-k{k}"
        run_cfg = _override(
            cfg, f"simulation.num_devices={n}", f"strategy.fraction_train={k / n}",
            f"simulation.num_rounds={b.bench_rounds}", f"output.dir={run_dir}", "output.progress=false",
            "output.quiet=true", "output.plots=false",
        )
        print(f"[bench] scale: {n} devices, {k} per round, {b.bench_rounds} rounds", flush=True)
        row = _simulate(run_cfg, run_dir, b.memory_poll_seconds)
        print(f"[bench]   mean round {row['mean_round_seconds']:.1f} s, peak RSS {row['peak_rss_total_gib']:.2f} GiB",
              flush=True)
        rows.append(row)
    return {
        "strategy": cfg.strategy.name,
        "state_store": cfg.simulation.state_store,
        "by_population": [r for r in rows if (r["devices"], r["sampled"]) in
                          {(n, max(1, int(round(cfg.strategy.fraction_train * n)))) for n in b.populations}],
        "by_sampled": [r for r in rows if r["devices"] == largest],
        "runs": rows,
    }


# --------------------------------------------------------------------------- 2. overhead


def _overhead_config(cfg: HetkdConfig, out: Path) -> HetkdConfig:
    b = cfg.bench
    return _override(
        cfg, f"simulation.num_devices={b.overhead_devices}", "strategy.fraction_train=1.0",
        "strategy.fraction_evaluate=0.0", f"simulation.num_rounds={b.overhead_rounds}",
        "models.assignment=homogeneous", f"models.architectures=[{b.overhead_architecture}]",
        f"training.local_epochs={b.overhead_epochs}", "training.num_threads=1",
        # one actor: the Flower side runs one device at a time, like the plain loop
        "simulation.ray_num_cpus=1", "simulation.cpus_per_device=1",
        f"output.dir={out}", "output.progress=false", "output.quiet=true", "output.plots=false",
    )


def plain_rounds(cfg: HetkdConfig) -> list[dict[str, float]]:
    """The Flower run's work as a plain PyTorch loop in this process: per round, every
    device trains (towards SD-Dist targets after the warm-up) and predicts on the
    reference set; then the server's neighbour search forms the next targets."""
    from hetkd.clients.device import DistillClient
    from hetkd.data import build_federation
    from hetkd.distill.codec import decode_logits, encode_logits
    from hetkd.distill.similarity import mix_targets, neighbour_plan
    from hetkd.simulations.registry import build_strategy

    torch.set_num_threads(cfg.training.num_threads)
    federation = build_federation(cfg)
    strategy = build_strategy(cfg, federation, to_yaml(cfg))  # for its settings only
    kd = cfg.strategy.kd
    clients = [DistillClient.from_config(cfg, i) for i in range(cfg.simulation.num_devices)]
    targets: dict[int, torch.Tensor] = {}
    rows = []
    for server_round in range(1, cfg.simulation.num_rounds + 1):
        started = time.perf_counter()
        train_seconds = 0.0
        predictions = []
        for client in clients:
            target = targets.get(client.device_id)
            if target is None:
                metrics = client.fit(server_round)
            else:
                metrics = client.fit_towards(
                    server_round, target, rho=kd.rho, temperature=kd.temperature,
                    reference_batch_size=kd.reference_batch_size,
                    kd_scale=kd.temperature**2 if kd.t_squared else 1.0, min_steps=kd.min_steps,
                )
            train_seconds += metrics["train-seconds"]
            # what travels: log-probabilities at the configured precision
            predictions.append(decode_logits(encode_logits(client.reference_logits(), kd.precision)).log_softmax(-1))
        if server_round + 1 > kd.warmup_rounds and cfg.strategy.name == "sd-dist":
            logits = torch.stack(predictions)
            sd = cfg.strategy.sd_dist
            weights, _, _ = neighbour_plan(
                logits, list(range(len(clients))), num_neighbours=sd.num_neighbours,
                num_candidates=sd.num_candidates, rule=sd.neighbour_rule, similarity=sd.similarity,
                weighting=sd.weighting, temperature=kd.temperature, quality=strategy.quality(logits),  # type: ignore[attr-defined]
                exact_search_max=sd.exact_search_max, search_sample=sd.search_sample,
            )
            mixed = mix_targets(weights, logits, kd.mix, kd.temperature)
            targets = {i: mixed[i] for i in range(len(clients)) if float(weights[i].sum()) > 0}
        rows.append({"round": server_round, "seconds": time.perf_counter() - started, "train_seconds": train_seconds})
    return rows


def bench_overhead(cfg: HetkdConfig, out: Path) -> dict[str, Any]:
    """Flower-time / plain-time per round for the same local work."""
    from hetkd.simulations.runner import run

    run_dir = out / "runs" / "overhead-flower"
    ocfg = _overhead_config(cfg, run_dir)
    print(f"[bench] overhead: plain loop, {ocfg.simulation.num_devices} devices x "
          f"{ocfg.training.local_epochs} epochs x {ocfg.simulation.num_rounds} rounds", flush=True)
    plain = plain_rounds(ocfg)
    print("[bench] overhead: the same through Flower + Ray (one actor)", flush=True)
    run(ocfg)
    flower = read_metrics(run_dir / "metrics.jsonl")
    per_round = []
    for p, f in zip(plain, flower):
        handler = float(f.get("devices_handler_seconds") or 0.0)
        train = float(f.get("devices_train_seconds") or 0.0)
        per_round.append({
            "round": p["round"],
            "plain_seconds": p["seconds"],
            "plain_train_seconds": p["train_seconds"],
            "flower_seconds": float(f["seconds"]),
            "flower_train_seconds": train,
            "flower_handler_seconds": handler,
            # inside the device's handler but not training: client set-up, state load/save, predictions
            "handler_extra_seconds": handler - train,
            # outside any handler: Flower's messaging, Ray, (de)serialisation, the server's work
            "outside_handler_seconds": float(f["seconds"]) - handler,
            "ratio": float(f["seconds"]) / p["seconds"],
            "plain_seconds_per_device": p["seconds"] / ocfg.simulation.num_devices,
        })
    total_ratio = sum(r["flower_seconds"] for r in per_round) / sum(r["plain_seconds"] for r in per_round)
    return {
        "devices_per_round": ocfg.simulation.num_devices,
        "architecture": ocfg.models.architectures[0],
        "local_epochs": ocfg.training.local_epochs,
        "state_store": ocfg.simulation.state_store,
        "per_round": per_round,
        "ratio": total_ratio,
    }


# --------------------------------------------------------------------------- 3. bytes


def _byte_config(cfg: HetkdConfig, strategy: str, architecture: str, out: Path) -> HetkdConfig:
    """A short run that reaches the strategy's steady state with little local work."""
    items = [
        f"strategy.name={strategy}", "simulation.num_devices=2", "strategy.fraction_train=1.0",
        "strategy.fraction_evaluate=0.0", "models.assignment=homogeneous", f"models.architectures=[{architecture}]",
        "training.local_epochs=1", "partition.method=iid", "partition.min_samples=2",
        # bytes do not depend on the private data's size: keep the local work small
        f"dataset.num_samples={min(cfg.dataset.num_samples or 2000, 2000)}",
        "strategy.kd.min_steps=1", "strategy.ensemble.min_steps=1", "simulation.state_store=context",
        f"output.dir={out}", "output.progress=false", "output.quiet=true", "output.plots=false",
    ]
    if strategy in ("mekd", "feddf"):
        items += ["strategy.ensemble.warmup_rounds=1", "strategy.ensemble.server_steps=1", "mekd.gan_steps=2",
                  "mekd.distill_steps=1", "mekd.gan_batch_size=4", "mekd.distill_batch_size=4"]
        rounds = 1 + (cfg.strategy.ensemble.deprivatize_rounds if strategy == "mekd" else 0) + 2
    elif strategy == "fedavg":
        rounds = 2
    else:
        rounds = cfg.strategy.kd.warmup_rounds + 2
    return _override(cfg, *items, f"simulation.num_rounds={rounds}")


def bench_bytes(cfg: HetkdConfig, out: Path) -> dict[str, Any]:
    """Bytes each way per device and round, metered on an in-process grid."""
    from hetkd.data import build_federation
    from hetkd.models import ModelError, available_architectures, build_model, state_bytes
    from hetkd.simulations.experiment import prepare
    from hetkd.simulations.local_grid import InProcessGrid
    from hetkd.simulations.registry import build_strategy, initial_arrays

    federation = build_federation(cfg)
    architectures = []
    for name in available_architectures():
        try:
            architectures.append((name, state_bytes(build_model(name, federation.input_shape, federation.num_classes))))
        except ModelError:
            continue  # does not take this input shape
    rows = []
    for strategy_name in cfg.bench.byte_strategies:
        for arch, model_bytes in architectures:
            run_dir = out / "runs" / f"bytes-{strategy_name}-{arch}"
            bcfg = _byte_config(cfg, strategy_name, arch, run_dir)
            prepared = prepare(bcfg)
            strategy = build_strategy(prepared.cfg, prepared.federation, prepared.config_yaml)
            reports: list[Any] = []
            strategy.start(  # type: ignore[attr-defined]
                grid=InProcessGrid(bcfg.simulation.num_devices),
                initial_arrays=initial_arrays(prepared.cfg, prepared.federation),
                num_rounds=bcfg.simulation.num_rounds, timeout=bcfg.simulation.round_timeout,
                on_round_end=reports.append,
            )
            up = [float(r.metrics.get("bytes_up_per_device") or 0.0) for r in reports]
            down = [float(r.metrics.get("bytes_down_per_device") or 0.0) for r in reports]
            rows.append({
                "strategy": strategy_name, "architecture": arch, "model_bytes": model_bytes,
                "rounds": len(reports), "up_per_round": up, "down_per_round": down,
                "steady_up": up[-1], "steady_down": down[-1], "max_down": max(down),
            })
            print(f"[bench] bytes {strategy_name:8s} {arch:12s} up {up[-1]:>10.0f} down {down[-1]:>10.0f}", flush=True)
    return {"reference_size": cfg.reference.size, "num_queries": cfg.strategy.ensemble.num_queries,
            "precision_kd": cfg.strategy.kd.precision, "precision_ensemble": cfg.strategy.ensemble.precision,
            "rows": rows}


# --------------------------------------------------------------------------- 4. similarity


def bench_similarity(cfg: HetkdConfig) -> dict[str, Any]:
    """Neighbour search in populations of ``bench.similarity_sizes`` devices, for
    ``bench.similarity_learners`` of them (1.0: every device a learner; 0.1: a round
    that samples 10 %), including the quality score and the targets' mixing."""
    from hetkd.distill.similarity import mix_targets, neighbour_plan, reference_quality

    b, sd, kd = cfg.bench, cfg.strategy.sd_dist, cfg.strategy.kd
    classes, reference = 10, b.similarity_reference
    rows = []
    generator = torch.Generator().manual_seed(cfg.seed)
    labels = torch.randint(0, classes, (reference,), generator=generator)
    for n in sorted(b.similarity_sizes):
        logits = torch.randn(n, reference, classes, generator=generator) * 2
        modes = [("configured", sd.exact_search_max)]
        if n <= b.similarity_exact_max:
            modes.insert(0, ("exact", 0))
        for fraction in b.similarity_learners:
            learners = sorted(torch.randperm(n, generator=generator)[: max(1, round(fraction * n))].tolist())
            for mode, limit in modes:
                for rule in ("quality_distance", "distance"):
                    started = time.perf_counter()
                    quality = reference_quality(logits, labels)
                    weights, _, _ = neighbour_plan(
                        logits, learners, num_neighbours=sd.num_neighbours, num_candidates=sd.num_candidates,
                        rule=rule, similarity=sd.similarity, weighting=sd.weighting, temperature=kd.temperature,
                        quality=quality, generator=torch.Generator().manual_seed(1),
                        exact_search_max=limit, search_sample=sd.search_sample,
                    )
                    mix_targets(weights, logits, kd.mix, kd.temperature)
                    seconds = time.perf_counter() - started
                    sampled = bool(limit) and rule == "distance" and n > limit
                    rows.append({"devices": n, "learners": len(learners), "reference": reference, "classes": classes,
                                 "rule": rule, "mode": mode, "sampled_search": sampled, "seconds": seconds})
                    print(f"[bench] similarity n={n:>6} learners={len(learners):>6} {rule:16s} {mode:10s} "
                          f"{seconds:7.2f} s", flush=True)
    return {"similarity": sd.similarity, "num_neighbours": sd.num_neighbours, "num_candidates": sd.num_candidates,
            "exact_search_max": sd.exact_search_max, "search_sample": sd.search_sample,
            "threads": torch.get_num_threads(), "rows": rows}


# --------------------------------------------------------------------------- the command


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """``bench.png``: one panel per part that ran."""
    from hetkd.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    ax = axes[0, 0]
    scale = result.get("scale")
    if scale:
        pop = scale["by_population"]
        ax.plot([r["devices"] for r in pop], [r["mean_round_seconds"] for r in pop], "o-", label="round s (by devices)")
        ax.set_xscale("log")
        ax.set_xlabel("devices (10 % per round)")
        ax.set_ylabel("mean round wall time (s)")
        twin = ax.twinx()
        twin.plot([r["devices"] for r in pop], [r["peak_rss_total_gib"] for r in pop], "s--", color="C3",
                  label="peak RSS GiB")
        twin.set_ylabel("peak RSS, all processes (GiB)")
        ax.set_title("1. scale: round time and peak memory")
        sampled = scale["by_sampled"]
        for r in sampled:
            ax.annotate(f"{r['sampled']}/rnd: {r['mean_round_seconds']:.0f}s, {r['peak_rss_total_gib']:.1f}GiB",
                        (r["devices"], r["mean_round_seconds"]), fontsize=7)
    else:
        ax.set_axis_off()
    ax = axes[0, 1]
    overhead = result.get("overhead")
    if overhead:
        rounds = overhead["per_round"]
        x = np.arange(len(rounds))
        ax.bar(x - 0.2, [r["plain_seconds"] for r in rounds], 0.4, label="plain PyTorch loop")
        ax.bar(x + 0.2, [r["flower_train_seconds"] for r in rounds], 0.4, label="Flower: training")
        ax.bar(x + 0.2, [r["handler_extra_seconds"] for r in rounds], 0.4,
               bottom=[r["flower_train_seconds"] for r in rounds], label="Flower: handler set-up/state")
        ax.bar(x + 0.2, [r["outside_handler_seconds"] for r in rounds], 0.4,
               bottom=[r["flower_handler_seconds"] for r in rounds], label="Flower: messaging/Ray/server")
        ax.set_xticks(x, [f"round {r['round']}\n×{r['ratio']:.2f}" for r in rounds])
        ax.set_ylabel("seconds")
        ax.set_title(f"2. overhead: Flower/plain = {overhead['ratio']:.2f} ({overhead['devices_per_round']} devices)")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    ax = axes[1, 0]
    by = result.get("bytes")
    if by:
        strategies = list(dict.fromkeys(r["strategy"] for r in by["rows"]))
        archs = list(dict.fromkeys(r["architecture"] for r in by["rows"]))
        width = 0.8 / max(1, len(strategies))
        for k, s in enumerate(strategies):
            values = [next((r["steady_up"] + r["steady_down"] for r in by["rows"]
                            if r["strategy"] == s and r["architecture"] == a), 0) for a in archs]
            ax.bar(np.arange(len(archs)) + k * width, values, width, label=s)
        ax.set_xticks(np.arange(len(archs)) + 0.4 - width / 2, archs, rotation=30, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("bytes per device per round (up + down)")
        ax.set_title("3. bytes per device per round (steady state)")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    ax = axes[1, 1]
    sim = result.get("similarity")
    if sim:
        for key in dict.fromkeys((r["rule"], r["mode"], r["learners"] == r["devices"]) for r in sim["rows"]):
            pts = [r for r in sim["rows"] if (r["rule"], r["mode"], r["learners"] == r["devices"]) == key]
            who = "all learn" if key[2] else f"{pts[-1]['learners'] / pts[-1]['devices']:.0%} learn"
            ax.plot([r["devices"] for r in pts], [r["seconds"] for r in pts], "o-" if key[2] else "x--",
                    label=f"{key[0]}, {key[1]}, {who}")
        ax.axhline(10, color="grey", ls=":", label="10 s target")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("devices")
        ax.set_ylabel("seconds")
        ax.set_title(f"4. neighbour search ({sim['rows'][0]['reference']} ref x 10 classes)")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench(cfg: HetkdConfig, out: str | Path) -> dict[str, Any]:
    """Run the parts ``bench.parts`` names; write ``bench.json`` (after each part) and ``bench.png``.

    Parts already in an existing ``bench.json`` under ``out`` and not run again
    are kept, so a long benchmark can be run part by part.
    """
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    result: dict[str, Any] = {
        **{k: v for k, v in previous.items() if k in BENCH_PARTS and k not in cfg.bench.parts},
        "config": str(cfg.output.run_name or ""),
        "machine": {"cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / GIB,
                    "torch_threads": torch.get_num_threads()},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "config.yaml").write_text(to_yaml(cfg))
    parts = {
        "similarity": lambda: bench_similarity(cfg),
        "bytes": lambda: bench_bytes(cfg, out),
        "overhead": lambda: bench_overhead(cfg, out),
        "scale": lambda: bench_scale(cfg, out),
    }
    for name, part in parts.items():
        if name not in cfg.bench.parts:
            continue
        started = time.perf_counter()
        result[name] = part()
        result[name]["bench_seconds"] = time.perf_counter() - started
        (out / "bench.json").write_text(json.dumps(result, indent=2))
    plot_bench(result, out / "bench.png")
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.png'}", flush=True)
    return result


def _cmd_bench(args: argparse.Namespace) -> int:
    from hetkd.simulations.cli import config_from_args

    cfg = config_from_args(args.items)
    out = args.out or str(Path(cfg.output.root) / "bench")
    named = args.items[0] if args.items and "=" not in args.items[0] else ""
    cfg = replace(cfg, output=replace(cfg.output, run_name=named))
    run_bench(cfg, out)
    return 0


def add_parser(sub: Any) -> None:
    """``hetkd bench CONFIG [key=value ...] [--out DIR]``."""
    from hetkd.simulations.cli import add_items_arguments

    p = sub.add_parser("bench", help="measure scale, framework overhead, bytes and neighbour search (bench.json/png)")
    add_items_arguments(p)
    p.set_defaults(func=_cmd_bench)
