"""``hetkd b2kd``: black-box KD of one teacher into one student, MEKD against baselines.

    hetkd b2kd configs/experiments/b2kd_digits.yaml [key=value ...] [--out DIR]

The data picture comes from :func:`hetkd.data.build_federation`:

* the **teacher** trains on the whole training pool: every device's train and
  test part (with ``simulation.num_devices=1`` and ``partition.method=iid``
  that is one device holding the pool);
* the **proxy set** is the federation's reference set (``reference.size``
  inputs carved from the pool before it is partitioned, or another dataset of
  the same shape with ``reference.source``), so it is disjoint from the
  teacher's data; its labels are never read;
* accuracy is measured on the **global test set**.

The teacher is trained once (seed ``seed``) or loaded from
``b2kd.teacher_path``. For every seed in ``b2kd.seeds`` and every response
kind in ``b2kd.responses`` the command deprivatizes a generator (when a method
needs one) and runs each of ``b2kd.methods`` from the same initial student.
The folder (``--out``, default ``outputs/b2kd-<dataset>-<time>/``) receives

* ``b2kd.json``  teacher accuracy, every method's student accuracy, its ratio
  to the teacher's, wall seconds and teacher queries: per run and as mean and
  std (population, ddof = 0) over seeds;
* ``b2kd.md``    the same as a table;
* ``samples.png`` G's samples (first seed) grouped by the teacher's label;
* ``teacher.pt`` the teacher (reload it with ``b2kd.teacher_path=...``);
* ``config.yaml`` the resolved config.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hetkd.config import ConfigError, HetkdConfig, to_yaml
from hetkd.data import DataView, build_federation
from hetkd.distill.blackbox import METHODS, active_mixup, deprivatize, distill, kd_on_generated, kd_on_proxy
from hetkd.distill.ensemble import RESPONSE_KINDS
from hetkd.distill.generative import Generator
from hetkd.distill.teacher import BlackBoxTeacher, proxy_inputs
from hetkd.models import ModelError, build_model, check_architecture, count_parameters
from hetkd.plots import plot_generator_samples
from hetkd.results import write_atomic
from hetkd.settings import require, require_choice, require_types
from hetkd.simulations.cli import add_items_arguments, config_from_args
from hetkd.training import evaluate_accuracy, make_optimizer, seeded, train_epoch

__all__ = ["B2KDConfig", "B2KDRunConfig", "add_parser", "run_b2kd", "run_job", "B2KDData", "b2kd_data", "train_teacher", "summarise", "markdown_table"]

#: methods that distil on generated inputs and so need a deprivatized G
NEEDS_GENERATOR = frozenset({"mekd", "kd_generated"})


@dataclass(frozen=True, kw_only=True)
class B2KDConfig:
    """The black-box KD experiment ``hetkd b2kd``: one teacher, one student, several methods.

    The ``teacher`` architecture trains for ``teacher_epochs`` on the whole
    training pool (every device's train and test part; optimizer, learning
    rate and batch size from ``training``), or is loaded from ``teacher_path``
    (a ``teacher.pt`` an earlier run wrote). The proxy set is the federation's
    reference set (``reference.*``), disjoint from the teacher's data; its
    labels are never read. Each of ``methods`` runs for each of ``responses``
    and each of ``seeds``; a seed fixes the ``student``'s initial weights and
    every random draw of deprivatization and distillation, the same for every
    method and response (hyperparameters: ``mekd.gan``, ``mekd.distill``).
    Active Mixup runs ``mixup_rounds`` rounds, each querying the
    ``mixup_queries`` least-confident of ``mixup_candidates`` random proxy
    pairs. ``workers`` processes (0: one per CPU core) run the (seed,
    response) jobs side by side, each with ``training.num_threads`` threads;
    the numbers do not depend on it.
    """

    teacher: str = "resnet20"
    student: str = "resnet8"
    teacher_epochs: int = 30
    teacher_path: str = ""
    methods: list[str] = field(default_factory=lambda: ["mekd", "kd_generated", "kd_proxy", "active_mixup"])
    responses: list[str] = field(default_factory=lambda: ["soft", "hard"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mixup_rounds: int = 3
    mixup_candidates: int = 2000
    mixup_queries: int = 200
    workers: int = 1

    def __post_init__(self) -> None:
        require_types(self)
        check_architecture(self.teacher, "teacher")
        check_architecture(self.student, "student")
        require(self.teacher_epochs >= 1 or bool(self.teacher_path), "teacher_epochs",
                f"must be >= 1 unless b2kd.teacher_path names a teacher to load, got {self.teacher_epochs}")
        for key, values, choices in (("methods", self.methods, sorted(METHODS)),
                                     ("responses", self.responses, list(RESPONSE_KINDS))):
            require(len(values) > 0, key, f"must list at least one of: {', '.join(choices)}")
            for i, value in enumerate(values):
                require_choice(value, f"{key}[{i}]", choices)
            require(len(set(values)) == len(values), key, f"lists a value twice: {list(values)}")
        require(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds",
                f"must list at least one seed, each once, got {list(self.seeds)}")
        require(self.mixup_rounds >= 0, "mixup_rounds", f"must be >= 0, got {self.mixup_rounds}")
        require(1 <= self.mixup_queries <= self.mixup_candidates, "mixup_queries",
                f"must be in [1, b2kd.mixup_candidates={self.mixup_candidates}], got {self.mixup_queries}")
        require(self.workers >= 0, "workers", f"must be >= 0 (0: one per CPU core), got {self.workers}")


@dataclass(frozen=True, kw_only=True)
class B2KDRunConfig(HetkdConfig):
    """The run config of ``hetkd b2kd``: the data, training and MEKD settings of a run, plus ``b2kd``."""

    b2kd: B2KDConfig = field(default_factory=B2KDConfig)


# --------------------------------------------------------------------------- data and teacher


@dataclass(frozen=True)
class B2KDData:
    """The teacher's training data, the unlabelled proxy set and the test set."""

    teacher_train: DataView
    proxy: DataView
    test: DataView

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.test.input_shape

    @property
    def num_classes(self) -> int:
        return self.test.num_classes


def b2kd_data(cfg: B2KDRunConfig) -> B2KDData:
    """Teacher data = every device's data; proxy = the reference set; test = the global test set."""
    fed = build_federation(cfg)
    pool = np.concatenate([np.concatenate([d.train.indices, d.test.indices]) for d in fed.devices])
    if len(fed.reference) < 2:
        raise ConfigError("reference.size", f"the proxy set needs at least 2 inputs, got {len(fed.reference)}")
    return B2KDData(fed.dataset.view(np.sort(pool)), fed.reference, fed.global_test)


def _build(name: str, key: str, data: B2KDData) -> nn.Module:
    try:
        return build_model(name, data.input_shape, data.num_classes)
    except ModelError as err:
        raise ConfigError(key, str(err)) from None


def train_teacher(cfg: B2KDRunConfig, data: B2KDData) -> nn.Module:
    """Train ``b2kd.teacher`` on the pool for ``b2kd.teacher_epochs`` (``training`` settings, cosine decay)."""
    with seeded("b2kd-teacher", cfg.seed) as rng:
        model = _build(cfg.b2kd.teacher, "b2kd.teacher", data)
        optimizer = make_optimizer(model, cfg.training)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.b2kd.teacher_epochs)
        for _ in range(cfg.b2kd.teacher_epochs):
            train_epoch(model, optimizer, data.teacher_train.batches(cfg.training.batch_size, True, rng),
                        clip_grad_norm=cfg.training.clip_grad_norm)
            schedule.step()
    return model.eval()


def load_teacher(cfg: B2KDRunConfig, data: B2KDData) -> nn.Module:
    """The teacher saved by an earlier run at ``b2kd.teacher_path`` (checked against the config)."""
    path = Path(cfg.b2kd.teacher_path).expanduser()
    if not path.is_file():
        raise ConfigError("b2kd.teacher_path", f"file '{path}' does not exist")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    expected = {"architecture": cfg.b2kd.teacher, "input_shape": list(data.input_shape),
                "num_classes": data.num_classes}
    for key, value in expected.items():
        if saved.get(key) != value:
            raise ConfigError("b2kd.teacher_path", f"'{path}' holds a teacher with {key}={saved.get(key)!r}, "
                                                   f"but this run needs {value!r}")
    model = _build(cfg.b2kd.teacher, "b2kd.teacher", data)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def save_teacher(model: nn.Module, cfg: B2KDRunConfig, data: B2KDData, path: Path) -> None:
    torch.save({"architecture": cfg.b2kd.teacher, "input_shape": list(data.input_shape),
                "num_classes": data.num_classes, "dataset": cfg.dataset.name,
                "state_dict": model.state_dict()}, path)


def _accuracy(model: nn.Module, view: DataView) -> float:
    return float(evaluate_accuracy(model, view.batches(512))[0])


# --------------------------------------------------------------------------- methods


def run_method(
    method: str,
    teacher: BlackBoxTeacher,
    student: nn.Module,
    generator: Generator | None,
    proxy: DataView,
    cfg: B2KDRunConfig,
    seed: int,
) -> nn.Module:
    """Run one black-box method (a key of :data:`~hetkd.distill.blackbox.METHODS`)."""
    settings = cfg.mekd.distill
    if method in NEEDS_GENERATOR and generator is None:
        raise ValueError(f"method {method!r} needs a deprivatized generator")
    if method == "mekd":
        return distill(teacher, student, generator, settings=settings, seed=seed)  # type: ignore[arg-type]
    if method == "kd_generated":
        return kd_on_generated(teacher, student, generator, settings=settings, seed=seed)  # type: ignore[arg-type]
    if method == "kd_proxy":
        return kd_on_proxy(teacher, student, proxy, settings=settings, seed=seed)
    if method == "active_mixup":
        b = cfg.b2kd
        return active_mixup(teacher, student, proxy, settings=settings, seed=seed, rounds=b.mixup_rounds,
                            candidates=b.mixup_candidates, queries=b.mixup_queries)
    raise ConfigError("b2kd.methods", f"unknown method {method!r}; valid choices: {', '.join(sorted(METHODS))}")


# --------------------------------------------------------------------------- results


def summarise(values: list[float]) -> dict[str, Any]:
    """Mean, population std and the values themselves."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "values": [float(v) for v in arr]}


def _aggregate(rows: list[dict[str, Any]], methods: list[str], responses: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in methods:
        out[method] = {}
        for response in responses:
            mine = [r for r in rows if r["method"] == method and r["response"] == response]
            out[method][response] = {k: summarise([r[k] for r in mine]) for k in ("accuracy", "ratio", "seconds", "queries")}
    return out


def _pct(summary: dict[str, Any]) -> str:
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def markdown_table(report: dict[str, Any]) -> str:
    """``b2kd.md``: teacher line, then one row per method with accuracy and ratio per response."""
    responses = report["responses"]
    lines = [
        f"# Black-box KD on {report['dataset']}: {report['teacher']['architecture']} → "
        f"{report['student']['architecture']}",
        "",
        f"Teacher accuracy {100 * report['teacher']['accuracy']:.2f} % on the global test set "
        f"({report['data']['test_size']} inputs); trained on {report['data']['teacher_train_size']} inputs; "
        f"proxy: {report['data']['proxy_size']} unlabelled inputs ({report['data']['proxy_source']}). "
        f"Untrained student {_pct(report['student']['untrained_accuracy'])} %. "
        f"Mean ± std (ddof = 0) over seeds {report['seeds']}.",
        "",
        "| method | " + " | ".join(f"{r} acc % | {r} / teacher % | {r} s" for r in responses) + " |",
        "|---|" + "---:|---:|---:|" * len(responses),
    ]
    for method, by_response in report["methods"].items():
        cells = []
        for r in responses:
            s = by_response[r]
            cells += [_pct(s["accuracy"]), _pct(s["ratio"]), f"{s['seconds']['mean']:.1f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if report["deprivatization"]:
        cells = []
        for r in responses:
            d = report["deprivatization"].get(r)
            cells += ["", "", f"{d['seconds']['mean']:.1f}" if d else ""]
        lines.append("| (deprivatization) | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time {report['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def _output_dir(cfg: B2KDRunConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir).expanduser().resolve()
    name = cfg.output.run_name or f"b2kd-{cfg.dataset.name}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.output.root).expanduser().resolve() / name
    candidate, k = out, 1
    while candidate.exists() and not cfg.output.run_name:
        k += 1
        candidate = out.with_name(f"{name}-{k}")
    return candidate


# --------------------------------------------------------------------------- the run


def run_job(
    cfg: B2KDRunConfig,
    teacher_state: dict[str, torch.Tensor],
    output_range: tuple[float, float],
    seed: int,
    response: str,
) -> dict[str, Any]:
    """One (seed, response) job: deprivatize G if needed, then every method from the same student.

    Self-contained (it rebuilds the data and the teacher from the config and
    the teacher's weights), so it runs alike in this process or in a worker.
    """
    torch.set_num_threads(cfg.training.num_threads)
    b = cfg.b2kd
    data = b2kd_data(cfg)
    teacher = _build(b.teacher, "b2kd.teacher", data)
    teacher.load_state_dict(teacher_state)
    teacher.eval()
    with seeded("b2kd-student", seed):
        initial = _build(b.student, "b2kd.student", data)
    job: dict[str, Any] = {"seed": seed, "response": response, "untrained": _accuracy(initial, data.test),
                           "student_parameters": count_parameters(initial), "rows": [], "generation": None,
                           "generator": None}
    generator = None
    if any(m in NEEDS_GENERATOR for m in b.methods):
        oracle = BlackBoxTeacher(teacher, response)
        t0 = time.time()
        generator = deprivatize(oracle, data.proxy, settings=cfg.mekd.gan, seed=seed,
                                output_range=output_range, num_classes=data.num_classes)
        job["generation"] = {"seed": seed, "response": response, "seconds": time.time() - t0,
                             "queries": oracle.queries}
        job["generator"] = generator
    teacher_acc = _accuracy(teacher, data.test)
    for method in b.methods:
        oracle = BlackBoxTeacher(teacher, response)
        t0 = time.time()
        student = run_method(method, oracle, copy.deepcopy(initial), generator, data.proxy, cfg, seed)
        seconds = time.time() - t0
        acc = _accuracy(student, data.test)
        job["rows"].append({"seed": seed, "response": response, "method": method, "accuracy": acc,
                            "ratio": acc / teacher_acc if teacher_acc > 0 else float("nan"),
                            "seconds": seconds, "queries": oracle.queries})
    return job


def _job_lines(job: dict[str, Any]) -> list[str]:
    head = f"seed {job['seed']}  {job['response']:<6}"
    lines = []
    if job["generation"]:
        g = job["generation"]
        lines.append(f"{head} {'deprivatization':<16} {'':>8}   {'':>19}  {g['seconds']:6.1f} s  {g['queries']} queries")
    for r in job["rows"]:
        lines.append(f"{head} {r['method']:<16} {100 * r['accuracy']:6.2f} %  ({100 * r['ratio']:5.1f} % of teacher)"
                     f"  {r['seconds']:6.1f} s  {r['queries']} queries")
    return lines


def _run_jobs(
    cfg: B2KDRunConfig, teacher: nn.Module, output_range: tuple[float, float], console: Any
) -> list[dict[str, Any]]:
    """All (seed, response) jobs, in ``b2kd.workers`` processes; results in job order."""
    from rich.progress import Progress

    b = cfg.b2kd
    state = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    specs = [(seed, response) for seed in b.seeds for response in b.responses]
    workers = min(b.workers or os.cpu_count() or 1, len(specs))
    show_bar = cfg.output.progress and console.is_terminal and not cfg.output.quiet
    done: dict[tuple[int, str], dict[str, Any]] = {}
    with Progress(console=console, transient=True, disable=not show_bar) as bar:
        task = bar.add_task(f"b2kd ({workers} worker{'s' if workers > 1 else ''})", total=len(specs))
        if workers <= 1:
            for seed, response in specs:
                done[(seed, response)] = run_job(cfg, state, output_range, seed, response)
                for line in _job_lines(done[(seed, response)]):
                    console.print(line)
                bar.advance(task)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn, not fork: a forked child of a process that already ran OpenMP threads can hang
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {pool.submit(run_job, cfg, state, output_range, s, r): (s, r) for s, r in specs}
                for future in as_completed(futures):
                    done[futures[future]] = future.result()
                    for line in _job_lines(done[futures[future]]):
                        console.print(line)
                    bar.advance(task)
    return [done[spec] for spec in specs]


def run_b2kd(cfg: B2KDRunConfig) -> dict[str, Any]:
    """Run the whole experiment; write the folder's files; return the report (``b2kd.json``)."""
    from rich.console import Console

    started = time.time()
    console = Console(highlight=False, soft_wrap=True, quiet=cfg.output.quiet)
    out = _output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    torch.set_num_threads(cfg.training.num_threads)
    b = cfg.b2kd
    data = b2kd_data(cfg)
    _build(b.student, "b2kd.student", data)  # fail before training anything if the student cannot fit

    t0 = time.time()
    teacher = load_teacher(cfg, data) if b.teacher_path else train_teacher(cfg, data)
    teacher_seconds = time.time() - t0
    save_teacher(teacher, cfg, data, out / "teacher.pt")
    teacher_acc = _accuracy(teacher, data.test)
    console.print(f"results: {out}")
    console.print(f"teacher {b.teacher}: {100 * teacher_acc:.2f} % on {len(data.test)} test inputs "
                  f"({'loaded' if b.teacher_path else f'trained on {len(data.teacher_train)} inputs'}, "
                  f"{teacher_seconds:.1f} s); proxy: {len(data.proxy)} unlabelled inputs")

    x_proxy = proxy_inputs(data.proxy)
    jobs = _run_jobs(cfg, teacher, (float(x_proxy.min()), float(x_proxy.max())), console)
    rows = [row for job in jobs for row in job["rows"]]
    g_rows = [job["generation"] for job in jobs if job["generation"]]
    untrained = {job["seed"]: job["untrained"] for job in jobs}
    report: dict[str, Any] = {
        "dataset": cfg.dataset.name,
        "input_shape": list(data.input_shape),
        "num_classes": data.num_classes,
        "data": {
            "teacher_train_size": len(data.teacher_train),
            "proxy_size": len(data.proxy),
            "proxy_source": f"reference set, source={cfg.reference.source}, labels unused",
            "test_size": len(data.test),
        },
        "teacher": {"architecture": b.teacher, "accuracy": teacher_acc, "seconds": teacher_seconds,
                    "parameters": count_parameters(teacher), "loaded_from": b.teacher_path},
        "student": {"architecture": b.student, "parameters": jobs[0]["student_parameters"],
                    "untrained_accuracy": summarise([untrained[s] for s in b.seeds])},
        "seeds": list(b.seeds),
        "responses": list(b.responses),
        "methods": _aggregate(rows, list(b.methods), list(b.responses)),
        "deprivatization": {
            r: {k: summarise([g[k] for g in g_rows if g["response"] == r]) for k in ("seconds", "queries")}
            for r in b.responses if any(g["response"] == r for g in g_rows)
        },
        "runs": rows,
        "deprivatization_runs": g_rows,
        "settings": {"mekd": asdict(cfg.mekd), "b2kd": asdict(cfg.b2kd), "training": asdict(cfg.training)},
        "workers": min(b.workers or os.cpu_count() or 1, len(jobs)),
    }
    first = {job["response"]: job["generator"] for job in jobs if job["seed"] == b.seeds[0] and job["generator"]}
    if first and cfg.output.plots:
        plot_generator_samples(first, teacher, data.num_classes, out / "samples.png")
    report["wall_seconds"] = time.time() - started
    write_atomic(out / "b2kd.json", json.dumps(report, indent=1))
    table = markdown_table(report)
    write_atomic(out / "b2kd.md", table)
    console.print(table)
    return report


# --------------------------------------------------------------------------- command line


def _cmd_b2kd(args: argparse.Namespace) -> int:
    run_b2kd(config_from_args(args.items, args.out, B2KDRunConfig))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``hetkd b2kd``."""
    p = subparsers.add_parser(
        "b2kd", help="black-box KD of one teacher into one student: MEKD and baselines (soft/hard responses)"
    )
    add_items_arguments(p)
    p.set_defaults(func=_cmd_b2kd)
