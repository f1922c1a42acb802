"""matplotlib figures for runs and reports (Agg backend: files only, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
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


def accuracy_bars(records: list[dict[str, Any]], path: Path) -> Path:
    names = [r["name"] for r in records]
    acc = [r["test"]["accuracy"] for r in records]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4))
    bars = ax.bar(names, acc, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{a:.3f}" for a in acc], fontsize=8)
    ax.set_title("test accuracy per run")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.05)
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
    for k, (name, rows) in enumerate(rows_by_variant.items()):
        used = [r for r in rows if r["accuracy"] is not None]
        ax.plot([r["coverage"] for r in used], [r["accuracy"] for r in used], marker="o", markersize=4, label=name)
        for r in used if k == 0 else []:  # the variants share thresholds: label one line's points
            ax.annotate(f"{r['threshold']:g}", (r["coverage"], r["accuracy"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("share of answers kept (coverage)")
    ax.set_ylabel("accuracy of the answers kept")
    ax.set_title("abstaining below a confidence threshold (points labelled by threshold)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
