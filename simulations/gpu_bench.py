"""``hetkd bench``'s ``gpu`` part: what a GPU buys the tensor-heavy paths, measured.

:func:`bench_gpu` times, on the CPU and (when ``torch.cuda.is_available()``) on
CUDA, the three places where hetkd's tensors are heavy — a device's training
step (``training.device``), the server student's distillation step and MEKD's
GAN step (``strategy.ensemble.device``) — each the way the run does it: the
batch starts on the CPU and is moved, and CUDA's queue is drained before the
clock reads (:func:`seconds_per_step`). Without CUDA the CUDA figures are
``null`` and the part says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from hetkd.config import HetkdConfig
from hetkd.data import build_federation
from hetkd.distill.deprivatization import Deprivatizer
from hetkd.distill.emulation import StudentOptimizer, freeze
from hetkd.distill.generative import default_width
from hetkd.models import build_model
from hetkd.training import cross_entropy_step, make_optimizer, seeded, torch_threads

__all__ = ["bench_gpu", "seconds_per_step"]


def seconds_per_step(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Mean wall time of ``steps`` calls of ``step`` after ``warmup`` untimed ones; CUDA's
    queue is drained (``torch.cuda.synchronize``) before the clock starts and stops."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / steps


def _training_step(cfg: HetkdConfig, architecture: str, shape: tuple[int, ...], classes: int,
                   device: torch.device) -> Callable[[], object]:
    """A device's training step: a private batch (on the CPU, as a device holds it) moved to
    ``device``, cross-entropy, backward, the configured optimizer."""
    with seeded(cfg.seed, "bench-gpu", architecture):
        model = build_model(architecture, shape, classes).to(device)
        x, y = torch.randn(cfg.training.batch_size, *shape), torch.randint(classes, (cfg.training.batch_size,))
    optimizer = make_optimizer(model, cfg.training)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        cross_entropy_step(model, x.to(device), y.to(device)).backward()
        optimizer.step()

    return step


def _student_step(cfg: HetkdConfig, shape: tuple[int, ...], classes: int,
                  device: torch.device) -> Callable[[], object]:
    """The server student's distillation step: a transfer batch moved to ``device``, the
    mapping-emulation loss through a frozen G (:meth:`~hetkd.strategies.EnsembleDistill.distill_student`)."""
    distill, batch = cfg.mekd.distill, cfg.mekd.distill.batch_size
    with seeded(cfg.seed, "bench-gpu", "student"):
        student = build_model(cfg.strategy.ensemble.student, shape, classes).to(device)
        generator = freeze(Deprivatizer(shape, classes, cfg.mekd.gan, seed=cfg.seed, device=device).generator)
        x, t = torch.randn(batch, *shape), torch.randn(batch, classes)
    optimizer, loss = StudentOptimizer(student, distill), distill.loss().bind(generator if distill.w_f > 0 else None)
    return lambda: optimizer.step(lambda: loss(student(x.to(device)), t.to(device)))


def _gan_step(cfg: HetkdConfig, shape: tuple[int, ...], classes: int, device: torch.device) -> Callable[[], object]:
    """MEKD's D-then-G step (:class:`~hetkd.distill.deprivatization.Deprivatizer`) on a proxy
    batch and the ensemble's soft answers, both on the CPU as the server holds them."""
    batch = cfg.mekd.gan.batch_size
    gan = Deprivatizer(shape, classes, cfg.mekd.gan, seed=cfg.seed, device=device)
    with seeded(cfg.seed, "bench-gpu", "gan"):
        real, z = torch.rand(batch, *shape) * 2 - 1, torch.randn(batch, classes)
        answers = torch.randn(batch, classes).softmax(1)

    def step() -> None:
        gan.discriminator_step(real)
        gan.generator_step(z, answers, "soft")

    return step


def bench_gpu(cfg: HetkdConfig, *, steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per step (the mean of ``steps`` after ``warmup`` untimed ones) of the tensor-heavy
    paths on the CPU and, when there is one, on CUDA, and the speed-up (CPU seconds / CUDA
    seconds); ``null`` where no GPU was present, never a guess. Device training runs on
    ``training.num_threads`` CPU threads as a device does, the server's parts on this process's."""
    federation = build_federation(cfg)
    shape, classes = tuple(federation.input_shape), federation.num_classes
    gpu = torch.cuda.is_available()
    cpu_device, cuda_device = torch.device("cpu"), torch.device("cuda")
    workloads: list[tuple[str, str, int, int, Callable[[torch.device], Callable[[], object]]]] = [
        ("device_training", arch, cfg.training.batch_size, cfg.training.num_threads,
         lambda d, arch=arch: _training_step(cfg, arch, shape, classes, d))
        for arch in dict.fromkeys(cfg.models.assign(cfg.simulation.num_devices))  # groups expanded
    ]
    if cfg.strategy.ensemble.student:
        workloads.append(("server_student", cfg.strategy.ensemble.student, cfg.mekd.distill.batch_size,
                          torch.get_num_threads(), lambda d: _student_step(cfg, shape, classes, d)))
    width = cfg.mekd.gan.generator_width or default_width(shape)
    workloads.append(("mekd_gan", f"G+D (G width {width})", cfg.mekd.gan.batch_size, torch.get_num_threads(),
                      lambda d: _gan_step(cfg, shape, classes, d)))
    rows = []
    for workload, model, batch, threads, make in workloads:
        with torch_threads(threads):
            cpu = seconds_per_step(make(cpu_device), cpu_device, warmup, steps)
            cuda = seconds_per_step(make(cuda_device), cuda_device, warmup, steps) if gpu else None
        rows.append({"workload": workload, "model": model, "batch_size": batch, "cpu_threads": threads,
                     "steps": steps, "cpu_seconds_per_step": cpu, "cuda_seconds_per_step": cuda,
                     "speedup": None if cuda is None else cpu / cuda})
        after = "no GPU" if cuda is None else f"cuda {cuda * 1e3:8.2f} ms/step  x{cpu / cuda:.1f}"
        print(f"[bench] gpu {workload:16s} {model:22s} cpu {cpu * 1e3:8.2f} ms/step  {after}", flush=True)
    return {"gpu_present": gpu, "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
            "note": None if gpu else "no GPU present (torch.cuda.is_available() is False): CPU rows only",
            "input_shape": list(shape), "num_classes": classes, "rows": rows}
