"""Pictures of a study: mIoU against cost with its Pareto front (the paper's Fig. 1), confusion
matrices, and pages of prediction overlays; plus the colouring of label maps that predict uses.

Figures are drawn on ``matplotlib.figure.Figure`` (the Agg canvas) without pyplot, so no global
backend or figure state is touched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from mgd_ray.data.datasets import IGNORE_INDEX

Palette = Sequence[Sequence[int]]
KIND_STYLE = {  # kind → (marker, colour, size, legend label)
    "trial": ("o", "#9aa5b1", 28, "trials"),
    "baseline": ("s", "#e07b39", 44, "baselines"),
    "teacher": ("^", "#6a4c93", 52, "teachers"),
    "mgd": ("D", "#264653", 48, "MGD (best configuration)"),  # one per study, in mgd-ray compare
}
COST_LABELS = {"gflops": "GFLOPs per image", "latency_ms": "latency (ms per image)", "params_m": "parameters (M)"}


# ---------------------------------------------------------------------------- label maps as colours
def colourise(labels: np.ndarray, palette: Palette) -> np.ndarray:
    """H×W class ids → H×W×3 uint8 colours; ignored (255) and unknown ids are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    colours = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    table[: len(colours)] = colours
    table[IGNORE_INDEX] = 0
    return table[labels.astype(np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, palette: Palette, alpha: float = 0.5) -> np.ndarray:
    """Image blended with its label colours: (1 − α)·image + α·colour, the image alone where ignored."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colourise(labels, palette).astype(np.float32)
    blended[labels == IGNORE_INDEX] = image[labels == IGNORE_INDEX]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- accuracy against cost
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, mIoU) points no other point beats: lower-or-equal cost and higher-or-equal
    mIoU, better in one. Sorted by cost; points with a NaN are never on the front."""
    pts = [(float(c), float(m)) for c, m in points]
    valid = [i for i, (c, m) in enumerate(pts) if not (math.isnan(c) or math.isnan(m))]
    front = [
        i
        for i in valid
        if not any(pts[j][0] <= pts[i][0] and pts[j][1] >= pts[i][1] and pts[j] != pts[i] for j in valid)
    ]
    return sorted(front, key=lambda i: (pts[i][0], -pts[i][1]))


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def plot_miou_vs_cost(
    rows: Sequence[Mapping[str, Any]], out_png: Path, cost_key: str = "gflops", title: str | None = None
) -> Path:
    """Scatter of mIoU against ``cost_key`` for trials, baselines and teachers; Pareto front marked.

    ``rows`` are dicts with name, kind (trial | baseline | teacher | mgd), miou and the cost; rows without
    the cost (e.g. no measured latency) are left out. The front points are ringed and named.
    """
    usable = [r for r in rows if r.get(cost_key) is not None and r.get("miou") is not None]
    if not usable:
        raise ValueError(f"plot_miou_vs_cost: no row has both 'miou' and {cost_key!r}")
    points = [(float(r[cost_key]), float(r["miou"])) for r in usable]
    front = pareto_front(points)
    fig = Figure(figsize=(7.5, 5), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    for kind, (marker, colour, size, label) in KIND_STYLE.items():
        chosen = [p for p, r in zip(points, usable, strict=True) if r.get("kind", "trial") == kind]
        if chosen:
            ax.scatter(*zip(*chosen, strict=True), marker=marker, c=colour, s=size, label=label, zorder=2)
    fx, fy = zip(*(points[i] for i in front), strict=True)
    ax.step(fx, fy, where="post", color="#2a9d8f", lw=1.5, zorder=1, label="Pareto front")
    ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="#2a9d8f", lw=1.5, zorder=3)
    for i in front:
        ax.annotate(str(usable[i]["name"]), points[i], xytext=(6, 4), textcoords="offset points", fontsize=8)
    costs = [c for c, _ in points if c > 0]
    if costs and max(costs) / min(costs) > 10:
        ax.set_xscale("log")
    ax.set_xlabel(COST_LABELS.get(cost_key, cost_key))
    ax.set_ylabel("val mIoU")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or f"mIoU vs {COST_LABELS.get(cost_key, cost_key)}")
    return _save(fig, out_png)


# ---------------------------------------------------------------------------- confusion matrix
def normalise_rows(cm: np.ndarray) -> np.ndarray:
    """Each ground-truth row divided by its sum (recall per class on the diagonal); empty rows stay 0."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], out_png: Path, title: str | None = None) -> Path:
    """Row-normalised confusion matrix (rows ground truth, columns prediction) as a heat map."""
    norm = normalise_rows(cm)
    n = len(class_names)
    if norm.shape != (n, n):
        raise ValueError(f"plot_confusion_matrix: matrix is {norm.shape} but there are {n} class names")
    side = 2.5 + 0.45 * n
    fig = Figure(figsize=(side + 1, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    if n <= 30:
        for (r, c), v in np.ndenumerate(norm):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v > 0.5 else "black")
    ax.set_title(title or "confusion matrix (row-normalised)")
    return _save(fig, out_png)


# ---------------------------------------------------------------------------- overlay pages
def overlay_grid(
    columns: Mapping[str, Sequence[np.ndarray]],
    images: Sequence[np.ndarray],
    palette: Palette,
    out_png: Path,
    alpha: float = 0.5,
    cell_inches: float = 2.0,
) -> Path:
    """A page with one row per image: the image, then one overlay per column (ground truth, models…).

    ``columns`` maps a column title to one H×W label map per image, in the order of ``images``.
    """
    for title, maps in columns.items():
        if len(maps) != len(images):
            raise ValueError(f"overlay_grid: column {title!r} has {len(maps)} label maps for {len(images)} images")
    titles = ["image", *columns]
    fig = Figure(figsize=(cell_inches * len(titles), cell_inches * len(images)), dpi=100, layout="constrained")
    axes = fig.subplots(len(images), len(titles), squeeze=False)
    for r, image in enumerate(images):
        cells = [image] + [overlay(image, maps[r], palette, alpha) for maps in columns.values()]
        for c, cell in enumerate(cells):
            axes[r][c].imshow(cell, interpolation="nearest")
            axes[r][c].set_axis_off()
            if r == 0:
                axes[r][c].set_title(titles[c], fontsize=9)
    return _save(fig, out_png)
