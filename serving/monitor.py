"""What the service sees, on BentoML's Prometheus /metrics: confidence and OOD-score histograms, a
counter per predicted class, and drift against the export's validation reference.

Drift is the population stability index (PSI) over the last `window` answers of (a) the predicted-class
mix against the validation split's and (b) the OOD score's distribution over the validation split's
decile bins (serving.base.manifest.OodReference). PSI = sum over bins of (served - reference) x
ln(served / reference); the usual reading is < 0.1 stable, 0.1-0.25 a moderate shift, > 0.25 a large one
(docs/serving.md has a sample alert rule). The window is a ring buffer of each answer's class and
score bin with running counts (O(1) per answer); the PSI gauges are recomputed from it at most once a
second (DRIFT_EVERY_S; Prometheus scrapes every 15 s or more), since computing them on every answer
was most of the per-request cost (43 of 125 us, benchmarks/ood.py cost).

Metrics are prometheus_client objects created in the worker (BentoML 1.4 deprecates its
bentoml.metrics wrapper for prometheus_client itself), after BentoML has pointed
PROMETHEUS_MULTIPROC_DIR at its registry folder, so BentoML's /metrics collects them with its own.
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from serving.base.manifest import OodReference

CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# OOD-score buckets as multiples of the model's threshold: the boundary sits on a bucket edge.
SCORE_BUCKETS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0, 16.0)
MIN_ANSWERS = 50  # fewer answers in the window than this: the drift gauges stay NaN (too few to compare)
FLOOR = 1e-4  # a bin's share is at least this in PSI, so an empty bin counts as rare, not as infinitely far
DRIFT_EVERY_S = 1.0


def psi(served: np.ndarray, reference: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    p = np.maximum(np.asarray(served, np.float64), FLOOR)
    q = np.maximum(np.asarray(reference, np.float64), FLOOR)
    return float(np.sum((p - q) * np.log(p / q)))


class Window:
    """The last `size` values of a binned signal, with their counts kept up to date (O(1) per value)."""

    def __init__(self, size: int, bins: int):
        self.values = np.zeros(size, np.int64)
        self.counts = np.zeros(bins, np.int64)
        self.filled = 0
        self.next = 0

    def add(self, values: np.ndarray) -> None:
        for v in values[-len(self.values):].tolist():
            if self.filled == len(self.values):
                self.counts[self.values[self.next]] -= 1
            else:
                self.filled += 1
            self.values[self.next] = v
            self.counts[v] += 1
            self.next = (self.next + 1) % len(self.values)

    def shares(self) -> np.ndarray:
        return self.counts / max(self.filled, 1)


class Monitor:
    """Records each answer's confidence, OOD score and class; `registry` is prometheus_client's default
    (the one BentoML's /metrics reads) unless a test passes its own."""

    def __init__(self, class_names: list[str], ood: OodReference | None, threshold: float | None, window: int,
                 registry: Any = None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram  # noqa: PLC0415 (after BentoML's setup)

        registry = registry or REGISTRY
        self.ood = ood
        self._confidence = Histogram("tlserve_confidence", "Top-1 probability of each answer",
                                     buckets=CONFIDENCE_BUCKETS, registry=registry)
        counter = Counter("tlserve_predictions", "Answers per predicted class", ["label"], registry=registry)
        self._per_class = [counter.labels(name) for name in class_names]
        self._classes = Window(window, len(class_names))
        self._drift = None
        if ood is None:
            return
        self._reference_mix = np.array([ood.class_reference.get(name, 0.0) for name in class_names])
        self._edges = np.asarray(ood.score_bins, np.float64)
        self._reference_scores = np.asarray(ood.score_reference, np.float64)
        self._scores = Window(window, len(self._edges) + 1)
        self._score = Histogram("tlserve_ood_score", f"OOD score of each answer ({ood.method}; out of distribution "
                                f"above {threshold:g})", buckets=tuple(threshold * b for b in SCORE_BUCKETS),
                                registry=registry)
        verdicts = Counter("tlserve_ood_answers", "Answers by OOD verdict", ["in_distribution"], registry=registry)
        self._verdict = {True: verdicts.labels("true"), False: verdicts.labels("false")}
        self._threshold = threshold
        self._drift_due = 0.0  # monotonic time of the next PSI update, once the window holds MIN_ANSWERS
        # livemax: with several workers, the worst worker's window (each worker keeps its own)
        self._drift = Gauge("tlserve_drift_psi", "Population stability index of the last answers against the "
                            "validation reference (signal: class_mix | ood_score); NaN until the window holds "
                            f"{MIN_ANSWERS} answers", ["signal"], multiprocess_mode="livemax", registry=registry)
        self._drift_mix, self._drift_score = self._drift.labels("class_mix"), self._drift.labels("ood_score")
        self._window = Gauge("tlserve_drift_window_answers", "Answers in the drift window (as of the PSI gauges)",
                             multiprocess_mode="livemax", registry=registry)
        for gauge in (self._drift_mix, self._drift_score):
            gauge.set(math.nan)

    def observe(self, probs: np.ndarray, scores: np.ndarray | None) -> None:
        top = probs.argmax(axis=1)
        for p, c in zip(probs[np.arange(len(top)), top].tolist(), top.tolist()):
            self._confidence.observe(p)
            self._per_class[c].inc()
        self._classes.add(top)
        if self._drift is None or scores is None:
            return
        for s in scores.tolist():
            self._score.observe(s)
            self._verdict[s <= self._threshold].inc()
        self._scores.add(np.searchsorted(self._edges, scores, side="right"))
        now = time.monotonic()
        if self._classes.filled >= MIN_ANSWERS and now >= self._drift_due:
            self._drift_due = now + DRIFT_EVERY_S
            self._window.set(self._classes.filled)
            self._drift_mix.set(psi(self._classes.shares(), self._reference_mix))
            self._drift_score.set(psi(self._scores.shares(), self._reference_scores))
