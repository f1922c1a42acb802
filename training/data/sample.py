"""`tlserve data sample`: a few images of every class of a split, as files to send, eval or look at.

The images are the split's own, chosen by `balanced_sample` (every class before any gets more): a
folder source's files are copied as they are, an array source's (synthetic, CIFAR-10) written as PNG.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from serving.base import storage
from serving.base.errors import UserError
from training.config import DataConfig
from training.data.sources import Split, balanced_sample, load_dataset

SPLITS = ("train", "val", "test")


def sample(cfg: DataConfig, out: Path, *, split: str = "test", per_class: int = 1,
           overwrite: bool = False) -> list[Path]:
    """Write `per_class` images of each class of `split` to out/<class>/ and return their paths;
    `out` appears whole or not at all."""
    if per_class < 1:
        raise UserError(f"--per-class must be at least 1, not {per_class}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; give another --out or --overwrite")
    ds = load_dataset(cfg)
    part: Split = {"train": ds.train, "val": ds.val, "test": ds.test}[split]
    if len(part) == 0:
        raise UserError(f"the {split} split of {cfg.spec} is empty")
    picked = balanced_sample(part.y, per_class * len(ds.class_names), cfg.seed)
    root = Path(cfg.spec.partition(":")[2]).expanduser()
    written = []
    with storage.staged_dir(out, overwrite=overwrite) as staging:
        counts: dict[int, int] = {}
        for i in picked:
            label = int(part.y[i])
            name = ds.class_names[label]
            n = counts[label] = counts.get(label, 0) + 1
            (staging / name).mkdir(exist_ok=True)
            if part.files is not None:
                src = root / str(part.files[i])
                dst = staging / name / f"{n - 1}{src.suffix.lower()}"
                shutil.copyfile(src, dst)
            else:
                dst = staging / name / f"{n - 1}.png"
                Image.fromarray(np.asarray(part.x[i], np.uint8)).save(dst)
            written.append(out / dst.relative_to(staging))
    return written
