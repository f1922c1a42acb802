"""`tlserve data check`: duplicates and leaks across splits, label conflicts, label issues, balance, odd files.

The check runs in passes, one module each (all in training/audit/):
  fingerprints  decode every image once: exact hash, perceptual hash (and its mirror's), grey and colour
                summaries, and in full mode a 64-px copy;
  embeddings    (full mode) the frozen ImageNet MobileNetV2's pooled features;
  pairs, ann    every pair within the thresholds, searched exactly (or through a faiss index past
                ann.ANN_ABOVE images);
  labels        (full mode) out-of-fold class probabilities from a light classifier on the features,
                ranked by confident learning (cleanlab): the images whose label looks wrong;
  analysis      the typed report (report.py), which page.py renders and guard.py (a training run's own
                check) reads.

Split assignment is training.data.sources.list_folder's, the one training uses (same seed and
--val-split), so a leak reported here is a leak the run has.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from serving.base import images
from serving.base.errors import UserError
from training import progress
from training.audit import ann
from training.audit.analysis import Meta, Options, Report, analyse
from training.audit.embeddings import check_weights, label_side
from training.audit.fingerprints import fingerprint_arrays, fingerprint_files, not_images
from training.audit.pairs import Thresholds
from training.config import DataConfig

CHECK_MODES = ("fast", "full")


def check(cfg: DataConfig, *, mode: str = "full", thresholds: Thresholds = Thresholds(), weights: str = "imagenet",
          log: progress.Log | None = None, bar: bool | None = None, search: str = "auto", labels: bool = True,
          crops: bool = False) -> Report:
    """Check a `--data` source as training would split it."""
    thresholds.validate()
    if mode not in CHECK_MODES:
        raise UserError(f"--mode must be fast or full, not '{mode}'")
    if search not in ann.SEARCHES:
        raise UserError(f"--search must be one of {', '.join(ann.SEARCHES)}, not '{search}'")
    from training.data.sources import check_config, load_dataset, list_folder  # noqa: PLC0415

    check_config(cfg)
    if mode == "full":
        check_weights(weights)
    start = time.perf_counter()
    scheme, _, arg = cfg.spec.partition(":")
    if scheme == "folder" and arg:
        listing = list_folder(cfg, Path(arg).expanduser())
        side = _label_side(mode, labels, sum(len(files) for files, _ in listing.splits.values()))
        imgs, unreadable = fingerprint_files(listing, mode, log, bar, label_side=side)
        root = listing.root
        meta = Meta(f"folder {root} ({listing.layout})", listing.class_names, unreadable,
                    not_images(listing.class_folders, root))

        def thumbnail(row: int) -> Image.Image:
            return images.open_image(root / imgs.names[row])
    else:
        ds = load_dataset(cfg)
        side = _label_side(mode, labels, len(ds.train) + len(ds.val) + len(ds.test))
        imgs = fingerprint_arrays({"train": ds.train, "val": ds.val, "test": ds.test}, mode, log, bar, label_side=side)
        arrays = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
        meta = Meta(ds.source, ds.class_names, [{"file": f, "why": why} for f, why in ds.skipped.items()])

        def thumbnail(row: int) -> Image.Image:
            return Image.fromarray(arrays[row])
    if len(imgs.labels) == 0:
        raise UserError(f"--data {cfg.spec}: no readable images to check")
    report = analyse(imgs, meta, Options(mode, thresholds, weights, search, labels=labels, crops=crops), log, bar)
    report.thumbnail = thumbnail
    report.facts.seconds["total"] = round(time.perf_counter() - start, 2)
    return report


def _label_side(mode: str, labels: bool, images: int) -> int | None:
    """Larger copies for the label classifier only when it will run (see analysis._labels)."""
    from training.audit.labels import unavailable  # noqa: PLC0415

    return label_side(images) if mode == "full" and labels and unavailable() is None else None


def check_dataset(dataset, *, mode: str, thresholds: Thresholds = Thresholds(), weights: str = "imagenet",
                  log: progress.Log | None = None, search: str = "auto") -> Report:
    """The training run's own check, on the pixels it is about to train on (cross-split pairs only, no labels)."""
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    imgs = fingerprint_arrays(splits, mode, log, bar=False)
    meta = Meta(dataset.source, dataset.class_names,
                [{"file": f, "why": why} for f, why in dataset.skipped.items()])
    opts = Options(mode, thresholds, weights, search, cross_only=True, labels=False)
    return analyse(imgs, meta, opts, log, False)
