"""Classification metrics from labels and probabilities: numpy only, one definition for training's
record, `tlserve eval`, the export gate and the report.

Precision, recall and F1 follow scikit-learn's definitions (a class never predicted has precision 0,
a class with no support has recall 0; macro = unweighted mean over classes, weighted = by support);
we do not depend on scikit-learn for five lines of arithmetic on a confusion matrix.
"""
from __future__ import annotations

from typing import Any

import numpy as np

ECE_BINS = 15
COVERAGE_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def per_class(matrix: np.ndarray, class_names: list[str]) -> dict[str, dict[str, float | int]]:
    """{class: {precision, recall, f1, support}} from a confusion matrix."""
    m = np.asarray(matrix, np.float64)
    tp = np.diag(m)
    predicted, support = m.sum(axis=0), m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])} for i, name in enumerate(class_names)}


def summary(matrix: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted F1 (classes with support only
    count towards the weighted mean; every class towards the macro mean, as scikit-learn does)."""
    m = np.asarray(matrix, np.int64)
    classes = per_class(m, class_names)
    f1 = np.array([c["f1"] for c in classes.values()])
    support = np.array([c["support"] for c in classes.values()], np.float64)
    total = support.sum()
    return {
        "accuracy": float(np.trace(m) / total) if total else None,
        "macro_f1": float(f1.mean()) if len(f1) else None,
        "weighted_f1": float((f1 * support).sum() / total) if total else None,
        "per_class": classes,
    }


def top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int = 5) -> float | None:
    if probs.shape[1] <= k or not len(y_true):
        return None
    top = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    return float(np.mean((top == np.asarray(y_true)[:, None]).any(axis=1)))


def reliability(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict[str, Any]:
    """Expected calibration error (Guo et al. 2017: equal-width confidence bins, weighted |acc - conf|)
    and the per-bin figures a reliability diagram draws."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        acc = float(correct[sel].mean()) if n else None
        mean_conf = float(conf[sel].mean()) if n else None
        if n:
            ece += n / len(conf) * abs(acc - mean_conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "accuracy": acc, "confidence": mean_conf})
    return {"ece": float(ece) if len(conf) else None, "bins": rows}


def ece(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float | None:
    return reliability(y_true, probs, bins)["ece"]


def coverage(y_true: np.ndarray, probs: np.ndarray, thresholds=COVERAGE_THRESHOLDS) -> list[dict[str, Any]]:
    """The accuracy/coverage trade-off of abstaining below a confidence threshold: for each threshold,
    the share of answers kept and their accuracy."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y_true)
    out = []
    for t in thresholds:
        kept = conf >= t
        out.append({"threshold": float(t), "coverage": float(kept.mean()) if len(conf) else None,
                    "accuracy": float(correct[kept].mean()) if kept.any() else None})
    return out


def nll(y_true: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs[np.arange(len(y_true)), np.asarray(y_true)], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) from softmax(logits): log-probabilities differ from logits by a per-row
    constant, which softmax ignores, so the model's logits are not needed."""
    z = np.log(np.clip(probs.astype(np.float64), 1e-30, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(y_true: np.ndarray, probs: np.ndarray, *, low: float = 0.05, high: float = 20.0) -> float:
    """The temperature minimising the negative log-likelihood (Guo et al. 2017). One scalar: a golden-
    section search over log T (NLL is unimodal in T for a fixed set of logits), no optimizer needed."""
    if not len(y_true):
        return 1.0
    a, b = np.log(low), np.log(high)
    ratio = (np.sqrt(5) - 1) / 2
    f = lambda log_t: nll(y_true, apply_temperature(probs, float(np.exp(log_t))))  # noqa: E731
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(60):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return float(np.exp((a + b) / 2))
