"""Figures written into run folders (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_accuracy", "plot_curves", "plot_matrix"]


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
    """Personalised (mean, worst 10%) and global accuracy per round of one run."""
    keys = {
        "personalised (mean)": "personalised_accuracy_mean",
        "personalised (worst 10%)": "personalised_accuracy_worst10",
        "global (mean)": "global_accuracy_mean",
    }
    curves = {name: [(r["round"], r.get(key)) for r in rows] for name, key in keys.items()}
    return plot_curves(curves, path, title="accuracy per round")


def plot_matrix(matrix, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """A heat map of a square matrix (e.g. device-to-device distances)."""
    plt = _pyplot()
    size = max(4.0, min(12.0, 0.35 * len(labels) + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(matrix, cmap="viridis")
    if len(labels) <= 40:
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
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
