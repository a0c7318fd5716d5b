"""The ``central`` pseudo-strategy: the upper bound no federation can beat.

Each architecture of the run's zoo is trained on the union of all devices'
training data, with the same optimiser and the same number of epochs a device
gets over the whole run (``num_rounds × local_epochs``). Every device is then
scored with the central model of *its* architecture, on its own test split
(personalised) and on the global test set, so the row lines up with the
federated ones. No Flower: there is nothing to federate.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hetkd.config import HetkdConfig, to_yaml
from hetkd.data import build_federation
from hetkd.models import ModelError, build_model
from hetkd.results import RunRecorder, accuracy_summary
from hetkd.simulations.experiment import resolve_output, run_facts
from hetkd.training import evaluate_accuracy, make_optimizer, resolve_device, seeded, torch_threads, train_epoch

__all__ = ["run_central"]


def run_central(cfg: HetkdConfig) -> dict[str, Any]:
    """Train each architecture centrally; record one row per ``local_epochs`` epochs.

    The architecture of ``strategy.ensemble.student`` is trained too: its
    global accuracy is the row's ``student_accuracy``, the centrally trained
    counterpart of FedDF's and MEKD's global student. It trains with
    ``training.num_threads`` threads and gives the process its own count back.
    """
    with torch_threads(max(1, cfg.training.num_threads)):
        return _train_central(resolve_output(cfg))


def _train_central(cfg: HetkdConfig) -> dict[str, Any]:
    federation = build_federation(cfg)
    archs = cfg.models.assign(cfg.simulation.num_devices)
    pool = federation.dataset.view(np.concatenate([d.train.indices for d in federation.devices]))
    device = resolve_device(cfg.training.device)
    models, optimizers = {}, {}
    # the zoo's architectures, plus the global student's (the reference for FedDF/MEKD's student)
    student: str | None = cfg.strategy.ensemble.student
    for arch in sorted(set(archs) | ({student} if student else set())):
        with seeded(cfg.seed, "central-init", arch):
            try:
                models[arch] = build_model(arch, federation.input_shape, federation.num_classes).to(device)
            except ModelError:
                if arch in archs:
                    raise
                student = None  # the configured student does not take this data: no student row
                continue
        optimizers[arch] = make_optimizer(models[arch], cfg.training)

    fed_summary = federation.summary()
    recorder = RunRecorder(cfg.output.dir, plots=cfg.output.plots, progress=cfg.output.progress,
                           total_rounds=cfg.simulation.num_rounds, quiet=cfg.output.quiet)
    recorder.start(to_yaml(cfg), fed_summary,
                   f"hetkd: central (upper bound) on {cfg.dataset.name}: {len(pool)} pooled training samples")
    bs = max(256, cfg.training.batch_size)
    for rnd in range(1, cfg.simulation.num_rounds + 1):
        started = time.perf_counter()
        losses = []
        for arch, model in models.items():
            with seeded(cfg.seed, "central-train", arch, rnd) as generator:
                for _ in range(cfg.training.local_epochs):
                    batches = pool.batches(cfg.training.batch_size, shuffle=True, generator=generator)
                    loss, _ = train_epoch(model, optimizers[arch], batches, device=device,
                                          clip_grad_norm=cfg.training.clip_grad_norm)
                    losses.append(loss)
        global_acc = {a: evaluate_accuracy(m, federation.global_test.batches(bs), device)[0] for a, m in models.items()}
        rows: dict[int, dict[str, Any]] = {}
        pers, weights = [], []
        for d, arch in zip(federation.devices, archs):
            acc, _, n = evaluate_accuracy(models[arch], d.test.batches(bs), device)
            rows[d.device_id] = {"personalised_accuracy": acc, "global_accuracy": global_acc[arch]}
            pers.append(acc)
            weights.append(n)
        metrics = accuracy_summary(pers, weights, "personalised_accuracy_")
        g = accuracy_summary([global_acc[a] for a in archs], None, "global_accuracy_")
        recorder.record(
            {
                "round": rnd,
                "seconds": time.perf_counter() - started,
                "train_loss": float(np.mean(losses)),
                **metrics,
                "global_accuracy_mean": g["global_accuracy_mean"],
                "global_accuracy_std": g["global_accuracy_std"],
                "bytes_up_per_device": 0.0,
                "bytes_down_per_device": 0.0,
                "architecture_global_accuracy": global_acc,
                "student_accuracy": global_acc[student] if student else None,
                "failures": [],
                "devices": {str(k): v for k, v in rows.items()},
            }
        )
    return recorder.finish(run_facts(cfg, fed_summary, recorder.rows))
