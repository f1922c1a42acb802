"""matplotlib figures for runs and reports (Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Training and validation accuracy and loss per epoch, every run on shared axes."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [("accuracy", "training accuracy"), ("val_accuracy", "validation accuracy"),
              ("loss", "training loss"), ("val_loss", "validation loss")]
    for ax, (key, title) in zip(axes.flat, panels):
        for r in records:
            epochs = [h["epoch"] for h in r["history"] if h.get(key) is not None]
            values = [h[key] for h in r["history"] if h.get(key) is not None]
            if values:
                ax.plot(epochs, values, marker="o", markersize=3, label=r["name"])
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def distinct_labels(values: list[float], least: int = 4, most: int = 10) -> list[str]:
    """Each value with the fewest decimals (at least `least`) at which it prints unlike every different
    value: 0.9967 and 0.9975 stay four digits, 0.9975 and 0.99750001 get eight. (Two labels of one length
    differ by construction; labels of different lengths differ anyway.)"""
    def label(v: float) -> str:
        others = {w for w in values if w != v}
        digits = next((d for d in range(least, most + 1) if all(f"{v:.{d}f}" != f"{w:.{d}f}" for w in others)), most)
        return f"{v:.{digits}f}"

    return [label(v) for v in values]


def zoomed_range(values: list[float]) -> tuple[float, float]:
    """(bottom, top) of an axis that shows differences between values near each other: from 0 when the
    values spread over much of [0, 1], else from a little below the lowest (the axis label says so)."""
    low, high = min(values), max(values)
    pad = max(high - low, 0.005)
    bottom = max(0.0, low - pad)
    if bottom < 0.2:
        bottom = 0.0
    else:  # a round number of 1/1000s, so the axis starts at a value that reads plainly
        bottom = np.floor(bottom * 1000) / 1000
    return float(bottom), float(max(high + 0.2 * (high - bottom), 1.05 if bottom == 0 else 0))  # room for labels


def accuracy_bars(records: list[dict[str, Any]], path: Path, *, leaky: dict[str, float | None] | None = None) -> Path:
    """Test accuracy per run on an axis zoomed to the values, each labelled with as many decimals as it takes
    to tell them apart. `leaky`: {run: leak-free accuracy or None} of runs whose test images copy training
    images: their bars are hatched, labelled LEAKY, with the leak-free accuracy marked."""
    leaky = leaky or {}
    names = [r["name"] for r in records]
    acc = [r["test"]["accuracy"] for r in records]
    free = {n: a for n, a in leaky.items() if a is not None}
    shown = dict(zip(acc + list(free.values()), distinct_labels(acc + list(free.values()))))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    colours = ["#DD8452" if n in leaky else "#4C72B0" for n in names]
    bars = ax.bar(names, acc, color=colours, hatch=["//" if n in leaky else "" for n in names])
    labels = [shown[a] + ("\nLEAKY" if n in leaky else "") for n, a in zip(names, acc)]
    ax.bar_label(bars, labels=labels, fontsize=8)
    if free:
        xs = [names.index(n) for n in free]
        ax.scatter(xs, list(free.values()), marker="D", color="black", zorder=3, s=25,
                   label="leak-free accuracy (test images with no copy in train/val)")
        for x, a in zip(xs, free.values()):
            ax.annotate(shown[a], (x, a), xytext=(6, -3), textcoords="offset points", fontsize=7)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), frameon=False)
    bottom, top = zoomed_range(acc + list(free.values()))
    ax.set_ylim(bottom, top)
    ax.set_title("test accuracy per run" + (" (hatched: LEAKY, its test images copy training images)" if leaky else ""),
                 fontsize=9 if leaky else None)
    ax.set_ylabel("test accuracy" + (f" (axis from {bottom:g}, not 0)" if bottom > 0 else ""))
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)


def tradeoff(points: list[tuple[str, float, float]], path: Path) -> Path:
    """Accuracy against serving latency (p50, batch 1): the trade-off a deployer picks from."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for name, latency, accuracy in points:
        ax.scatter(latency, accuracy, s=50)
        ax.annotate(name, (latency, accuracy), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    # plain milliseconds (0.4, 2) rather than matplotlib's 4x10^-1 on a log axis
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.margins(x=0.2)  # room for the labels of the points at either end
    ax.set_title("accuracy against serving latency")
    ax.set_xlabel("onnxruntime p50 latency, batch 1 (ms, log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def confusion(matrix: list[list[int]], class_names: list[str], title: str, path: Path) -> Path:
    m = np.asarray(matrix)
    size = max(4, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, fontsize=7, ha="right")
    ax.set_yticks(range(len(class_names)), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    threshold = m.max() / 2 if m.size else 0
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=6, color="white" if v > threshold else "black")
    return _save(fig, path)


def feature_grid(maps: np.ndarray, title: str, path: Path) -> Path:
    """(H, W, C) activations → a grid of C small images."""
    channels = maps.shape[-1]
    cols = int(np.ceil(np.sqrt(channels)))
    rows = int(np.ceil(channels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 1.3 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < channels:
            ax.imshow(maps[..., i], cmap="viridis")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def reliability(bins_by_variant: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Reliability diagram: accuracy against mean confidence per confidence bin (training.record.metrics's
    bins), one line per variant; the diagonal is perfect calibration, below it over-confidence."""
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=1, label="perfect calibration")
    width = None
    for k, (name, bins) in enumerate(bins_by_variant.items()):
        used = [b for b in bins if b["count"]]
        ax.plot([b["confidence"] for b in used], [b["accuracy"] for b in used], marker="o", markersize=4, label=name)
        width = (bins[0]["high"] - bins[0]["low"]) if bins else 0.1
        share = len(bins_by_variant)
        hist.bar([b["low"] + width * (k + 0.5) / share for b in bins], [b["count"] for b in bins],
                 width=width / share, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in the bin")
    ax.set_title("reliability diagram")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("confidence (top probability)")
    hist.set_ylabel("images")
    hist.grid(alpha=0.3)
    return _save(fig, path)


def coverage(rows_by_variant: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """The accuracy/coverage trade-off of abstaining below a confidence threshold, per variant."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rows in rows_by_variant.items():
        used = [r for r in rows if r["accuracy"] is not None]
        ax.plot([r["coverage"] for r in used], [r["accuracy"] for r in used], marker="o", markersize=4, label=name)
    first = next(iter(rows_by_variant.values()), [])
    _label_points(ax, [(r["coverage"], r["accuracy"], r["threshold"]) for r in first if r["accuracy"] is not None])
    ax.set_xlabel("share of answers kept (coverage)")
    ax.set_ylabel("accuracy of the answers kept")
    ax.set_title("abstaining below a confidence threshold (points labelled by threshold)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


LEADER = {"arrowstyle": "-", "color": "#999", "linewidth": 0.6}


def _label_points(ax, points: list[tuple[float, float, float]], fontsize: int = 7) -> None:
    """Label (x, y, threshold) points so that no two labels overlap: thresholds at the same point share one
    label ("0.5-0.99"); going up from the lowest point, a label that would cover one already placed moves
    just above it, so a cluster's labels form a column in threshold order, each tied to its point by a
    line. (matplotlib has no label placement of its own; adjustText would be a new dependency for one
    plot.) The layout is fixed first, so the extents measured here are the saved ones."""
    groups: dict[tuple[float, float], list[float]] = {}
    for x, y, t in points:
        groups.setdefault((round(x, 6), round(y, 6)), []).append(t)
    fig = ax.figure
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    gap = 4 * fig.dpi / 72  # 4 points between a point and its label, in pixels
    labels = []
    for (x, y), thresholds in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
        text = f"{thresholds[0]:g}" if len(thresholds) == 1 else f"{min(thresholds):g}-{max(thresholds):g}"
        probe = ax.text(0, 0, text, fontsize=fontsize)
        size = probe.get_window_extent(renderer)
        probe.remove()
        labels.append(((x, y), text, size.width, size.height))
    widest = max((w for *_, w, _ in labels), default=0)
    at = [ax.transData.transform(point) for point, *_ in labels]
    # Labels that would pass the right edge go on the left of their points, and so do their neighbours'
    # (within two label widths), so that a cluster's labels stay in one column.
    left = [px + gap + widest > frame.x1 for px, _ in at]
    while True:
        more = [lt or any(left[j] and np.hypot(*(at[i] - at[j])) < 2 * widest for j in range(len(at)))
                for i, lt in enumerate(left)]
        if more == left:
            break
        left = more
    placed = []
    for ((x, y), text, width, height), (px, py), on_left in zip(labels, at, left):
        x0 = px - gap - width if on_left else px + gap
        y0 = py + gap if py + gap + height <= frame.y1 else py - gap - height
        box = Bbox.from_bounds(x0, y0, width, height)
        while (hit := next((b for b in placed if box.overlaps(b)), None)) is not None:
            box = box.translated(0, hit.y1 + 1 - box.y0)
        placed.append(box)
        moved = abs(box.y0 - y0) > 1
        to_points = 72.0 / fig.dpi
        label = ax.annotate(text, (x, y), xytext=((box.x0 - px) * to_points, (box.y0 - py) * to_points),
                            textcoords="offset points", fontsize=fontsize, annotation_clip=False,
                            va="bottom", ha="left", arrowprops=LEADER if moved else None)
        label.set_in_layout(False)  # _save's tight_layout must not move the axes under the placed labels
