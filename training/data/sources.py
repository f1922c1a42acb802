"""Data sources for `--data`: synthetic, cifar10, cifar10:PATH, folder:PATH.

Every source becomes the same thing: uint8 pixel arrays per split plus class
names. Images are decoded once, up front, by serving.base.images (the decoder the
service uses too), so no epoch ever meets a broken file.
"""
from __future__ import annotations

import io
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.base import images
from serving.base.errors import UserError, nearest
from training import progress
from training.config import DataConfig, DataSpec
from training.env import tf
from training.errors import reason

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SYNTHETIC_CLASSES = ["circle", "square", "triangle", "ring", "cross", "hbar", "vbar", "diagonal", "checker", "dots"]
SYNTHETIC_SIZES = {"train": 2000, "val": 400, "test": 400}
FOLDER_TEST_FRACTION = 0.2
DEFAULT_FOLDER_SIZE = 224


@dataclass
class Split:
    x: np.ndarray  # (N, H, W, 3) uint8
    y: np.ndarray  # (N,) int64
    # Where each image came from: its path relative to the data folder (folder data), or None for
    # array sources (CIFAR-10 batches, synthetic), where `ids` falls back to the index in the split.
    files: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> "Split":
        return Split(self.x[index], self.y[index], None if self.files is None else self.files[index])

    def ids(self) -> list[str]:
        """One name per image: the relative file path, or '#<index>' for array sources."""
        return [str(f) for f in self.files] if self.files is not None else [f"#{i}" for i in range(len(self.y))]


@dataclass
class Dataset:
    train: Split
    val: Split
    test: Split
    class_names: list[str]
    source: str
    image_size: tuple[int, int]
    interpolation: str = images.DEFAULT_INTERPOLATION
    skipped: dict[str, str] = field(default_factory=dict)  # file that would not decode -> why (serving.base.images)

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "class_names": list(self.class_names),
            "num_classes": len(self.class_names),
            "image_size": list(self.image_size),
            "interpolation": self.interpolation,
            "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            # Images per class in the training split: what class weights and the imbalance warning see.
            "train_class_counts": {name: int(n) for name, n in
                                   zip(self.class_names, np.bincount(self.train.y, minlength=len(self.class_names)))},
            "skipped": list(self.skipped),
        }


def load_dataset(cfg: DataConfig) -> Dataset:
    check_config(cfg)
    spec = DataSpec.parse(cfg.spec)
    if spec.scheme == "synthetic":
        ds = _synthetic(cfg)
    elif spec.scheme == "cifar10":
        ds = _cifar10(cfg, spec.path)
    else:
        ds = _folder(cfg, spec.local)
    if spec.scheme != "folder":  # folders select classes before decoding
        ds = _select_classes(ds, cfg.classes)
    # After --classes, so --limit N means N images of the chosen classes.
    ds.train, ds.val, ds.test = (_limit(split, cfg.limit, cfg.seed) for split in (ds.train, ds.val, ds.test))
    return ds


def check_config(cfg: DataConfig) -> None:
    if cfg.limit is not None and cfg.limit <= 0:
        raise UserError("--limit must be a positive number of images per split")
    if not 0 <= cfg.val_split < 1:
        raise UserError("--val-split must be in [0, 1)")
    if cfg.image_size is not None and not 8 <= cfg.image_size <= 2048:
        raise UserError("--image-size must be between 8 and 2048")


def parse_classes(spec: str | None, class_names: list[str]) -> list[int]:
    """'0-4', '5,7,9' or 'cat,dog' → label indices in the order given."""
    if not spec:
        return list(range(len(class_names)))
    chosen: list[int] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        if part in class_names:
            chosen.append(class_names.index(part))
            continue
        lo, dash, hi = part.partition("-")
        try:
            ids = list(range(int(lo), int(hi) + 1)) if dash else [int(part)]
        except ValueError:
            raise UserError(f"--classes: unknown class '{part}'{nearest(part, class_names)}") from None
        bad = [i for i in ids if not 0 <= i < len(class_names)] or ([] if ids else [part])
        if bad:
            raise UserError(f"--classes: {bad[0]} is out of range; this data has classes 0-{len(class_names) - 1}")
        chosen.extend(ids)
    if len(set(chosen)) != len(chosen):
        raise UserError("--classes names a class twice")
    if len(chosen) < 2:
        raise UserError("--classes must pick at least two classes")
    return chosen


def _select_classes(ds: Dataset, spec: str | None) -> Dataset:
    if not spec:
        return ds
    chosen = parse_classes(spec, ds.class_names)
    remap = np.full(len(ds.class_names), -1, dtype=np.int64)
    remap[chosen] = np.arange(len(chosen))

    def pick(split: Split) -> Split:
        keep = remap[split.y] >= 0
        return Split(split.x[keep], remap[split.y[keep]], None if split.files is None else split.files[keep])

    return Dataset(pick(ds.train), pick(ds.val), pick(ds.test), [ds.class_names[i] for i in chosen],
                   ds.source, ds.image_size, ds.interpolation, ds.skipped)


def _limit(split: Split, limit: int | None, seed: int) -> Split:
    """At most `limit` images, balanced across classes, chosen by seed."""
    if limit is None or len(split) <= limit:
        return split
    return split.take(balanced_sample(split.y, limit, seed))


def balanced_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most `limit` images, every class as evenly as it can be (a class with too
    few gives all it has), chosen by seed: the one stratified sample (--limit, calibration, checks)."""
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    # Round-robin over classes so every class gets its share before any gets more.
    order = [idx[i] for i in range(max(len(p) for p in per_class)) for idx in per_class if i < len(idx)]
    return np.sort(np.array(order[:limit], dtype=np.int64))


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The one splitter (arrays and folders alike): a mask of `fraction` of each class, fixed by seed;
    at least one image of a class with two or more, none of a class with one."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    if fraction > 0:
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            if len(idx) > 1:
                held[idx[: max(1, int(round(len(idx) * fraction)))]] = True
    return held


def _carve_val(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """A stratified validation split from train (seed + 1: the folder loader's validation seed)."""
    held = stratified_holdout(train.y, fraction, seed + 1)
    return train.take(~held), train.take(held)


# ---- synthetic ---------------------------------------------------------------------------

def make_synthetic(n: int, *, seed: int, image_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """n images of 10 shape classes: random colours, positions, scales, background and noise.

    The class is the shape alone, so a model must learn form, not colour.
    """
    rng = np.random.default_rng(seed)
    s = image_size
    labels = np.arange(n) % len(SYNTHETIC_CLASSES)
    rng.shuffle(labels)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    cx = rng.uniform(0.32, 0.68, n)[:, None, None]
    cy = rng.uniform(0.32, 0.68, n)[:, None, None]
    r = rng.uniform(0.18, 0.3, n)[:, None, None]
    # A small tilt and stretch per image: drawn from position and size alone, two hundred images a class put
    # many pairs within a pixel of each other, the same shape in other colours, which the data check
    # rightly called copies (8% of the test split had one in train)...
    tilt = rng.uniform(-0.12, 0.12, n)[:, None, None]
    stretch = rng.uniform(0.85, 1.18, (2, n))[:, :, None, None]
    ux, uy = xx[None] - cx, yy[None] - cy
    dx = (np.cos(tilt) * ux + np.sin(tilt) * uy) / stretch[0]
    dy = (np.cos(tilt) * uy - np.sin(tilt) * ux) / stretch[1]
    dist = np.sqrt(dx**2 + dy**2)
    t = 0.06  # stroke half-width
    masks = np.stack([
        dist < r,                                                           # circle
        (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85),                  # square
        (dy < r * 0.8) & (dy > -r) & (np.abs(dx) < (dy + r) * 0.55),        # triangle
        (dist < r) & (dist > r * 0.55),                                     # ring
        ((np.abs(dx) < t) | (np.abs(dy) < t)) & (np.abs(dx) < r) & (np.abs(dy) < r),  # cross
        (np.abs(dy) < t * 1.3) & (np.abs(dx) < r * 1.2),                    # hbar
        (np.abs(dx) < t * 1.3) & (np.abs(dy) < r * 1.2),                    # vbar
        (np.abs(dx - dy) < t * 1.5) & (np.abs(dx) < r),                     # diagonal
        ((np.floor(xx * 8)[None] + np.floor(yy * 8)[None]) % 2 == 0) & (np.abs(dx) < r) & (np.abs(dy) < r),  # checker
        ((np.sin(xx * 40)[None] > 0.5) & (np.sin(yy * 40)[None] > 0.5)) & (dist < r * 1.1),                # dots
    ], axis=1)  # (n, 10, s, s)
    mask = masks[np.arange(n), labels][..., None]
    background = rng.uniform(0, 110, (n, 1, 1, 3))
    # ...and a light ramp across the background, so that two draws of one shape at one place still differ
    # where a copy would not.
    ramp = rng.uniform(-40, 40, (n, 2, 1, 1))
    background = background + (ramp[:, 0] * (xx - 0.5) + ramp[:, 1] * (yy - 0.5))[..., None]
    colour = rng.uniform(130, 255, (n, 1, 1, 3))
    pixels = np.where(mask, colour, background) + rng.normal(0, 12, (n, s, s, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64), list(SYNTHETIC_CLASSES)


def _synthetic(cfg: DataConfig) -> Dataset:
    size = cfg.image_size or 32
    splits = {}
    for i, (name, n) in enumerate(SYNTHETIC_SIZES.items()):
        x, y, classes = make_synthetic(n, seed=cfg.seed * 1000 + i, image_size=size)
        splits[name] = Split(x, y)
    return Dataset(splits["train"], splits["val"], splits["test"], classes, f"synthetic (seed {cfg.seed})", (size, size))


# ---- CIFAR-10 ------------------------------------------------------------------------------

def _cifar10(cfg: DataConfig, path: str | None) -> Dataset:
    if path is None:
        from training.env import keras  # noqa: PLC0415

        try:
            (xtr, ytr), (xte, yte) = keras().datasets.cifar10.load_data()
        except Exception as exc:  # Keras raises a bare Exception when the download fails
            raise UserError(f"could not download CIFAR-10 ({reason(exc)}); offline, pass "
                            "--data cifar10:PATH (cifar-10-batches-py/ or the .tar.gz) or --data folder:PATH") from None
        source = "CIFAR-10 (Keras download)"
        names = list(CIFAR10_CLASSES)
    else:
        (xtr, ytr), (xte, yte), names = _read_cifar_batches(Path(path).expanduser())
        source = f"CIFAR-10 ({path})"
    train = Split(np.asarray(xtr, np.uint8), np.asarray(ytr, np.int64).reshape(-1))
    test = Split(np.asarray(xte, np.uint8), np.asarray(yte, np.int64).reshape(-1))
    if cfg.image_size and cfg.image_size != 32:
        raise UserError("--image-size applies to folder data; CIFAR-10 is 32x32 (use --input-size to resize inside the model)")
    train, val = _carve_val(train, cfg.val_split, cfg.seed)
    return Dataset(train, val, test, names, source, (32, 32))


def _read_cifar_batches(path: Path):
    """The python-pickle distribution: a cifar-10-batches-py/ folder or the .tar.gz holding it."""
    if not path.exists():
        raise UserError(f"--data cifar10:{path}: no such file or folder")
    members: dict[str, bytes] = {}
    try:
        if path.is_dir():
            for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
                if (path / name).is_file():
                    members[name] = (path / name).read_bytes()
        else:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    base = Path(member.name).name
                    if member.isfile() and (base.startswith("data_batch_") or base in ("test_batch", "batches.meta")):
                        members[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"--data cifar10:{path}: not a CIFAR-10 archive ({exc})") from None
    train_names = sorted(n for n in members if n.startswith("data_batch_"))
    if not train_names or "test_batch" not in members:
        raise UserError(f"--data cifar10:{path}: expected data_batch_1..5 and test_batch "
                        "(the cifar-10-batches-py folder or cifar-10-python.tar.gz)")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            d = pickle.load(io.BytesIO(members[name]), encoding="bytes")
            x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return x, np.asarray(d[b"labels"], np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise UserError(f"--data cifar10:{path}: {name} is not a CIFAR-10 batch ({exc.__class__.__name__})") from None

    parts = [batch(n) for n in train_names]
    xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xte, yte = batch("test_batch")
    names = list(CIFAR10_CLASSES)
    if "batches.meta" in members:
        meta = pickle.load(io.BytesIO(members["batches.meta"]), encoding="bytes")
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", names)]
    return (xtr, ytr), (xte, yte), names


# ---- image folders ---------------------------------------------------------------------------

def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                  and any(images.is_image_path(f) for f in d.iterdir()))


def _files(root: Path, class_names: list[str]) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if images.is_image_path(f):
                files.append(f)
                labels.append(label)
    return files, np.asarray(labels, np.int64)


@dataclass
class FolderListing:
    """A folder source's splits as file lists, before any pixel is decoded: what training will use,
    and what `tlserve data check` inspects, so a leak the check reports is one the run has."""
    root: Path
    class_names: list[str]
    splits: dict[str, tuple[list[Path], np.ndarray]]  # train/val/test -> (files, labels)
    layout: str
    class_folders: list[Path]  # every folder the files were listed from


def list_folder(cfg: DataConfig, root: Path) -> FolderListing:
    """The files and labels of each split of `folder:root`, split exactly as training splits them
    (same seed and --val-split); --limit is applied later, by the caller that decodes."""
    if root.is_file():
        raise UserError(f"--data folder:{root}: this is a file; give the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"--data folder:{root}: no such folder")
    split_dirs = {name: root / name for name in ("train", "val", "valid", "validation", "test") if (root / name).is_dir()}
    val_name = next((name for name in ("val", "valid", "validation") if name in split_dirs), None)
    has_splits = "train" in split_dirs and ("test" in split_dirs or val_name is not None)
    class_root = split_dirs["train"] if has_splits else root
    class_names = [d.name for d in _class_dirs(class_root)]
    if not class_names:
        raise UserError(f"--data folder:{root}: no class sub-folders with images (expected one folder per class)")
    if len(class_names) < 2:
        raise UserError(f"--data folder:{root}: only one class ('{class_names[0]}'); a classifier needs at least two")

    # Select classes before listing files, so unused classes are never decoded.
    class_names = [class_names[i] for i in parse_classes(cfg.classes, class_names)]
    if has_splits:
        train_files, train_y = _files(split_dirs["train"], class_names)
        if "test" in split_dirs:
            test_files, test_y = _files(split_dirs["test"], class_names)
        if val_name is not None and "test" in split_dirs:
            val_files, val_y = _files(split_dirs[val_name], class_names)
            layout = f"train/{val_name}/test sub-folders"
        elif val_name is not None:
            # train/ and val/ only: val/ is the held-out set we report on; validation comes from train.
            test_files, test_y = _files(split_dirs[val_name], class_names)
            train_files, train_y, val_files, val_y = _split_files(train_files, train_y, cfg.val_split, cfg.seed + 1)
            layout = f"train/{val_name} sub-folders; {val_name}/ is the test split, validation drawn from train"
        else:
            train_files, train_y, val_files, val_y = _split_files(train_files, train_y, cfg.val_split, cfg.seed + 1)
            layout = "train/test sub-folders; validation drawn from train"
        used = [split_dirs[n] for n in ("train", val_name, "test") if n in split_dirs]
        folders = [d / c for d in used for c in class_names if (d / c).is_dir()]
    else:
        files, labels = _files(root, class_names)
        rest_files, rest_y, test_files, test_y = _split_files(files, labels, FOLDER_TEST_FRACTION, cfg.seed)
        train_files, train_y, val_files, val_y = _split_files(rest_files, rest_y, cfg.val_split, cfg.seed + 1)
        layout = f"stratified split, seed {cfg.seed}"
        folders = [root / c for c in class_names]
    splits = {"train": (train_files, train_y), "val": (val_files, val_y), "test": (test_files, test_y)}
    return FolderListing(root, class_names, splits, layout, folders)


def _folder(cfg: DataConfig, root: Path) -> Dataset:
    listing = list_folder(cfg, root)
    picked = {}
    for name, (files, labels) in listing.splits.items():
        if cfg.limit and len(files) > cfg.limit:  # decode only what will be used
            idx = balanced_sample(labels, cfg.limit, cfg.seed)
            files, labels = [files[i] for i in idx], labels[idx]
        picked[name] = (files, labels)

    size = _folder_image_size(cfg, [f for files, _ in picked.values() for f in files])
    skipped: dict[str, str] = {}
    with progress.step(f"decoding images from {root.name}", sum(len(files) for files, _ in picked.values())) as advance:
        splits = {name: _decode(files, labels, size, skipped, root, advance) for name, (files, labels) in picked.items()}
    return Dataset(splits["train"], splits["val"], splits["test"], listing.class_names,
                   f"folder {root} ({listing.layout})", size, images.DEFAULT_INTERPOLATION, skipped)


def _split_files(files: list[Path], labels: np.ndarray, fraction: float, seed: int):
    held = stratified_holdout(labels, fraction, seed)
    keep, out = np.flatnonzero(~held), np.flatnonzero(held)
    return [files[i] for i in keep], labels[keep], [files[i] for i in out], labels[out]


def _folder_image_size(cfg: DataConfig, files: list[Path]) -> tuple[int, int]:
    if cfg.image_size:
        return (cfg.image_size, cfg.image_size)
    sizes = set()
    for f in files:
        try:
            with Image.open(f) as img:  # header only: no pixels decoded
                sizes.add(img.size)
        except (OSError, SyntaxError, ValueError):
            continue
        if len(sizes) > 1:
            return (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)
    if len(sizes) == 1:
        w, h = sizes.pop()
        return (h, w)
    return (DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)


def _decode(files: list[Path], labels: np.ndarray, size: tuple[int, int], skipped: dict[str, str], root: Path,
            advance=lambda n: None) -> Split:
    """Decode in threads (Pillow releases the GIL while decoding); unreadable files are named and skipped."""
    def one(path: Path) -> np.ndarray | str:
        try:
            return images.load_array(path, size, name=str(path.relative_to(root)))
        except images.ImageError as exc:
            return exc.why

    arrays: list[np.ndarray | str] = []
    with ThreadPoolExecutor(max_workers=8) as pool:
        for array in pool.map(one, files):  # in order, counted on this thread
            arrays.append(array)
            advance(1)
    keep = [i for i, a in enumerate(arrays) if not isinstance(a, str)]
    skipped.update((str(files[i].relative_to(root)), a) for i, a in enumerate(arrays) if isinstance(a, str))
    x = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, *size, 3), np.uint8)
    names = np.array([files[i].relative_to(root).as_posix() for i in keep], dtype=object)
    return Split(x, labels[keep] if keep else labels[:0], names)


# ---- labelled data for `tlserve eval` ----------------------------------------------------------
# Eval reads data it never trained on, in whatever layout the user has: these list it without
# decoding (eval decodes at the model's own input size, in its own pipeline).

EVAL_SPLITS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def check_split(split: str) -> str:
    """--split of `tlserve eval`: the one check (labelled_folder and labelled_arrays take it checked)."""
    if split not in EVAL_SPLITS:
        raise UserError(f"--split must be one of {', '.join(EVAL_SPLITS)}, not '{split}'")
    return split


def labelled_folder(root: Path, split: str) -> tuple[Path, str, dict[str, list[Path]]]:
    """(the folder holding the class folders, how it was chosen, {class folder name: image files}).

    With split sub-folders (train/, val/ valid/ validation/, test/) `split` (check_split) picks one;
    without them every class folder under root is used and `split` does not apply."""
    root = Path(root).expanduser()
    if root.is_file():
        raise UserError(f"--data folder:{root}: this is a file; give the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise UserError(f"--data folder:{root}: no such folder")
    present = {alias: root / alias for names in EVAL_SPLITS.values() for alias in names
               if (root / alias).is_dir() and _class_dirs(root / alias)}
    if present:
        chosen = next((present[a] for a in EVAL_SPLITS[split] if a in present), None)
        if chosen is None:
            raise UserError(f"--data folder:{root} has split folders {', '.join(sorted(present))} but no "
                            f"{'/'.join(EVAL_SPLITS[split])}; pick one with --split")
        layout = f"split '{chosen.name}'"
    else:
        chosen, layout = root, "every class folder (no split sub-folders)"
    classes = {d.name: sorted(f for f in d.iterdir() if images.is_image_path(f)) for d in _class_dirs(chosen)}
    if not classes:
        raise UserError(f"--data folder:{chosen}: no class sub-folders with images (expected one folder per class)")
    return chosen, layout, classes


def labelled_arrays(spec: str, split: str, *, seed: int = 0,
                    image_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """(x uint8, y, class names, source) of one split (check_split) of `synthetic` or `cifar10[:PATH]`.

    synthetic: the very images `tlserve train --data synthetic --seed SEED` has in that split."""
    parsed = DataSpec.parse(spec)
    scheme, arg = parsed.scheme, parsed.path
    if scheme == "synthetic":
        i = list(SYNTHETIC_SIZES).index(split)
        x, y, names = make_synthetic(SYNTHETIC_SIZES[split], seed=seed * 1000 + i, image_size=image_size)
        return x, y, names, f"synthetic (seed {seed}, {split} split)"
    if scheme == "cifar10":
        if split == "val":
            raise UserError("CIFAR-10 has a train and a test split; use --split test or --split train")
        if arg:
            (xtr, ytr), (xte, yte), names = _read_cifar_batches(parsed.local)
        else:
            ds = _cifar10(DataConfig(spec="cifar10", val_split=0.0), None)
            (xtr, ytr), (xte, yte), names = (ds.train.x, ds.train.y), (ds.test.x, ds.test.y), ds.class_names
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
        return (np.asarray(x, np.uint8), np.asarray(y, np.int64).reshape(-1), list(names),
                f"CIFAR-10 ({arg or 'Keras download'}, {split} split)")
    raise UserError(f"--data {spec}: not an array source (synthetic, cifar10, cifar10:PATH)")


LARGE_ARRAY_BYTES = 256 * 2**20


def pipeline(split: Split, batch_size: int):
    """A split's batches in order (validation, test, feature extraction): pixels stay uint8 until a
    batch is formed (a quarter of float32's memory); the model itself takes float32 0..255."""
    return epoch_batches(split.x, split.y, batch_size, seed=0, epochs=range(1), shuffle=False)


def epoch_batches(x, y: np.ndarray, batch_size: int, *, seed: int, epochs: range, shuffle: bool = True,
                  views: int = 1):
    """Batches for the given epochs, one iterator over all of them; x is an array or a list of them
    (a model with several inputs), in memory or memory-mapped.

    views > 1: x and y hold `views` rows per image (image i's view k at row i * views + k, as
    training.data.views lays them out) and an epoch takes one view of each image, drawn from (seed, e).

    Epoch e's order depends on (seed, e) alone, so a run resumed at epoch e sees the very batches
    the uninterrupted run saw there. One iterator for the whole fit, read `steps_per_epoch` batches
    an epoch (each epoch still ends with its partial batch): Keras otherwise makes a new iterator
    every epoch, and on full CIFAR-10 the switch measured 11-40 s per epoch here."""
    T = tf()
    n = len(y) // views
    orders = np.stack([np.random.default_rng((seed, e)).permutation(n) if shuffle else np.arange(n)
                       for e in epochs]) if len(epochs) else np.zeros((0, n), np.int64)
    if views > 1 and len(epochs):
        orders = orders * views + np.stack([np.random.default_rng((seed, e, views)).integers(views, size=n)
                                            for e in epochs]).reshape(orders.shape)
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    take = [_gatherer(a) for a in arrays]
    labels = T.convert_to_tensor(y)

    def batch_of(idx):
        xs = tuple(T.cast(t(idx), T.float32) for t in take)
        return (xs if len(xs) > 1 else xs[0]), T.gather(labels, idx)

    ds = T.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: T.data.Dataset.from_tensor_slices(order).batch(batch_size))
    # Under MultiWorkerMirroredStrategy every worker builds this same pipeline and keeps its share of
    # each global batch: DATA sharding, since in-memory arrays have no files for FILE sharding to split
    # (AUTO would try FILE first and fall back with a warning).
    options = T.data.Options()
    options.experimental_distribute.auto_shard_policy = T.data.experimental.AutoShardPolicy.DATA
    return ds.map(batch_of, num_parallel_calls=T.data.AUTOTUNE).prefetch(T.data.AUTOTUNE).with_options(options)


def _gatherer(array: np.ndarray):
    """idx -> array[idx] inside tf.data: from a tensor, or, for a memory-mapped or large cache, read
    from the array batch by batch (a tensor would read a whole file into memory, and would copy a
    large in-memory cache: seed 000's 1.9 GB phase-2 cache twice in memory)."""
    T = tf()
    if isinstance(array, np.memmap) or array.nbytes > LARGE_ARRAY_BYTES:
        shape = array.shape[1:]

        def read(idx):
            return np.asarray(array[idx], dtype=np.float32)

        def gather(idx):
            out = T.numpy_function(read, [idx], T.float32, stateful=False)
            out.set_shape((None, *shape))
            return out

        return gather
    tensor = T.convert_to_tensor(array)
    return lambda idx: T.gather(tensor, idx)
