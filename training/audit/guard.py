"""A training run's own data check (--data-check, --drop-leaks) and its --exclude list."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.base.errors import UserError
from training import progress
from training.audit.datacheck import check_dataset
from training.audit.fingerprints import list_name

MODES = ("off", "fast", "full")


@dataclass(frozen=True)
class HeldCopies:
    """Which held-out images the model may have seen, after any --drop-leaks (indices into the split):
    calibration fits on the other validation images, the record scores the other test images too."""
    val: np.ndarray   # validation images with a copy in train
    test: np.ndarray  # test images with a copy in train or in validation (early stopping and calibration see val)


def held_copies(copied: dict[str, list[int]], n_train: int, n_val: int, dropped: bool) -> HeldCopies:
    """The check's copied rows as split indices; --drop-leaks removed every training copy, so then only
    test images that copy a validation image are left."""
    def rows(key: str, offset: int) -> set[int]:
        return {r - offset for r in copied.get(key, [])}

    val = set() if dropped else rows("val-in-train", n_train)
    test = rows("test-in-val", n_train + n_val) | (set() if dropped else rows("test-in-train", n_train + n_val))
    return HeldCopies(np.asarray(sorted(val), np.int64), np.asarray(sorted(test), np.int64))


def _leak_line(key: str, images: int, percent: float, dropped: bool) -> str:
    """One leak ("test-in-train": test images with a copy in train) as the run reports it: a warning,
    unless --drop-leaks has removed the training copies behind it."""
    held, _, source = key.partition("-in-")
    found = f"{images:,} {held} image(s) ({percent:.2f}%) have an exact or near copy in {source}"
    if dropped and source == "train":
        return f"data check: {found}; their training copies were dropped, so {held} accuracy does not count them"
    hint = " (--drop-leaks removes the training copies)" if source == "train" else ""
    return f"warning: data check: {found}; {held} accuracy will read high{hint}"


def guard(dataset, cfg, log: progress.Log) -> tuple[Any, dict[str, Any] | None, HeldCopies | None]:
    """Check a run's splits for cross-split copies before it trains: warn, record the counts, and with
    --drop-leaks remove the training images that duplicate a val or test image. (dataset, record part,
    the held-out images that copy what the model learns from; None without a check)."""
    if cfg.data_check not in MODES:
        raise UserError(f"--data-check must be one of {', '.join(MODES)}, not '{cfg.data_check}'")
    if cfg.data_check == "off":
        if cfg.drop_leaks:
            raise UserError("--drop-leaks needs the data check: use --data-check fast or full")
        return dataset, None, None
    start = time.perf_counter()
    # full: the run's own MobileNetV2 weights when it has a file of them, else Keras's ImageNet download.
    weights = cfg.weights if cfg.backbone == "mobilenetv2" and cfg.weights and Path(cfg.weights).is_file() else "imagenet"
    d = check_dataset(dataset, mode=cfg.data_check, weights=weights, log=log)
    report = d.facts
    part: dict[str, Any] = {
        "mode": cfg.data_check,
        "thresholds": report.thresholds,
        "embeddings": report.embeddings,
        "search": report.search.used,
        "pairs": dict(report.duplicates),
        "leaks": {k: {"images": v.images, "of": v.of, "percent": v.percent} for k, v in report.leaks.items()},
        "label_conflicts": len(report.label_conflicts),
        "dropped": None,
    }
    copies = held_copies(d.copied, len(dataset.train), len(dataset.val), cfg.drop_leaks)
    if cfg.drop_leaks:  # first, so each warning below can say what the drop has already taken care of
        dataset, part["dropped"] = _drop(dataset, d.drop_train)
        if part["dropped"]["count"]:
            log(f"data check: dropped {part['dropped']['count']:,} of {part['dropped']['train_before']:,} training "
                "image(s) that duplicate a val or test image (--drop-leaks)")
    for key, leak in report.leaks.items():
        log(_leak_line(key, leak.images, leak.percent, cfg.drop_leaks))
    if report.label_conflicts:
        log(f"warning: data check: {len(report.label_conflicts)} pair(s) of copies carry different labels")
    part["seconds"] = round(time.perf_counter() - start, 2)
    return dataset, part, copies


def _drop(dataset, rows: list[int]) -> tuple[Any, dict[str, Any]]:
    """Remove training rows (train rows come first in the check, so rows are train indices)."""
    ids = dataset.train.ids()
    drop = np.asarray(rows, np.int64)
    keep = np.ones(len(dataset.train), bool)
    keep[drop] = False
    facts = {"count": int(len(drop)), "train_before": len(dataset.train), "files": [ids[i] for i in drop]}
    if len(drop):
        dataset.train = dataset.train.take(keep)
    return dataset, facts


def exclude(dataset, path: str | None, log: progress.Log) -> tuple[Any, dict[str, Any] | None]:
    """--exclude FILE: drop the training images the file lists (one path a line, as `tlserve data check
    --suspects` writes them; blank lines and # comments skipped). Listed val/test images stay (the
    held-out splits are what the run is judged on) and are counted; a list that names no image of the
    data is a mistake, not a no-op. (dataset, record part)."""
    if path is None:
        return dataset, None
    listed = _read_list(Path(path).expanduser())
    train_ids = dataset.train.ids()
    drop = np.asarray([i for i, name in enumerate(train_ids) if name in listed or list_name("train", name) in listed],
                      np.int64)
    held = listed & {list_name(split, name) for split in ("val", "test") for name in getattr(dataset, split).ids()}
    if not len(drop) and not held:
        example = next(iter(sorted(listed)), "(empty)")
        raise UserError(f"--exclude {path}: none of its {len(listed)} path(s) is an image of --data "
                        f"(first: {example}); paths are relative to the data folder, as data check writes them")
    dataset, facts = _drop(dataset, drop.tolist())
    facts.update(list=str(path), listed=len(listed), held_out=len(held),
                 not_found=len(listed) - len(drop) - len(held))
    log(f"--exclude: dropped {facts['count']} training image(s) listed in {path}"
        + (f"; {len(held)} listed val/test image(s) kept" if held else "")
        + (f"; {facts['not_found']} listed path(s) not in the data" if facts["not_found"] else ""))
    return dataset, facts


def _read_list(path: Path) -> set[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--exclude {path}: cannot read it ({exc.__class__.__name__})") from None
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
