"""Plots for analysis results and reports (PNG, written atomically; matplotlib's Agg backend)."""

from __future__ import annotations

import os
from collections.abc import Sequence


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    from moepass.atomic_write import write_file_atomically

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_file_atomically(path, lambda file: fig.savefig(file, format="png", dpi=120, bbox_inches="tight"))
    return path


def heatmap(
    rows: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    path: str,
    colorbar: str = "",
) -> str:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(col_labels) + 2), max(2.5, 0.4 * len(row_labels) + 1)))
    image = ax.imshow(rows, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label=colorbar)
    path = _save(fig, path)
    plt.close(fig)
    return path


def lines(
    series: dict[str, Sequence[float]],
    x_labels: Sequence[str],
    title: str,
    path: str,
    ylabel: str = "",
    marked: dict[str, Sequence[int]] | None = None,
) -> str:
    """One line per series over x; `marked` circles chosen points (e.g. what a transform drops)."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(x_labels) + 2), 3))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=name)
        for i in (marked or {}).get(name, []):
            ax.scatter([i], [values[i]], s=120, facecolors="none", edgecolors="red")
    ax.set_xticks(range(len(x_labels)), x_labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    path = _save(fig, path)
    plt.close(fig)
    return path


def quality_vs_size(panels: dict[str, dict[str, Sequence[tuple[str, float, float]]]], path: str) -> str:
    """One panel per model: each setting's weight size (MiB) against its perplexity change (%, log
    above 1%), marked by kind and labelled, so the cheapest setting at a quality is read off."""
    plt = _figure()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for ax, (model, kinds) in zip(axes[0], panels.items(), strict=True):
        ax.set_yscale("symlog", linthresh=1.0)
        for (kind, settings), marker in zip(kinds.items(), "o^sDvP*X", strict=False):
            ax.scatter([s[1] for s in settings], [s[2] for s in settings], marker=marker, s=36, label=kind)
        ax.margins(x=0.14)  # room for the labels of the rightmost points
        ax.autoscale_view()
        placed: list[tuple[float, float]] = []  # label anchors in pixels: stack labels of close points
        for label, x, y in sorted((s for settings in kinds.values() for s in settings), key=lambda s: -s[2]):
            px, py = ax.transData.transform((x, y))
            drop = 0
            while any(abs(px - qx) < 60 and abs(py - drop - qy) < 9 for qx, qy in placed):
                drop += 9
            placed.append((px, py - drop))
            ax.annotate(label, (x, y), xytext=(5, 2 - drop), textcoords="offset pixels", fontsize=6)
        ax.set_xlabel("weights (MiB)")
        ax.set_ylabel("test perplexity vs original (%)")
        ax.set_title(model, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    path = _save(fig, path)
    plt.close(fig)
    return path
