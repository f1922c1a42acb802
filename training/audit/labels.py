"""Label issues: images whose given label the data itself argues against.

Confident learning (Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70, 2021) on out-of-fold predicted probabilities: a light classifier (scikit-learn's
multinomial LogisticRegression on MobileNetV2's features pooled at five depths (embeddings.LABEL_LAYERS),
centred and projected on their top LABEL_DIMS principal axes)
is fitted FOLDS times, each time predicting the fold it did not see, so every image gets class
probabilities from a model that never saw its label; that is repeated over REPEATS different fold
partitions and averaged (still out of fold: no model ever saw the image it predicts). cleanlab's
`find_label_issues` (the reference implementation, the optional extra `pip install 'tlserve[labels]'`)
then estimates the joint of given and true labels from those probabilities and lists the images most
likely mislabelled; each is scored by its self-confidence (the fold model's probability of the given
label; lower is more suspect).

All splits are pooled: a wrong label in test costs as much as one in train, and more images make a
better fold model. A class with fewer than two images cannot be cross-validated: it is skipped, said so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from training.audit.ann import warn
from training.audit.embeddings import LABEL_LAYERS, project
from training.audit.fingerprints import SPLITS, Images, list_name
from training.audit.report import Entry, LabelIssues, Suspect

FOLDS = 5
# Fold partitions averaged: fewer of a partition's chance splits in each image's probability. 3 against 1
# (recall in the top 2k, self-confidence, 2026-12-05): banana-leaf 10 draws 0.879 -> 0.897 similar-class,
# 0.962 -> 0.966 uniform; CIFAR-10 10k one draw 0.32 -> 0.33 and 0.745 -> 0.770. It costs 3x the fits.
REPEATS = 3
MIN_PER_CLASS = 2          # images a class needs to be in every fold's training part at least once
# The fold model: LogisticRegression (C) on the features centred and projected on their top LABEL_DIMS
# principal axes, unit length times sqrt(LABEL_DIMS). Measured (docs/decisions.md): on CIFAR-10 the 1,280
# raw features overfit (out-of-fold accuracy 0.575 at 64 px, 0.701 at 128 px; 128 axes: 0.617, 0.729) and
# cost 15x the CPU; on banana-leaf 128 axes match the raw features (0.936 against 0.934 at 224 px).
# 256 axes of the five depths (embeddings.LABEL_LAYERS): banana-leaf no better, twice the 60k check's label time.
LABEL_DIMS = 128
# Stronger regularisation than sklearn's C 1 keeps the fold model from learning the flipped labels it is
# meant to doubt: on banana-leaf, 3 draws of 5% flips (benchmarks/label_issues.py), C 0.03 against 0.1 gave
# recall in the top 2k 0.99 / 0.92 (uniform / similar-class) against 0.96 / 0.90, and precision of the
# default list 0.86 / 0.67 against 0.74 / 0.53; C 0.01 shortened the list below the planted count.
C = 0.03
MAX_ITER = 300
CLEANLAB_INSTALL = "pip install 'tlserve[labels]' (cleanlab)"
# How many images to list comes from confident learning's estimate of the joint of given and true labels
# (off-diagonal counts); which ones, from the lowest self-confidence. On banana-leaf with 5% planted flips
# (benchmarks/label_issues.py) this list was the most precise of cleanlab's filters at the same recall:
# precision 0.71 / 0.56 (uniform / similar-class flips) against prune_by_noise_rate's 0.53 / 0.45.
FILTER_BY = "low_self_confidence"
# Below this out-of-fold accuracy the fold model's own confusions outnumber the labels it doubts: planted
# flips made 90% of the default list on banana-leaf (0.91 out of fold) and 14% on a CIFAR-10 subset (0.72).
WEAK_FOLD_ACCURACY = 0.85
# The ranking (the score and the list's order): cleanlab's self-confidence, p(given). Its normalized margin
# (p(given) - the largest other p) found more similar-class flips (recall in the top 2k, 3 partitions:
# banana-leaf 0.897 -> 0.910, CIFAR-10 10k 0.33 -> 0.40) but far fewer uniform ones where the fold model
# is weak (CIFAR-10 10k 0.77 -> 0.53: its own confident confusions outrank them); docs/decisions.md.
RANK_BY = "self_confidence"
METHOD = ("confident learning (Northcutt et al. 2021): cleanlab.filter.find_label_issues, "
          f"filter_by={FILTER_BY}, ranked by {RANK_BY.replace('_', ' ')}; out-of-fold probabilities "
          f"averaged over {REPEATS} fold partitions")


@dataclass
class OutOfFold:
    probs: np.ndarray          # (N, classes) probabilities; rows of skipped classes are all zero
    kept: np.ndarray           # (N,) bool: rows that were cross-validated
    folds: int
    skipped_classes: list[int]


def _import_cleanlab():
    import cleanlab.filter  # noqa: PLC0415  (the optional `labels` extra)
    import cleanlab.rank  # noqa: PLC0415

    return cleanlab


def out_of_fold(features: np.ndarray, labels: np.ndarray, n_classes: int, *, folds: int = FOLDS,
                seed: int = 0, c: float = C, repeats: int = REPEATS) -> OutOfFold:
    """Each image's class probabilities from the fold model that did not train on it."""
    from sklearn.linear_model import LogisticRegression  # noqa: PLC0415
    from sklearn.model_selection import StratifiedKFold, cross_val_predict  # noqa: PLC0415

    counts = np.bincount(labels, minlength=n_classes)
    skipped = [int(k) for k in np.nonzero((counts > 0) & (counts < MIN_PER_CLASS))[0]]
    kept = np.isin(labels, np.nonzero(counts >= MIN_PER_CLASS)[0])
    present = np.unique(labels[kept])
    folds = int(min(folds, counts[present].min()))
    x = project(features[kept], min(LABEL_DIMS, features.shape[1])) * np.sqrt(LABEL_DIMS)
    probs_kept = np.mean([
        cross_val_predict(LogisticRegression(C=c, max_iter=MAX_ITER), x, labels[kept], method="predict_proba",
                          cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed + r))
        for r in range(repeats)], axis=0)
    probs = np.zeros((len(labels), n_classes), np.float32)
    probs[np.ix_(np.nonzero(kept)[0], present)] = probs_kept
    return OutOfFold(probs, kept, folds, skipped)


def ranked_issues(labels: np.ndarray, oof: OutOfFold) -> tuple[np.ndarray, np.ndarray]:
    """(rows cleanlab lists as label issues, most suspect first; every row's label-quality score)."""
    cleanlab = _import_cleanlab()
    rows = np.nonzero(oof.kept)[0]
    present = np.unique(labels[rows])
    local = np.searchsorted(present, labels[rows])          # cleanlab wants classes 0..K-1, each present
    probs = oof.probs[np.ix_(rows, present)]
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)
    issues = cleanlab.filter.find_label_issues(local, probs, filter_by=FILTER_BY,
                                               return_indices_ranked_by=RANK_BY, n_jobs=1)
    scores = np.ones(len(labels), np.float32)
    scores[rows] = cleanlab.rank.get_label_quality_scores(local, probs, method=RANK_BY)
    return rows[np.asarray(issues, np.int64)], scores


def unavailable() -> str | None:
    """Why the label search cannot run here (cleanlab missing), or None."""
    try:
        _import_cleanlab()
    except ImportError:
        return f"cleanlab is not installed: {CLEANLAB_INSTALL} adds label issues"
    return None


def find(features: np.ndarray, imgs: Images, names: list[str], *, side: int, log=None, seed: int = 0) -> LabelIssues:
    """The report's label_issues: cleanlab's suspects with their fold probabilities, or why none."""
    labels = imgs.labels
    counts = np.bincount(labels, minlength=len(names))
    if int((counts >= MIN_PER_CLASS).sum()) < 2:
        why = (f"{int((counts > 0).sum())} class(es) with images, {int((counts >= MIN_PER_CLASS).sum())} with "
               f"{MIN_PER_CLASS} or more: a label can only be doubted against another class")
        warn(log)(f"note: label issues skipped: {why}")
        return LabelIssues(status="skipped", why=why)
    start = time.perf_counter()  # the caller adds the label pass's embeddings to seconds
    oof = out_of_fold(features, labels, len(names), seed=seed)
    for k in oof.skipped_classes:
        warn(log)(f"note: label issues: class '{names[k]}' has {counts[k]} image (fewer than {MIN_PER_CLASS}): "
                  "no k-fold possible, its images are skipped")
    issues, scores = ranked_issues(labels, oof)
    kept = np.nonzero(oof.kept)[0]
    accuracy = float((oof.probs[kept].argmax(axis=1) == labels[kept]).mean())
    caution = _caution(accuracy, len(issues), len(kept))
    if caution:
        warn(log)(f"note: label issues: {caution}")
    return LabelIssues(
        status="done", why=f"{len(issues):,} of {len(kept):,} images listed", method=METHOD,
        classifier=f"LogisticRegression (C {C}) on MobileNetV2 features pooled at {len(LABEL_LAYERS)} depths at "
                   f"{side} px, top {LABEL_DIMS} "
                   f"principal axes; {oof.folds}-fold, all splits pooled",
        folds=oof.folds, images=len(kept), out_of_fold_accuracy=round(accuracy, 4), caution=caution,
        skipped_classes=[names[k] for k in oof.skipped_classes],
        suspects=[_suspect(imgs, names, oof.probs, scores, int(r)) for r in issues],
        typical=_typical(imgs, names, oof), seconds=round(time.perf_counter() - start, 2))


def _caution(accuracy: float, listed: int, images: int) -> str | None:
    if accuracy >= WEAK_FOLD_ACCURACY:
        return None
    return (f"the fold model is right on only {accuracy:.0%} of the images out of fold, so most of the "
            f"{listed:,} listed are likely its own confusions rather than wrong labels: read the list from the top "
            "(most suspect first), and expect a better list from a backbone that separates these classes better")


def _suspect(imgs: Images, names: list[str], probs: np.ndarray, scores: np.ndarray, row: int) -> Suspect:
    p = probs[row]
    return Suspect(split=SPLITS[imgs.split[row]], file=imgs.names[row], given=names[int(imgs.labels[row])],
                   suggested=names[int(p.argmax())], score=round(float(scores[row]), 4),
                   probabilities={names[k]: round(float(p[k]), 4) for k in range(len(names))}, row=row)


def _typical(imgs: Images, names: list[str], oof: OutOfFold) -> dict[str, Entry]:
    """Each class's image its fold model was surest of: what the page shows beside a suspect."""
    out = {}
    for k, name in enumerate(names):
        rows = np.nonzero(oof.kept & (imgs.labels == k))[0]
        if len(rows):
            row = int(rows[oof.probs[rows, k].argmax()])
            out[name] = Entry(split=SPLITS[imgs.split[row]], file=imgs.names[row], label=name, row=row)
    return out


def suspect_list(issues: LabelIssues) -> str:
    """The suspects as a file of paths, one a line (`tlserve train --exclude` reads it)."""
    return "".join(f"{list_name(s.split, s.file)}\n" for s in issues.suspects)
