"""The data check's first pass: decode every image once and keep what the later passes need.

Each image gets
  exact     a hash of its decoded RGB pixels (a byte copy, or the same pixels saved as PNG and as BMP);
  phash     imagehash's DCT perceptual hash (64 bits) of the image and of its mirror, computed for all
            images in one batch, bit-equal to imagehash.phash (see phash);
  grey      phash's own 32x32 grey reduction, kept to confirm hash and embedding matches pixel for pixel;
  colour    a COLOUR_SIDE-px RGB thumbnail: a copy keeps each channel's pattern through brightness,
            contrast, saturation and white-balance shifts, a recoloured shape does not (see pairs.judge);
  small     (full mode) an EMBED_SIZE copy for the MobileNetV2 embeddings (training.audit.embeddings),
            and where the label search wants larger ones (embeddings.label_side), a copy at that side too;
and its facts (size, mode, format, camera, EXIF rotation, alpha) for the report.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image

from serving.base import images
from training import progress

SPLITS = ("train", "val", "test")
HASH_SIDE = 32           # imagehash.phash's reduction (hash_size 8 x highfreq_factor 4)
EMBED_SIZE = 64          # MobileNetV2 input: 1,185 img/s on 2 busy cores (96 px: 334 img/s)
COLOUR_SIDE = 16         # the colour thumbnail: enough for a shape's colours, 768 bytes an image
PARALLEL_FROM = 2000     # files: below this a process pool costs more than it saves


@dataclass
class Images:
    """One row per readable image, in split order (train, then val, then test)."""
    split: np.ndarray                 # (N,) index into SPLITS
    names: list[str]                  # relative file path, or "#i" for array sources
    labels: np.ndarray                # (N,) int
    exact: list[bytes]
    phash: np.ndarray                 # (N,) uint64
    phash_mirror: np.ndarray          # (N,) uint64
    small: np.ndarray | None          # (N, EMBED_SIZE, EMBED_SIZE, 3) uint8, full mode only
    label_small: np.ndarray | None    # (N, side, side, 3) uint8 for the label classifier when side != EMBED_SIZE
    grey: np.ndarray                  # (N, 32, 32) uint8: phash's own reduction, kept to confirm hash matches
    colour: np.ndarray                # (N, COLOUR_SIDE, COLOUR_SIDE, 3) uint8: each channel's pattern
    facts: list[dict[str, Any]]       # size, mode, format, exif_rotated (folder data)

    def split_names(self) -> list[str]:
        return [SPLITS[s] for s in self.split]



def list_name(split: str, name: str) -> str:
    """An image's line in a list of files (--suspects, `tlserve train --exclude`): the path for folder
    data, "split/#i" for array sources, whose "#i" is an index within the split."""
    return f"{split}/{name}" if name.startswith("#") else name


def fingerprint(rgb: Image.Image, mode: str, label_side: int | None = None) -> tuple:
    """(exact hash, phash's 32x32 grey reduction, colour thumbnail, EMBED_SIZE copy in full mode,
    label_side copy where asked)."""
    exact = hashlib.blake2b(rgb.tobytes(), digest_size=16, person=f"{rgb.width}x{rgb.height}".encode()[:16]).digest()
    # imagehash.phash's own first step, kept so the hashes (and the pixel check) come from it in one batch.
    grey = np.asarray(rgb.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.uint8)
    colour = np.asarray(rgb.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX), dtype=np.uint8)
    small = None
    if mode == "full":
        small = np.asarray(rgb.resize((EMBED_SIZE, EMBED_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    label = None
    if mode == "full" and label_side and label_side != EMBED_SIZE:
        label = np.asarray(rgb.resize((label_side, label_side), Image.Resampling.BILINEAR), dtype=np.uint8)
    return exact, grey, colour, small, label


def phash(grey: np.ndarray) -> np.ndarray:
    """imagehash.phash (hash_size 8) of many images at once, from their 32x32 grey reductions: the
    same DCT, low 8x8 block and median, bit for bit (tests/test_data_check.py compares them), as one
    numpy call instead of 60,000 Python ones (imagehash took 60% of the fast check's time)."""
    import scipy.fftpack  # noqa: PLC0415  (imagehash's own DCT)

    if len(grey) == 0:
        return np.zeros(0, np.uint64)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(grey.astype(np.float64), axis=1), axis=2)[:, :8, :8].reshape(len(grey), 64)
    bits = dct > np.median(dct, axis=1, keepdims=True)
    return np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)


def _facts(img: Image.Image) -> dict[str, Any]:
    exif = img.getexif()
    orientation = exif.get(ExifTags.Base.Orientation, 1)
    camera = " ".join(str(exif.get(tag, "")).strip() for tag in (ExifTags.Base.Make, ExifTags.Base.Model)).strip()
    return {"size": f"{img.width}x{img.height}", "mode": img.mode, "format": img.format or "?",
            "camera": camera or "none recorded", "exif_rotated": orientation not in (None, 1),
            "alpha": img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)}


def _inspect(path: Path, root: Path, mode: str, label_side: int | None) -> tuple[dict[str, Any], tuple | None, str | None]:
    """(facts, fingerprints, why unreadable) of one file; never raises for a bad file."""
    name = path.relative_to(root).as_posix()
    try:
        with images.open_stored(path, name=name) as img:
            return _facts(img), fingerprint(images.to_rgb(img), mode, label_side), None
    except images.ImageError as exc:  # the wording training's decode uses too (serving.base.images)
        return {"file": name}, None, exc.why


def _inspect_job(job: tuple[str, str, str, int | None]) -> tuple[dict[str, Any], tuple | None, str | None]:
    path, root, mode, label_side = job
    return _inspect(Path(path), Path(root), mode, label_side)


def _inspect_all(jobs: list[tuple[str, str, str, int | None]], log, bar) -> list[tuple]:
    results: list[tuple] = []
    workers = os.cpu_count() or 1
    with progress.step("decoding and hashing", len(jobs), log=log, bar=bar) as advance:
        if workers > 1 and len(jobs) >= PARALLEL_FROM:
            # Processes, not threads: the hashing is Python and numpy on tiny arrays, held by the GIL.
            # spawn, not fork: the parent may hold TensorFlow's threads, which a fork does not copy.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                for out in pool.map(_inspect_job, jobs, chunksize=128):
                    results.append(out)
                    advance(1)
        else:
            for job in jobs:
                results.append(_inspect_job(job))
                advance(1)
    return results


def fingerprint_files(listing, mode: str, log=None, bar: bool | None = None, *,
                      label_side: int | None = None) -> tuple[Images, list[dict[str, str]]]:
    """Fingerprints of a folder listing (training.data.sources.list_folder); (images, unreadable files)."""
    rows: list[tuple[int, str, int]] = [(s, f.relative_to(listing.root).as_posix(), int(y))
                                        for s, name in enumerate(SPLITS) for f, y in zip(*listing.splits[name])]
    jobs = [(str(listing.root / rel), str(listing.root), mode, label_side) for _, rel, _ in rows]
    results = _inspect_all(jobs, log, bar)
    keep = [i for i, (_, fp, _) in enumerate(results) if fp is not None]
    unreadable = [{"file": rows[i][1], "why": why} for i, (_, fp, why) in enumerate(results) if fp is None]
    imgs = columns([rows[i][0] for i in keep], [rows[i][1] for i in keep], [rows[i][2] for i in keep],
                    [results[i][1] for i in keep], [results[i][0] for i in keep])
    return imgs, unreadable


def fingerprint_arrays(splits: dict[str, Any], mode: str, log=None, bar: bool | None = None, *,
                       label_side: int | None = None) -> Images:
    """Fingerprints of array splits (data.Split): synthetic, CIFAR-10 batches, a decoded folder."""
    split_idx, names, labels, fps = [], [], [], []
    total = sum(len(splits[s]) for s in SPLITS)
    with progress.step("hashing", total, log=log, bar=bar) as advance:
        for s, name in enumerate(SPLITS):
            split = splits[name]
            ids = split.ids()
            for i in range(len(split)):
                fps.append(fingerprint(Image.fromarray(split.x[i]), mode, label_side))
                split_idx.append(s)
                names.append(ids[i])
                labels.append(int(split.y[i]))
                if i % 256 == 255:
                    advance(256)
            advance(len(split) % 256)
    facts = [{"size": f"{splits[SPLITS[s]].x.shape[2]}x{splits[SPLITS[s]].x.shape[1]}", "mode": "RGB",
              "format": "array", "camera": "none recorded", "exif_rotated": False, "alpha": False} for s in split_idx]
    return columns(split_idx, names, labels, fps, facts)


def columns(split_idx, names, labels, fps, facts) -> Images:
    grey = np.stack([fp[1] for fp in fps]) if fps else np.zeros((0, HASH_SIDE, HASH_SIDE), np.uint8)
    small, label = [fp[3] for fp in fps], [fp[4] for fp in fps]
    return Images(
        split=np.asarray(split_idx, np.int8), names=list(names), labels=np.asarray(labels, np.int64),
        exact=[fp[0] for fp in fps], phash=phash(grey), phash_mirror=phash(grey[:, :, ::-1]),
        small=np.stack(small) if small and small[0] is not None else None,
        label_small=np.stack(label) if label and label[0] is not None else None, grey=grey,
        colour=np.stack([fp[2] for fp in fps]) if fps else np.zeros((0, COLOUR_SIDE, COLOUR_SIDE, 3), np.uint8),
        facts=list(facts))


def not_images(folders: list[Path], root: Path) -> list[str]:
    """Files in class folders that training skips for their name (not an image suffix)."""
    out = []
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not images.is_image_path(f):
                out.append(f.relative_to(root).as_posix())
    return out
