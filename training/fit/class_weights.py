"""Class weights for imbalanced data (`tlserve train --class-weight`) and the imbalance warning.

`balanced` is scikit-learn's heuristic: n_samples / (n_classes * count), so every class carries the
same total weight in the loss; `name=weight,...` sets some classes by hand (the others keep 1).
"""
from __future__ import annotations

import math

import numpy as np

from serving.base.errors import UserError, nearest

MODES = ("none", "balanced")
# Largest over smallest class count above which the data summary warns (banana-leaf: 198 vs 42).
IMBALANCE_RATIO = 3.0


def check_spec(spec: str) -> None:
    """The syntax of --class-weight, before any data is loaded (class names are checked later)."""
    if spec in MODES:
        return
    _pairs(spec)


def _pairs(spec: str) -> dict[str, float]:
    pairs: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        name, sep, raw = part.partition("=")
        try:
            weight = float(raw)
        except ValueError:
            weight = math.nan
        if not sep or not name.strip() or not (math.isfinite(weight) and weight > 0):
            raise UserError(f"--class-weight '{spec}': use balanced, none, or name=weight,... with weights above 0 "
                            f"(at '{part}')")
        pairs[name.strip()] = weight
    return pairs


def resolve(spec: str, y: np.ndarray, class_names: list[str]) -> dict[int, float] | None:
    """{class index: weight} for Keras's fit, every class listed (tf-keras wants all of them), or None."""
    if spec == "none":
        return None
    n = len(class_names)
    if spec == "balanced":
        counts = np.bincount(np.asarray(y, np.int64), minlength=n)
        # A class absent from the training split has nothing to weight: it keeps 1.
        return {i: (float(len(y) / (n * c)) if c else 1.0) for i, c in enumerate(counts)}
    pairs = _pairs(spec)
    for name in pairs:
        if name not in class_names:
            raise UserError(f"--class-weight: no class named '{name}'{nearest(name, class_names)}")
    return {i: pairs.get(name, 1.0) for i, name in enumerate(class_names)}


def by_name(weights: dict[int, float] | None, class_names: list[str]) -> dict[str, float] | None:
    return None if weights is None else {class_names[i]: round(w, 6) for i, w in weights.items()}


def counts(y: np.ndarray, class_names: list[str]) -> dict[str, int]:
    found = np.bincount(np.asarray(y, np.int64), minlength=len(class_names))
    return {name: int(found[i]) for i, name in enumerate(class_names)}


def imbalance_warning(class_counts: dict[str, int]) -> str | None:
    """One line when the largest class has more than IMBALANCE_RATIO times the images of the smallest."""
    if len(class_counts) < 2:
        return None
    large = max(class_counts, key=class_counts.get)
    small = min(class_counts, key=class_counts.get)
    if class_counts[large] <= IMBALANCE_RATIO * class_counts[small]:
        return None
    return (f"warning: imbalanced training split: '{large}' has {class_counts[large]} images, '{small}' "
            f"{class_counts[small]} (more than {IMBALANCE_RATIO:g}x); consider --class-weight balanced")
