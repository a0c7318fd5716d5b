"""Figures written into run folders (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_accuracy", "plot_curves", "plot_matrix", "plot_generator_samples", "plot_bench"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    ylabel: str = "accuracy",
    xlabel: str = "round",
) -> Path:
    """Line plot of named ``(x, y)`` series, saved to ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        points = [(x, y) for x, y in points if y is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Personalised (mean, worst 10%) and global accuracy per round of one run
    (and the server's global student, where there is one)."""
    keys = {
        "personalised (mean)": "personalised_accuracy_mean",
        "personalised (worst 10%)": "personalised_accuracy_worst10",
        "global (mean)": "global_accuracy_mean",
    }
    if any(r.get("student_accuracy") is not None for r in rows):
        keys["global student (server)"] = "student_accuracy"
    curves = {name: [(r["round"], r.get(key)) for r in rows] for name, key in keys.items()}
    return plot_curves(curves, path, title="accuracy per round")


def plot_matrix(
    matrix, labels: Sequence[str], path: str | Path, title: str = "", column_labels: Sequence[str] | None = None
) -> Path:
    """A heat map of a device-to-device matrix (e.g. distances); rows are
    ``labels``, columns ``column_labels`` (default: the same devices)."""
    plt = _pyplot()
    columns = labels if column_labels is None else column_labels
    size = max(4.0, min(12.0, 0.35 * max(len(labels), len(columns)) + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    if len(columns) <= 40:
        ax.set_xticks(range(len(columns)), columns, fontsize=7)
    if len(labels) <= 40:
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("device j")
    ax.set_ylabel("device i")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_generator_samples(
    generators: Mapping[str, Any],
    labeller: Callable[[Any], Any],
    num_classes: int,
    path: str | Path,
    per_class: int = 8,
    title: str = "G ({name} responses)",
) -> Path:
    """A grid: one row per class (as ``labeller`` labels them), ``per_class`` samples of each generator.

    ``generators`` maps a name to a generator (latent size = ``num_classes``);
    ``labeller`` is a model (a teacher, a global student) returning logits.
    """
    import torch

    from hetkd.training import seeded

    plt = _pyplot()

    columns = per_class * len(generators)
    fig, axes = plt.subplots(num_classes, columns, figsize=(0.7 * columns, 0.7 * num_classes), squeeze=False)
    for block, (name, g) in enumerate(generators.items()):
        with seeded("b2kd-samples", name):
            z = torch.randn(max(400, 40 * num_classes), g.latent_dim)
        with torch.no_grad():
            x = g.eval()(z)
            if hasattr(labeller, "eval"):
                labeller.eval()
            labels = labeller(x).argmax(1)
        low, high = float(x.min()), float(x.max())
        for c in range(num_classes):
            picked = x[labels == c][:per_class]
            for k in range(per_class):
                ax = axes[c, block * per_class + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k >= len(picked):  # the teacher gave this label to fewer samples
                    for spine in ax.spines.values():
                        spine.set_visible(False)
                    continue
                sample = picked[k]
                if sample.dim() == 3:
                    img = sample[0] if sample.shape[0] == 1 else sample.permute(1, 2, 0)[..., :3]
                    ax.imshow(((img - low) / (high - low + 1e-12)).clamp(0, 1).numpy(), cmap="gray",
                              vmin=0, vmax=1)
                else:
                    ax.plot(sample.reshape(-1).numpy() if sample.dim() == 1 else sample[0].numpy(), lw=0.8)
                    ax.set_ylim(low, high)
            axes[c, block * per_class].set_ylabel(str(c), rotation=0, labelpad=8)
        axes[0, block * per_class].set_title(title.format(name=name), loc="left", fontsize=9)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_bench(result: dict[str, Any], path: Path) -> Path:
    """``bench.png`` of ``hetkd bench``: one panel per part of its ``bench.json`` that ran."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    _plot_gpu(axes[0, 2], result.get("gpu"))
    _plot_startup(axes[1, 2], result.get("startup"))
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


def _plot_startup(ax: Any, startup: dict[str, Any] | None) -> None:
    """Panel 6 of ``bench.png``: a fresh device process's seconds, cold and warm partition cache."""
    if not startup:
        ax.set_axis_off()
        return
    starts = ["cold", "warm"]
    imports = [startup["mean"][s]["import_seconds"] for s in starts]
    devices = [startup["mean"][s]["device_seconds"] for s in starts]
    rest = [startup["mean"][s]["process_seconds"] - i - d for s, i, d in zip(starts, imports, devices)]
    ax.bar(starts, imports, label="import the ClientApp")
    ax.bar(starts, devices, bottom=imports, label="build device 0")
    ax.bar(starts, rest, bottom=[i + d for i, d in zip(imports, devices)], label="interpreter start/exit")
    ax.set_ylabel("seconds (mean)")
    ax.set_title(f"6. a fresh device process ({startup['dataset']}, partition cache cold / warm)")
    ax.legend(fontsize=7)


def _plot_gpu(ax: Any, gpu: dict[str, Any] | None) -> None:
    """Panel 5 of ``bench.png``: seconds per step on the CPU and on CUDA (when a GPU was present)."""
    if not gpu:
        ax.set_axis_off()
        return
    rows = gpu["rows"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["cpu_seconds_per_step"] for r in rows], 0.4, label="CPU")
    if gpu["gpu_present"]:
        ax.bar(x + 0.2, [r["cuda_seconds_per_step"] for r in rows], 0.4, label=f"CUDA ({gpu['gpu_name']})")
    ax.set_xticks(x, [f"{r['workload']}\n{r['model']}" + (f"\n×{r['speedup']:.1f}" if r["speedup"] else "")
                      for r in rows], fontsize=7, rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per step")
    ax.set_title("5. GPU speed-up" if gpu["gpu_present"] else "5. seconds per step (no GPU present)")
    ax.legend(fontsize=7)
