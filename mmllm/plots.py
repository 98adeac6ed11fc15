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


LEARNABILITY_COLUMNS = 4  # panels per row of the learnability figure


def plot_learnability(rows: list[dict], metrics: dict[str, str], path: Path) -> Path:
    """One panel per task: the model's score against training minutes, with the chance and
    untrained rows as horizontal lines. `rows` are `bench learnability` rows; `metrics` names
    each task's metric."""
    names = list(metrics)
    lines = (len(names) + LEARNABILITY_COLUMNS - 1) // LEARNABILITY_COLUMNS
    figure, grid = plt.subplots(lines, LEARNABILITY_COLUMNS, figsize=(13, 3 * lines), dpi=100, squeeze=False)
    model = [r for r in rows if r["row"] == "model"]
    references = {r["row"]: r for r in rows if r["row"] != "model"}
    for axes, name in zip(grid.flat, names, strict=False):
        points = [(r["minutes"], r["scores"][name]) for r in model if r["scores"][name] is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label="model")
        for label, style in (("chance", ":"), ("untrained", "--")):
            value = references.get(label, {}).get("scores", {}).get(name)
            if value is not None:
                axes.axhline(value, linestyle=style, color="grey", label=label)
        axes.set_title(f"{name}", fontsize=10)
        axes.set_xlabel("training minutes (2 CPU ranks)", fontsize=8)
        axes.set_ylabel(metrics[name], fontsize=8)
        axes.grid(alpha=0.3)
    for axes in list(grid.flat)[len(names) :]:
        axes.axis("off")
    grid.flat[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_reducers(rows: list[dict], path: Path, title: str = "") -> Path:
    """Accuracy against prefill wall-clock (a ratio to the unreduced model), one colour per method,
    its ideal slices as hollow markers at the same accuracy. `rows` are `bench reducers` rows."""
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    measured = [r for r in rows if "skipped" not in r]
    colours = {}
    for row in measured:
        if row["spec"] is None:
            axes.scatter([1.0], [100 * row["accuracy"]], marker="*", s=160, color="black", label="no reducer")
            continue
        method = row["method"] or row["label"]  # reference rows are named by their label
        colour = colours.setdefault(method, f"C{len(colours) % 10}")
        axes.scatter([row["prefill_ratio"]], [100 * row["accuracy"]], color=colour, label=method)
        axes.scatter([row["ideal_ratio"]], [100 * row["accuracy"]], facecolors="none", edgecolors=colour)
        axes.plot([row["ideal_ratio"], row["prefill_ratio"]], [100 * row["accuracy"]] * 2, color=colour, lw=0.8)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes.legend(unique.values(), unique.keys(), fontsize=8)
    axes.set_xlabel("prefill wall-clock / unreduced (hollow: ideal slice)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
