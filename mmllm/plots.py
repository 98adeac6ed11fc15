"""Figures for reports: loss curves (matplotlib's Agg backend, so no display is needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_loss_curves(curves: dict[str, list[tuple[int, float]]], path: Path, title: str = "") -> Path:
    """One line per curve name, loss against step; written as a PNG to `path`."""
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for name, points in curves.items():
        steps, losses = zip(*points, strict=True)
        axes.plot(steps, losses, label=name, linewidth=2.0 if name == "all" else 1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
