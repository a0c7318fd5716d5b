"""``hetkd bench CONFIG [--out DIR]``: how hetkd scales, measured (``bench.json`` + ``bench.png``).

Six parts (``bench.parts``), each a function that returns plain JSON rows:

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
   (:meth:`hetkd.distill.similarity.NeighbourSearch.plan`, every device a learner) against
   population size, exact and as configured (sampled above
   ``strategy.sd_dist.exact_search_max``);
5. :func:`~hetkd.simulations.gpu_bench.bench_gpu` — seconds per step on the CPU and, when
   ``torch.cuda.is_available()``, on CUDA, and the speed-up, of the
   tensor-heavy paths: a device's training step for each architecture of
   ``models.architectures`` (``training.batch_size``), the server student's
   distillation step (``strategy.ensemble.student``, ``mekd.distill``, through
   G) and MEKD's D-then-G step (``mekd.gan``). Without CUDA it writes the
   CPU rows and says no GPU was present;
6. :func:`~hetkd.simulations.startup_bench.bench_startup` — the seconds a fresh process
   (a Ray worker; on a deployed SuperNode, the ClientApp process of every message)
   spends importing the ClientApp and building its device, with an empty partition
   cache and with a warm one.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from hetkd.clients.device import DistillClient
from hetkd.config import HetkdConfig, override, to_yaml
from hetkd.data import build_federation
from hetkd.distill.codec import decode_logits, encode_logits
from hetkd.distill.exchange import mix_targets, row_sums
from hetkd.distill.similarity import reference_quality
from hetkd.models import ModelError, available_architectures, build_model, check_architecture, state_bytes
from hetkd.plots import plot_bench
from hetkd.results import read_metrics
from hetkd.settings import require, require_choice, require_types
from hetkd.simulations.cli import add_items_arguments, config_from_args
from hetkd.simulations.experiment import prepare
from hetkd.simulations.gpu_bench import bench_gpu
from hetkd.simulations.local_grid import InProcessGrid
from hetkd.simulations.memory import GIB, TreeMemoryMonitor
from hetkd.simulations.registry import build_strategy, initial_arrays
from hetkd.simulations.runner import run
from hetkd.simulations.startup_bench import bench_startup

__all__ = [
    "BENCH_PARTS",
    "BenchConfig",
    "BenchRunConfig",
    "TreeMemoryMonitor",
    "bench_scale",
    "bench_overhead",
    "bench_bytes",
    "bench_similarity",
    "bench_gpu",
    "bench_startup",
    "run_bench",
    "add_parser",
]

BENCH_PARTS = ("scale", "overhead", "bytes", "similarity", "gpu", "startup")


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """``hetkd bench``: what the scale benchmark measures.

    1. ``populations``: simulations of that many devices, ``bench_rounds``
       rounds each, sampling ``strategy.fraction_train`` of them per round;
       ``sampled``: devices per round tried at the largest population;
    2. framework overhead: ``overhead_devices`` devices train
       ``overhead_epochs`` local epochs for ``overhead_rounds`` rounds, once in
       a plain PyTorch loop in one process and once through Flower + Ray;
    3. bytes per device and round of ``byte_strategies`` with every zoo model
       that takes the data;
    4. neighbour search time for ``similarity_sizes`` devices with
       ``similarity_reference`` reference samples each, ``similarity_learners``
       of them learning (1.0: all; 0.1: a round sampling 10 %), exact up to
       ``similarity_exact_max`` devices and as configured;
    5. seconds per step on the CPU and on CUDA: the mean of ``gpu_steps``
       steps after ``gpu_warmup_steps`` untimed ones (CUDA's kernels and
       allocator warm up);
    6. ``startup_repeats`` cold and as many warm starts of a process building a device.
    ``parts`` selects which of ``scale``, ``overhead``, ``bytes``,
    ``similarity``, ``gpu``, ``startup`` run; memory is sampled every ``memory_poll_seconds``.
    """

    parts: list[str] = field(default_factory=lambda: list(BENCH_PARTS))
    populations: list[int] = field(default_factory=lambda: [10, 100, 1000])
    sampled: list[int] = field(default_factory=lambda: [10, 50, 100])
    bench_rounds: int = 3
    overhead_devices: int = 10
    overhead_rounds: int = 3
    overhead_epochs: int = 4
    overhead_architecture: str = "cnn1d_m"
    byte_strategies: list[str] = field(default_factory=lambda: ["sd-dist", "mekd", "fedavg"])
    similarity_sizes: list[int] = field(default_factory=lambda: [100, 1000, 3000, 10000])
    similarity_reference: int = 300
    similarity_learners: list[float] = field(default_factory=lambda: [1.0, 0.1])
    similarity_exact_max: int = 3000
    memory_poll_seconds: float = 0.5
    gpu_steps: int = 30
    gpu_warmup_steps: int = 5
    startup_repeats: int = 3

    def __post_init__(self) -> None:
        require_types(self)
        for i, part in enumerate(self.parts):
            require_choice(part, f"parts[{i}]", BENCH_PARTS)
        for key in ("populations", "sampled", "similarity_sizes"):
            values = getattr(self, key)
            require(all(v >= 1 for v in values), key, f"must list sizes >= 1, got {list(values)}")
        for key in ("bench_rounds", "overhead_devices", "overhead_rounds", "overhead_epochs", "similarity_reference",
                    "gpu_steps", "startup_repeats"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(self.gpu_warmup_steps >= 0, "gpu_warmup_steps", f"must be >= 0, got {self.gpu_warmup_steps}")
        require(len(self.similarity_learners) > 0 and all(0 < f <= 1 for f in self.similarity_learners),
                "similarity_learners", f"must list fractions in (0, 1], got {list(self.similarity_learners)}")
        require(self.similarity_exact_max >= 0, "similarity_exact_max", f"must be >= 0, got {self.similarity_exact_max}")
        require(self.memory_poll_seconds > 0, "memory_poll_seconds", f"must be > 0, got {self.memory_poll_seconds}")
        check_architecture(self.overhead_architecture, "overhead_architecture")


@dataclass(frozen=True, kw_only=True)
class BenchRunConfig(HetkdConfig):
    """The run config of ``hetkd bench``: a run's settings plus ``bench``."""

    bench: BenchConfig = field(default_factory=BenchConfig)


def _override(cfg: BenchRunConfig, *items: str) -> BenchRunConfig:
    """``cfg`` with dotted overrides, validated."""
    return override(cfg, list(items))


# --------------------------------------------------------------------------- 1. scale


def _simulate(cfg: BenchRunConfig, out: Path, interval: float) -> dict[str, Any]:
    """One Flower + Ray simulation under a memory monitor: round times and peak memory."""

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


def bench_scale(cfg: BenchRunConfig, out: Path) -> dict[str, Any]:
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


def _overhead_config(cfg: BenchRunConfig, out: Path) -> HetkdConfig:
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


def plain_rounds(cfg: BenchRunConfig) -> list[dict[str, float]]:
    """The Flower run's work as a plain PyTorch loop in this process: per round, every
    device trains (towards SD-Dist targets after the warm-up) and predicts on the
    reference set; then the server's neighbour search forms the next targets."""

    torch.set_num_threads(cfg.training.num_threads)
    federation = build_federation(cfg)
    labels = federation.reference.base.targets(federation.reference.indices) if federation.reference_labelled else None
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
                metrics = client.fit_towards(server_round, target, kd.kd_term(), kd.kl_loss())
            train_seconds += metrics["train_seconds"]
            # what travels: log-probabilities at the configured precision
            predictions.append(decode_logits(encode_logits(client.reference_logits(), kd.precision)).log_softmax(-1))
        if server_round + 1 > kd.warmup_rounds and cfg.strategy.name == "sd-dist":
            logits = torch.stack(predictions)
            plan = cfg.strategy.sd_dist.plan(
                logits, list(range(len(clients))), temperature=kd.temperature,
                quality=None if labels is None else reference_quality(logits, labels),
            )
            mixed = mix_targets(plan.weights, logits, kd.mix, kd.temperature)
            sums = row_sums(plan.weights)
            targets = {i: mixed[i] for i in range(len(clients)) if float(sums[i]) > 0}
        rows.append({"round": server_round, "seconds": time.perf_counter() - started, "train_seconds": train_seconds})
    return rows


def bench_overhead(cfg: BenchRunConfig, out: Path) -> dict[str, Any]:
    """Flower-time / plain-time per round for the same local work."""

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


def _byte_config(cfg: BenchRunConfig, strategy: str, architecture: str, out: Path) -> HetkdConfig:
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
        items += ["strategy.ensemble.warmup_rounds=1", "strategy.ensemble.server_steps=1", "mekd.gan.steps=2",
                  "mekd.distill.steps=1", "mekd.gan.batch_size=4", "mekd.distill.batch_size=4"]
        rounds = 1 + (cfg.strategy.ensemble.deprivatize_rounds if strategy == "mekd" else 0) + 2
    elif strategy == "fedavg":
        rounds = 2
    else:
        rounds = cfg.strategy.kd.warmup_rounds + 2
    return _override(cfg, *items, f"simulation.num_rounds={rounds}")


def bench_bytes(cfg: BenchRunConfig, out: Path) -> dict[str, Any]:
    """Bytes each way per device and round, metered on an in-process grid."""

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


def bench_similarity(cfg: BenchRunConfig) -> dict[str, Any]:
    """Neighbour search in populations of ``bench.similarity_sizes`` devices, for
    ``bench.similarity_learners`` of them (1.0: every device a learner; 0.1: a round
    that samples 10 %), including the quality score and the targets' mixing."""

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
                    search = replace(sd, neighbour_rule=rule, exact_search_max=limit)
                    plan = search.plan(logits, learners, temperature=kd.temperature, quality=quality,
                                       generator=torch.Generator().manual_seed(1))
                    mix_targets(plan.weights, logits, kd.mix, kd.temperature)
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


def run_bench(cfg: BenchRunConfig, out: str | Path) -> dict[str, Any]:
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
        "gpu": lambda: bench_gpu(cfg, steps=cfg.bench.gpu_steps, warmup=cfg.bench.gpu_warmup_steps),
        "startup": lambda: bench_startup(cfg, repeats=cfg.bench.startup_repeats),
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

    cfg = config_from_args(args.items, schema=BenchRunConfig)  # the run config and bench.*
    out = args.out or str(Path(cfg.output.root) / "bench")
    named = args.items[0] if args.items and "=" not in args.items[0] else ""
    cfg = replace(cfg, output=replace(cfg.output, run_name=named))
    run_bench(cfg, out)
    return 0


def add_parser(sub: Any) -> None:
    """``hetkd bench CONFIG [key=value ...] [--out DIR]``."""

    p = sub.add_parser("bench", help="measure scale, framework overhead, bytes, neighbour search and GPU speed-up "
                                     "(bench.json/png)")
    add_items_arguments(p)
    p.set_defaults(func=_cmd_bench)
