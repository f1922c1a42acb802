"""The data check's analysis: from fingerprints, embeddings and pairs to the typed report.

One function per part of the report (pairs and leaks, balance, image facts, label issues), each
reading the Images columns, so the report is built row by row without keying anything by id().
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from serving.base.errors import UserError
from training.audit import ann
from training.audit.embeddings import LABEL_LAYERS, PCA_DIMS, POOLED, embeddings, last_layer, project
from training.audit.fingerprints import EMBED_SIZE, SPLITS, Images
from training.audit.pairs import Pair, Thresholds, search
from training.audit.report import (Balance, DataCheckReport, Entry, ImageFacts, LabelIssues, Leak, PairItem,
                                   SearchFacts)

GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L"}
LEAK_ORDER = {"train-test": 0, "train-val": 1, "val-test": 2}


@dataclass
class Meta:
    """What the loader knows beyond the images: where they came from and what it could not read."""
    source: str
    class_names: list[str]
    unreadable: list[dict[str, str]]
    not_images: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A finished check: the typed report, plus what the page needs (pairs by row, thumbnails)."""
    facts: DataCheckReport
    pairs: list[Pair] = field(default_factory=list)
    images: Images | None = None
    thumbnail: Callable[[int], Image.Image] | None = None  # row -> RGB image, for the page
    drop_train: list[int] = field(default_factory=list)    # rows of train images that duplicate val/test
    copied: dict[str, list[int]] = field(default_factory=dict)  # "test-in-train" -> rows of test images with a copy in train

    @property
    def data(self) -> dict[str, Any]:
        """report.json as a dict."""
        return self.facts.to_dict()


@dataclass(frozen=True)
class Options:
    mode: str
    thresholds: Thresholds
    weights: str
    search: str = "auto"
    cross_only: bool = False
    labels: bool = True          # full mode: rank label issues (training.audit.labels)
    # Full mode: also crops and small rotations (training.audit.geometry). Off by default: it also pairs
    # look-alike photos (a plane on a plain sky) and the built-in synthetic set's shapes (docs/decisions.md).
    crops: bool = False


def analyse(imgs: Images, meta: Meta, opts: Options, log, bar) -> Report:
    seconds: dict[str, float] = {}
    features, embed_note = _embed(imgs, opts, log, bar, seconds)
    emb = None if features is None else project(last_layer(features))
    how = ann.choose_search(opts.search, len(imgs.labels), emb is not None, log)
    t = time.perf_counter()
    candidates = None
    if how["used"] == "ann":
        candidates = ann.ann_candidates(emb, opts.thresholds.cosine, log=log, bar=bar)
        seconds["ann_index"] = round(time.perf_counter() - t, 2)
    pairs, truncated = search(imgs, emb, opts.thresholds, cross_only=opts.cross_only, log=log, bar=bar,
                              candidates=candidates, geometric=opts.crops and emb is not None)
    seconds["search"] = round(time.perf_counter() - t, 2)
    label_issues = _labels(imgs, features, meta.class_names, opts, log)
    if label_issues is not None and label_issues.seconds is not None:
        seconds["labels"] = label_issues.seconds
    items, conflicts, counts, leaks, drop, copied = _pair_items(imgs, pairs, meta.class_names)
    th = opts.thresholds
    facts = DataCheckReport(
        source=meta.source, mode=opts.mode, cross_split_only=opts.cross_only, class_names=list(meta.class_names),
        splits=_split_sizes(imgs),
        thresholds={"phash_distance": th.phash, "pixel_correlation": th.pixels, "cosine": th.cosine},
        embeddings=embed_note, search=SearchFacts(**how), pairs_found=len(pairs), pairs_truncated=truncated,
        duplicates=counts, leaks=leaks, label_conflicts=conflicts, pairs=items,
        balance=_balance(imgs, meta.class_names), images=_image_facts(imgs, meta.class_names),
        unreadable=meta.unreadable, not_images=meta.not_images, seconds=seconds, label_issues=label_issues)
    return Report(facts, pairs, imgs, None, sorted(drop), copied)


def _embed(imgs: Images, opts: Options, log, bar, seconds: dict[str, float]) -> tuple[np.ndarray | None, str]:
    """(pooled MobileNetV2 features or None, what the report says about them). Where the label classifier
    reads these same EMBED_SIZE images (no larger copies), the pass pools its LABEL_LAYERS too."""
    if opts.mode != "full" or imgs.small is None:
        return None, "fast mode: hashes only"
    t = time.perf_counter()
    layers = LABEL_LAYERS if opts.labels and imgs.label_small is None else (POOLED,)
    try:
        features = embeddings(imgs.small, opts.weights, log, bar, layers)
        note = f"MobileNetV2 ({opts.weights}) at {EMBED_SIZE}px, centred, top {PCA_DIMS} PCA axes"
    except UserError as exc:
        # A check without embeddings still finds exact and hash-near copies: say so, do not fail.
        features, note = None, f"skipped: {exc}"
        ann.warn(log)(f"warning: embeddings {note}")
    seconds["embeddings"] = round(time.perf_counter() - t, 2)
    imgs.small = None  # the 64-px copies are not needed any more
    return features, note


def _labels(imgs: Images, features: np.ndarray | None, names: list[str], opts: Options, log) -> LabelIssues | None:
    """Label issues on the 64-px features, or on larger copies' where the set is small (embeddings.label_side)."""
    if opts.mode != "full" or not opts.labels:
        return None
    from training.audit import labels  # noqa: PLC0415

    why = labels.unavailable() or (None if features is not None else "no embeddings to classify (see embeddings)")
    if why:
        ann.warn(log)(f"note: label issues skipped: {why}")
        return LabelIssues(status="skipped", why=why)
    start, side = time.perf_counter(), EMBED_SIZE
    if imgs.label_small is not None:
        side = imgs.label_small.shape[1]
        features = embeddings(imgs.label_small, opts.weights, log, False, LABEL_LAYERS)
        imgs.label_small = None
    issues = labels.find(features, imgs, names, side=side, log=log)
    issues.seconds = round(time.perf_counter() - start, 2)
    return issues


def entry(imgs: Images, names: list[str], row: int) -> Entry:
    return Entry(split=SPLITS[imgs.split[row]], file=imgs.names[row], label=names[int(imgs.labels[row])], row=row)


def _pair_items(imgs: Images, pairs: list[Pair], names: list[str]):
    """(pairs ordered, label conflicts, counts per split pair, leaks, train rows that duplicate val/test,
    rows of held-out images with a copy in another split by leak)."""
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"exact": 0, "near": 0})
    dup_of: dict[str, set[int]] = defaultdict(set)   # "test-in-train" -> rows of test images with a copy in train
    items, conflicts, drop = [], [], set()
    for p in pairs:
        sa, sb = SPLITS[imgs.split[p.a]], SPLITS[imgs.split[p.b]]
        counts[f"{sa}-{sb}"][p.kind] += 1
        if sa != sb:
            dup_of[f"{sb}-in-{sa}"].add(p.b)
            if sa == "train":
                drop.add(p.a)
        item = PairItem(a=entry(imgs, names, p.a), b=entry(imgs, names, p.b), kind=p.kind, how=p.how,
                        hamming=p.hamming, cosine=p.cosine, pixel_correlation=p.pixels)
        if imgs.labels[p.a] != imgs.labels[p.b]:
            conflicts.append(item)
        items.append(item)
    sizes = _split_sizes(imgs)
    leaks = {key: Leak(images=len(rows), of=sizes[key.split("-")[0]],
                       percent=round(100 * len(rows) / max(1, sizes[key.split("-")[0]]), 2))
             for key, rows in sorted(dup_of.items())}
    return (_order(items), conflicts, {k: counts[k] for k in sorted(counts)}, leaks, drop,
            {k: sorted(v) for k, v in dup_of.items()})


def _split_sizes(imgs: Images) -> dict[str, int]:
    return {s: int((imgs.split == i).sum()) for i, s in enumerate(SPLITS)}


def _order(items: list[PairItem]) -> list[PairItem]:
    """Leaks first (train-test, train-val, val-test), then within-split pairs; closest first."""
    return sorted(items, key=lambda it: (LEAK_ORDER.get(f"{it.a.split}-{it.b.split}", 3), it.kind != "exact",
                                         it.hamming, -(it.cosine or 0)))


def _balance(imgs: Images, names: list[str]) -> dict[str, Balance]:
    out = {}
    for s, split in enumerate(SPLITS):
        labels = imgs.labels[imgs.split == s]
        if len(labels) == 0:
            continue
        counts = np.bincount(labels, minlength=len(names))
        out[split] = Balance(counts={names[c]: int(counts[c]) for c in range(len(names))},
                             largest_smallest_ratio=round(float(counts.max() / counts.min()), 2) if counts.min() else None,
                             missing=[names[c] for c in range(len(names)) if counts[c] == 0])
    return out


def _image_facts(imgs: Images, names: list[str]) -> ImageFacts:
    sizes: dict[str, Counter] = defaultdict(Counter)
    for s, f in zip(imgs.split, imgs.facts):
        sizes[f["size"]][SPLITS[s]] += 1
    kinds = Counter()
    for f in imgs.facts:
        kinds["grayscale"] += f["mode"] in GRAYSCALE_MODES
        kinds["alpha"] += bool(f["alpha"])
        kinds["cmyk"] += f["mode"] == "CMYK"
        kinds["16-bit"] += f["mode"] in SIXTEEN_BIT_MODES
        kinds["palette"] += f["mode"] in ("P", "PA")
        kinds["exif_rotated"] += bool(f["exif_rotated"])
    return ImageFacts(
        sizes={size: dict(c) for size, c in sorted(sizes.items(), key=lambda kv: -sum(kv[1].values()))},
        modes=dict(Counter(f["mode"] for f in imgs.facts)),
        formats=dict(Counter(f["format"] for f in imgs.facts)),
        cameras=dict(Counter(f["camera"] for f in imgs.facts).most_common(20)),
        kinds={k: int(v) for k, v in kinds.items()},
        class_outliers=_class_outliers(imgs, names))


def _class_outliers(imgs: Images, names: list[str], *, min_images: int = 5) -> list[str]:
    """A class whose images mostly share a size, format, mode or camera (EXIF make and model: the
    source) the other classes rarely have: a model can learn that instead of the disease."""
    out = []
    labels = imgs.labels
    for attr in ("size", "format", "mode", "camera"):
        values = np.asarray([f[attr] for f in imgs.facts], dtype=object)
        for c, name in enumerate(names):
            mine, rest = values[labels == c], values[labels != c]
            if len(mine) < min_images or len(rest) < min_images:
                continue
            top, n = Counter(mine).most_common(1)[0]
            share, share_rest = n / len(mine), float(np.mean(rest == top))
            if share >= 0.5 and share - share_rest >= 0.4:
                out.append(f"class '{name}': {share:.0%} of its images have {attr} {top}, "
                           f"against {share_rest:.0%} of the other classes'")
    return out
