"""`tlserve data check`: duplicates and leaks across splits, label conflicts, balance, odd files.

Every image gets three fingerprints:
  exact     a hash of its decoded RGB pixels (a byte copy, or the same pixels saved as PNG and as BMP);
  phash     imagehash's DCT perceptual hash (64 bits) of the image and of its mirror, so a resized,
            recompressed or colour-shifted copy lands a few bits away, and a flipped copy too
            (computed for all images in one batch, bit-equal to imagehash.phash); a hash match
            must also correlate pixel for pixel and keep its mean colour (see search);
  embedding (full mode) the frozen ImageNet MobileNetV2's pooled features at EMBED_SIZE px, for what
            hashes miss (crops, stronger edits). Cosine is taken after centring the features and
            projecting them on their top PCA_DIMS principal axes: the centring removes the direction
            every photo shares, and the projection makes the all-pairs search 5x cheaper.

Pairs are searched exactly, block by block with numpy (Hamming distance as a dot product of +-1
bit vectors, cosine as a dot product of unit vectors): ~60k images take seconds per pass on 2 cores.
Past ANN_ABOVE images the all-pairs cosine grows quadratically, so the embedding search moves to a
faiss index (the optional extra `pip install 'tlserve[ann]'`): each image's ANN_NEIGHBOURS nearest
neighbours, kept when their exact cosine clears the threshold (see ann_pairs). The 64-bit hash
search stays exact: it is 4x cheaper per pair than the 256-dim cosine. --search exact|ann|auto
forces one; without faiss installed the check falls back to exact search and says how to install it.

Split assignment is data.list_folder's, the one training uses (same seed and --val-split), so a
leak reported here is a leak the run has.
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from collections import Counter, defaultdict
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import ExifTags, Image

from serving.base import images
from serving.base.errors import UserError
from training import progress
from training.config import DataConfig

SPLITS = ("train", "val", "test")
MODES = ("off", "fast", "full")
HASH_SIDE = 32           # imagehash.phash's reduction (hash_size 8 x highfreq_factor 4)
EMBED_SIZE = 64          # MobileNetV2 input: 1,185 img/s on 2 busy cores (96 px: 334 img/s)
EMBED_BATCH = 256
PCA_DIMS = 256
SEARCH_BLOCK = 256       # rows per block: each 256 x 60k float32 matrix is 61 MB
ANN_ABOVE = 200_000      # beyond this many images an exact all-pairs search is the wrong tool (see above)
SEARCHES = ("auto", "exact", "ann")
ANN_NEIGHBOURS = 32      # neighbours asked of the index per image: more than any real image has copies
# IVF-Flat, not HNSW: on CIFAR-10's embeddings (benchmarks/ann_search.py, README "Check the data") both
# found every exact pair, but building HNSW over 256 dims cost more than the exact search it replaces.
ANN_INDEX = "ivf"
IVF_NPROBE = 16          # inverted lists searched per query (of ~4 sqrt(n))
HNSW_LINKS = 32          # faiss HNSW graph degree (M), for --index comparisons in the benchmark
HNSW_EF_SEARCH = 128
ANN_INSTALL = "pip install 'tlserve[ann]' (faiss-cpu)"
MAX_PAIRS = 200_000      # a degenerate set (thousands of blank images) must not fill memory with pairs
# Defaults chosen by looking at CIFAR-10 JPEG-copy pairs (README, "Check the data"): at pHash <= 4 with
# the pixel check every sampled pair was the same scene; at 6 and 8 a few were not.
DEFAULT_PHASH = 4
DEFAULT_COSINE = 0.9
DEFAULT_PIXELS = 0.9
# An embedding match must still look alike pixel for pixel, at least this much (grey correlation, the
# better of direct and mirrored): on CIFAR-10, cosine >= 0.85 pairs below 0.6 were other scenes of one
# texture (grass, sky with a bird), those above were mostly the same photo shifted, cropped or re-shot.
# Cosine 0.88-0.90 still let a few other scenes through (two horses, two ships), hence 0.9.
EMBED_MIN_PIXELS = 0.6
# A hash match must also keep its mean colour (L1 distance of the R, G, B shares): a brightness and
# saturation shift moved it 0.024 in the planted set, while the synthetic set's same-shape images in
# other colours (grey correlation up to 0.99) were at least 0.038 apart.
MAX_CHROMA_SHIFT = 0.035
GRAYSCALE_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L"}


@dataclass(frozen=True)
class Thresholds:
    phash: int = DEFAULT_PHASH      # largest Hamming distance (of 64 bits) that counts as a near duplicate
    cosine: float = DEFAULT_COSINE  # smallest embedding cosine that counts as a near duplicate
    pixels: float = DEFAULT_PIXELS  # a hash match counts when the 32x32 grey images correlate at least this

    def validate(self) -> "Thresholds":
        if not 0 <= self.phash <= 32:
            raise UserError(f"--phash-distance must be between 0 and 32 bits (of 64), not {self.phash}")
        if not 0.5 <= self.cosine <= 1.0:
            raise UserError(f"--cosine must be between 0.5 and 1.0, not {self.cosine}")
        if not 0.0 <= self.pixels <= 1.0:
            raise UserError(f"--pixel-correlation must be between 0 and 1, not {self.pixels}")
        return self


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
    grey: np.ndarray                  # (N, 32, 32) uint8: phash's own reduction, kept to confirm hash matches
    chroma: np.ndarray                # (N, 3) the mean colour's share of R, G, B (brightness left out)
    facts: list[dict[str, Any]]       # size, mode, format, exif_rotated (folder data)


@dataclass
class Pair:
    a: int
    b: int
    kind: str            # exact | near
    how: str             # pixels | phash | phash-mirror | embedding
    hamming: int
    cosine: float | None
    pixels: float        # correlation of the 32x32 grey images (mirrored for a mirror match)


@dataclass
class Report:
    data: dict[str, Any]                                   # the JSON report
    pairs: list[Pair] = field(default_factory=list)
    images: Images | None = None
    thumbnail: Callable[[int], Image.Image] | None = None  # row -> RGB image, for the page
    drop_train: list[int] = field(default_factory=list)    # rows of train images that duplicate val/test
    rows_of: dict[int, tuple[int, int]] = field(default_factory=dict)  # id(pair item in data) -> its two rows
    copied: dict[str, list[int]] = field(default_factory=dict)  # "test-in-train" -> rows of test images with a copy in train

    def rows(self, item: dict[str, Any]) -> tuple[int, int]:
        return self.rows_of[id(item)]


# ---- entry points ----------------------------------------------------------------------------

def check(cfg: DataConfig, *, mode: str = "full", thresholds: Thresholds = Thresholds(), weights: str = "imagenet",
          log: progress.Log | None = None, bar: bool | None = None, search: str = "auto") -> Report:
    """Check a `--data` source as training would split it."""
    thresholds.validate()
    if mode not in ("fast", "full"):
        raise UserError(f"--mode must be fast or full, not '{mode}'")
    if search not in SEARCHES:
        raise UserError(f"--search must be one of {', '.join(SEARCHES)}, not '{search}'")
    from training.data.sources import check_config  # noqa: PLC0415

    check_config(cfg)
    if mode == "full":
        from training.model import backbones  # noqa: PLC0415

        backbones.check_weights_file(weights, "--weights")
    start = time.perf_counter()
    scheme, _, arg = cfg.spec.partition(":")
    if scheme == "folder" and arg:
        from training.data.sources import list_folder  # noqa: PLC0415

        listing = list_folder(cfg, Path(arg).expanduser())
        imgs, unreadable = _fingerprint_files(listing, mode, log, bar)
        root = listing.root
        meta = {"source": f"folder {root} ({listing.layout})", "class_names": listing.class_names,
                "not_images": _not_images(listing.class_folders, root), "unreadable": unreadable}

        def thumbnail(row: int) -> Image.Image:
            return images.open_image(root / imgs.names[row])
    else:
        from training.data.sources import load_dataset  # noqa: PLC0415

        ds = load_dataset(cfg)
        imgs = fingerprint_arrays({"train": ds.train, "val": ds.val, "test": ds.test}, mode, log, bar)
        arrays = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
        meta = {"source": ds.source, "class_names": ds.class_names, "not_images": [],
                "unreadable": [{"file": f, "why": why} for f, why in ds.skipped.items()]}

        def thumbnail(row: int) -> Image.Image:
            return Image.fromarray(arrays[row])
    if len(imgs.labels) == 0:
        raise UserError(f"--data {cfg.spec}: no readable images to check")
    report = _analyse(imgs, meta, mode, thresholds, weights, log, bar, search_kind=search)
    report.thumbnail = thumbnail
    report.data["seconds"]["total"] = round(time.perf_counter() - start, 2)
    return report


def check_dataset(dataset, *, mode: str, thresholds: Thresholds = Thresholds(), weights: str = "imagenet",
                  log: progress.Log | None = None, search: str = "auto") -> Report:
    """The training run's own check, on the pixels it is about to train on (cross-split pairs only)."""
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    imgs = fingerprint_arrays(splits, mode, log, bar=False)
    meta = {"source": dataset.source, "class_names": dataset.class_names, "not_images": [],
            "unreadable": [{"file": f, "why": why} for f, why in dataset.skipped.items()]}
    return _analyse(imgs, meta, mode, thresholds, weights, log, False, cross_only=True, search_kind=search)


# ---- fingerprints ----------------------------------------------------------------------------

def _fingerprint(rgb: Image.Image, mode: str) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray | None]:
    """(exact hash, phash's 32x32 grey reduction, mean-colour shares, EMBED_SIZE copy in full mode)."""
    exact = hashlib.blake2b(rgb.tobytes(), digest_size=16, person=f"{rgb.width}x{rgb.height}".encode()[:16]).digest()
    # imagehash.phash's own first step, kept so the hashes (and the pixel check) come from it in one batch.
    grey = np.asarray(rgb.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), dtype=np.uint8)
    thumb = rgb if rgb.width * rgb.height <= 4096 else rgb.resize((64, 64), Image.Resampling.BOX)
    mean = np.asarray(thumb, np.float32).reshape(-1, 3).mean(axis=0)
    small = None
    if mode == "full":
        small = np.asarray(rgb.resize((EMBED_SIZE, EMBED_SIZE), Image.Resampling.BILINEAR), dtype=np.uint8)
    return exact, grey, mean / max(float(mean.sum()), 1e-6), small


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


def _inspect(path: Path, root: Path, mode: str) -> tuple[dict[str, Any], tuple | None, str | None]:
    """(facts, fingerprints, why unreadable) of one file; never raises for a bad file."""
    name = path.relative_to(root).as_posix()
    try:
        with images.open_stored(path, name=name) as img:
            exif = img.getexif()
            orientation = exif.get(ExifTags.Base.Orientation, 1)
            camera = " ".join(str(exif.get(tag, "")).strip() for tag in (ExifTags.Base.Make, ExifTags.Base.Model)).strip()
            facts = {"size": f"{img.width}x{img.height}", "mode": img.mode, "format": img.format or "?",
                     "camera": camera or "none recorded", "exif_rotated": orientation not in (None, 1),
                     "alpha": img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)}
            rgb = images.to_rgb(img)
            return facts, _fingerprint(rgb, mode), None
    except images.ImageError as exc:  # the wording training's decode uses too (serving.base.images)
        return {"file": name}, None, exc.why


def _inspect_job(job: tuple[str, str, str]) -> tuple[dict[str, Any], tuple | None, str | None]:
    path, root, mode = job
    return _inspect(Path(path), Path(root), mode)


def _fingerprint_files(listing, mode: str, log, bar) -> tuple[Images, list[dict[str, str]]]:
    rows: list[tuple[int, Path, int]] = [(s, f, int(y)) for s, name in enumerate(SPLITS)
                                         for f, y in zip(*listing.splits[name])]
    jobs = [(str(f), str(listing.root), mode) for _, f, _ in rows]
    results: list[tuple] = []
    workers = os.cpu_count() or 1
    with progress.step("decoding and hashing", len(rows), log=log, bar=bar) as advance:
        if workers > 1 and len(jobs) >= 2000:
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
    keep = [i for i, (_, fp, _) in enumerate(results) if fp is not None]
    unreadable = [{"file": rows[i][1].relative_to(listing.root).as_posix(), "why": why}
                  for i, (_, fp, why) in enumerate(results) if fp is None]
    imgs = _columns([rows[i][0] for i in keep], [rows[i][1].relative_to(listing.root).as_posix() for i in keep],
                    [rows[i][2] for i in keep], [results[i][1] for i in keep], [results[i][0] for i in keep])
    return imgs, unreadable


def fingerprint_arrays(splits: dict[str, Any], mode: str, log=None, bar: bool | None = None) -> Images:
    """Fingerprints of array splits (data.Split): synthetic, CIFAR-10 batches, a decoded folder."""
    split_idx, names, labels, fps = [], [], [], []
    total = sum(len(splits[s]) for s in SPLITS)
    with progress.step("hashing", total, log=log, bar=bar) as advance:
        for s, name in enumerate(SPLITS):
            split = splits[name]
            ids = split.ids()
            for i in range(len(split)):
                fps.append(_fingerprint(Image.fromarray(split.x[i]), mode))
                split_idx.append(s)
                names.append(ids[i])
                labels.append(int(split.y[i]))
                if i % 256 == 255:
                    advance(256)
            advance(len(split) % 256)
    facts = [{"size": f"{splits[SPLITS[s]].x.shape[2]}x{splits[SPLITS[s]].x.shape[1]}", "mode": "RGB",
              "format": "array", "camera": "none recorded", "exif_rotated": False, "alpha": False} for s in split_idx]
    return _columns(split_idx, names, labels, fps, facts)


def _columns(split_idx, names, labels, fps, facts) -> Images:
    grey = np.stack([fp[1] for fp in fps]) if fps else np.zeros((0, HASH_SIDE, HASH_SIDE), np.uint8)
    small = [fp[3] for fp in fps]
    return Images(
        split=np.asarray(split_idx, np.int8), names=list(names), labels=np.asarray(labels, np.int64),
        exact=[fp[0] for fp in fps], phash=phash(grey), phash_mirror=phash(grey[:, :, ::-1]),
        small=np.stack(small) if small and small[0] is not None else None, grey=grey,
        chroma=np.stack([fp[2] for fp in fps]) if fps else np.zeros((0, 3), np.float32), facts=list(facts))


def _not_images(folders: list[Path], root: Path) -> list[str]:
    """Files in class folders that training skips for their name (not an image suffix)."""
    out = []
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and not images.is_image_path(f):
                out.append(f.relative_to(root).as_posix())
    return out


# ---- embeddings ----------------------------------------------------------------------------

def embeddings(small: np.ndarray, weights: str, log=None, bar: bool | None = None) -> np.ndarray:
    """Pooled MobileNetV2 features (N, 1280) of EMBED_SIZE-px images, ImageNet weights (imagenet or a file)."""
    from training.model import backbones  # noqa: PLC0415
    from training.env import keras, tf  # noqa: PLC0415

    base = backbones.build_pretrained(backbones.get("mobilenetv2"), EMBED_SIZE, weights)
    pool = keras().layers.GlobalAveragePooling2D()

    @tf().function(reduce_retracing=True)
    def embed(x):
        return pool(base(x / 127.5 - 1.0, training=False))  # MobileNetV2's preprocess_input

    out = np.zeros((len(small), base.output_shape[-1]), np.float32)
    with progress.step("embedding (MobileNetV2)", len(small), log=log, bar=bar) as advance:
        for i in range(0, len(small), EMBED_BATCH):
            batch = small[i:i + EMBED_BATCH].astype(np.float32)
            out[i:i + len(batch)] = embed(tf().constant(batch)).numpy()
            advance(len(batch))
    return out


def project(features: np.ndarray, dims: int = PCA_DIMS) -> np.ndarray:
    """Centre, keep the top `dims` principal axes, unit length: a cosine that ignores the shared mean."""
    x = features - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    if len(x) > dims + 1:
        # Eigen-decomposition of the DxD covariance: cheap for D=1280 whatever N is.
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))
        x = x @ vecs[:, ::-1][:, :dims].astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# ---- pair search ---------------------------------------------------------------------------

def _bits(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> (N, 64) float32 of +-1, so that Hamming distance = (64 - a.b) / 2."""
    as_bytes = h.astype(">u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(as_bytes, axis=1).astype(np.float32) * 2 - 1


def _standardised(grey: np.ndarray) -> np.ndarray:
    """(N, 32, 32) grey -> (N, 1024) zero-mean unit vectors: a dot product is the pixels' correlation,
    blind to brightness and contrast (a colour-shifted copy keeps its correlation)."""
    z = grey.reshape(len(grey), -1).astype(np.float32)
    z -= z.mean(axis=1, keepdims=True)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)


def search(imgs: Images, emb: np.ndarray | None, thresholds: Thresholds, *, cross_only: bool,
           log=None, bar: bool | None = None, candidates=None) -> tuple[list[Pair], bool]:
    """Every pair within the thresholds; (pairs, truncated).

    A hash match alone is not enough: low-detail images (a shape on a plain ground, sky) share
    their few low frequencies without being copies, so a hash candidate must also correlate
    pixel for pixel (on phash's own 32x32 grey reduction, mirrored when the mirror hash matched).
    An embedding match (full mode) stands on its own. `candidates` (ann search: a sparse upper-triangular
    matrix from ann_candidates) replaces the all-pairs cosine: only its pairs are embedding candidates."""
    n = len(imgs.labels)
    bits, mirror = _bits(imgs.phash), _bits(imgs.phash_mirror)
    z = _standardised(imgs.grey)
    z_mirror = _standardised(imgs.grey[:, :, ::-1])
    split = imgs.split
    split_end = np.searchsorted(split, np.arange(len(SPLITS)), side="right")
    pairs: list[Pair] = []
    truncated = False
    with progress.step("searching pairs", n, log=log, bar=bar) as advance:
        for start in range(0, n, SEARCH_BLOCK):
            stop = min(n, start + SEARCH_BLOCK)
            # Columns right of the block's first row; cross-split only: from the end of its split on.
            cols = slice(int(split_end[split[start]]) if cross_only else start, n)
            if cols.start >= n:
                advance(stop - start)
                continue
            # Thresholds as dot products (Hamming <= T  <=>  +-1 dot >= 64 - 2T): no full-size arithmetic
            # beyond the products and one comparison each, then work only on the hits.
            min_dot = 64 - 2 * thresholds.phash - 0.5
            dot = bits[start:stop] @ bits[cols].T
            dot_m = bits[start:stop] @ mirror[cols].T
            hit = (dot >= min_dot) | (dot_m >= min_dot)
            cos = emb[start:stop] @ emb[cols].T if emb is not None and candidates is None else None
            if cos is not None:
                hit |= cos >= thresholds.cosine
            if candidates is not None:
                near_r, near_c = candidates[start:stop, cols.start:n].nonzero()
                hit[near_r, near_c] = True
            if cols.start < stop:  # the block's own square: keep each pair once, never an image with itself
                width = stop - cols.start
                hit[:, :width] &= np.arange(cols.start, stop)[None, :] > np.arange(start, stop)[:, None]
            if cross_only and split[start] != split[stop - 1]:  # a block that straddles two splits
                hit &= split[start:stop][:, None] != split[cols][None, :]
            rr, cc = np.nonzero(hit)
            ii, jj = rr + start, cc + cols.start
            ham, ham_m = (64 - dot[rr, cc]) / 2, (64 - dot_m[rr, cc]) / 2
            mirrored = ham_m < ham
            best = np.minimum(ham, ham_m)
            if cos is not None:
                cosines = cos[rr, cc]
            elif emb is not None:  # ann: the exact cosine of the few hits, so both searches report alike
                cosines = np.einsum("kd,kd->k", emb[ii], emb[jj])
            else:
                cosines = None
            direct, flipped = np.einsum("kd,kd->k", z[ii], z[jj]), np.einsum("kd,kd->k", z[ii], z_mirror[jj])
            corr = np.where(mirrored, flipped, direct)
            corr_any = np.maximum(direct, flipped)
            same_colour = np.abs(imgs.chroma[ii] - imgs.chroma[jj]).sum(axis=1) <= MAX_CHROMA_SHIFT
            for k in range(len(rr)):
                i, j = int(ii[k]), int(jj[k])
                d = int(round(best[k]))
                cosine = None if cosines is None else round(float(cosines[k]), 4)
                if imgs.exact[i] == imgs.exact[j]:
                    kind, how = "exact", "pixels"
                elif d <= thresholds.phash and corr[k] >= thresholds.pixels and same_colour[k]:
                    kind, how = "near", "phash-mirror" if mirrored[k] else "phash"
                elif cosine is not None and cosine >= thresholds.cosine and corr_any[k] >= EMBED_MIN_PIXELS:
                    kind, how = "near", "embedding"
                    corr[k] = corr_any[k]
                else:
                    continue
                pairs.append(Pair(i, j, kind, how, d, cosine, round(float(corr[k]), 4)))
            advance(stop - start)
            if len(pairs) > MAX_PAIRS:
                truncated = True
                break
    return pairs, truncated


def _import_faiss():
    import faiss  # noqa: PLC0415  (the optional `ann` extra)

    return faiss


def build_index(faiss, x: np.ndarray, kind: str = ANN_INDEX, *, links: int = HNSW_LINKS, ef_search: int = HNSW_EF_SEARCH,
                nlist: int | None = None, nprobe: int = IVF_NPROBE):
    """A faiss inner-product index over unit vectors (so inner product = cosine): ivf (IVF-Flat, the
    default: nlist k-means lists, nprobe of them searched), hnsw, or flat (exhaustive)."""
    d = x.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, links, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    elif kind == "ivf":
        # ~4 sqrt(n) lists, but at least 39 training points per list (faiss's k-means asks for them).
        nlist = nlist or max(1, min(int(4 * np.sqrt(len(x))), len(x) // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = nprobe
    elif kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    index.add(x)
    return index


def ann_candidates(emb: np.ndarray, min_cosine: float, *, kind: str = ANN_INDEX, neighbours: int = ANN_NEIGHBOURS,
                   log=None, bar: bool | None = None, **index_args):
    """Pairs (i < j) among each image's `neighbours` nearest by the index with cosine >= min_cosine, as a
    sparse boolean matrix. An image with more than `neighbours` copies keeps only its nearest ones,
    which still links every copy into the same group on the page."""
    from scipy import sparse  # noqa: PLC0415

    faiss = _import_faiss()
    x = np.ascontiguousarray(emb, dtype=np.float32)
    n = len(x)
    k = min(neighbours + 1, n)  # +1: an image finds itself first
    rows_out, cols_out = [], []
    with progress.step(f"nearest neighbours (faiss {kind})", n, log=log, bar=bar) as advance:
        index = build_index(faiss, x, kind, **index_args)
        for start in range(0, n, 4096):
            sims, nbrs = index.search(x[start:start + 4096], k)
            batch = len(sims)
            rows = np.repeat(np.arange(start, start + batch), k)
            cols, sims = nbrs.ravel(), sims.ravel()
            # A hair below the threshold: the exact cosine (computed again in search) decides.
            keep = (cols >= 0) & (cols != rows) & (sims >= min_cosine - 1e-3)
            rows_out.append(np.minimum(rows[keep], cols[keep]))
            cols_out.append(np.maximum(rows[keep], cols[keep]))
            advance(batch)
    a = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
    b = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64)
    return sparse.csr_matrix((np.ones(len(a), bool), (a, b)), shape=(n, n))


def choose_search(requested: str, n: int, has_embeddings: bool, log) -> dict[str, Any]:
    """Which embedding search runs, and why (the report's "search")."""
    out = {"requested": requested, "used": "exact", "index": None}
    if not has_embeddings:
        return {**out, "why": "no embeddings: hashes only, searched exactly"}
    if requested == "exact" or (requested == "auto" and n <= ANN_ABOVE):
        return {**out, "why": f"{n:,} images" + (f" <= {ANN_ABOVE:,}" if requested == "auto" else "") + ": exact all-pairs cosine"}
    try:
        _import_faiss()
    except ImportError:
        why = f"faiss is not installed: exact all-pairs cosine instead; {ANN_INSTALL} adds the nearest-neighbour index"
        _warn(log)(f"note: {n:,} images: {why}")
        return {**out, "why": why}
    return {**out, "used": "ann", "index": f"faiss IVF-Flat (~4 sqrt(n) lists, nprobe {IVF_NPROBE}), "
                                          f"{ANN_NEIGHBOURS} neighbours per image",
            "why": f"{n:,} images" + (f" > {ANN_ABOVE:,}" if requested == "auto" else ", --search ann")}


# ---- the report ----------------------------------------------------------------------------

def _analyse(imgs: Images, meta: dict[str, Any], mode: str, thresholds: Thresholds, weights: str, log, bar,
             *, cross_only: bool = False, search_kind: str = "auto") -> Report:
    seconds: dict[str, float] = {}
    emb = None
    embed_note = "fast mode: hashes only"
    if mode == "full" and imgs.small is not None:
        t = time.perf_counter()
        try:
            emb = project(embeddings(imgs.small, weights, log, bar))
            embed_note = f"MobileNetV2 ({weights}) at {EMBED_SIZE}px, centred, top {PCA_DIMS} PCA axes"
        except UserError as exc:
            # A check without embeddings still finds exact and hash-near copies: say so, do not fail.
            embed_note = f"skipped: {exc}"
            _warn(log)(f"warning: embeddings {embed_note}")
        seconds["embeddings"] = round(time.perf_counter() - t, 2)
        imgs.small = None  # the 64-px copies are not needed any more
    how = choose_search(search_kind, len(imgs.labels), emb is not None, log)
    t = time.perf_counter()
    candidates = None
    if how["used"] == "ann":
        candidates = ann_candidates(emb, thresholds.cosine, log=log, bar=bar)
        seconds["ann_index"] = round(time.perf_counter() - t, 2)
    pairs, truncated = search(imgs, emb, thresholds, cross_only=cross_only, log=log, bar=bar, candidates=candidates)
    seconds["search"] = round(time.perf_counter() - t, 2)

    names = meta["class_names"]
    split_name = [SPLITS[s] for s in imgs.split]

    def entry(row: int) -> dict[str, Any]:
        return {"split": split_name[row], "file": imgs.names[row], "label": names[int(imgs.labels[row])]}

    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"exact": 0, "near": 0})
    dup_of: dict[str, set[int]] = defaultdict(set)   # "test-in-train" -> rows of test images with a copy in train
    conflicts, listed = [], []
    rows_of = {}
    drop = set()
    for p in pairs:
        sa, sb = split_name[p.a], split_name[p.b]
        key = f"{sa}-{sb}"
        counts[key][p.kind] += 1
        if sa != sb:
            dup_of[f"{sb}-in-{sa}"].add(p.b)
            if sa == "train":
                drop.add(p.a)
        item = {"a": entry(p.a), "b": entry(p.b), "kind": p.kind, "how": p.how, "hamming": p.hamming,
                "cosine": p.cosine, "pixel_correlation": p.pixels}
        if imgs.labels[p.a] != imgs.labels[p.b]:
            conflicts.append(item)
        listed.append(item)
        rows_of[id(item)] = (p.a, p.b)
    split_sizes = {s: int((imgs.split == i).sum()) for i, s in enumerate(SPLITS)}
    leaks = {key: {"images": len(rows), "of": split_sizes[key.split("-")[0]],
                   "percent": round(100 * len(rows) / max(1, split_sizes[key.split("-")[0]]), 2)}
             for key, rows in sorted(dup_of.items())}
    data = {
        "source": meta["source"],
        "mode": mode,
        "cross_split_only": cross_only,
        "class_names": names,
        "splits": split_sizes,
        "thresholds": {"phash_distance": thresholds.phash, "pixel_correlation": thresholds.pixels,
                       "cosine": thresholds.cosine},
        "embeddings": embed_note,
        "search": how,
        "pairs_found": len(pairs),
        "pairs_truncated": truncated,
        "duplicates": {k: counts[k] for k in sorted(counts)},
        "leaks": leaks,
        "label_conflicts": conflicts,
        "pairs": _order(listed),
        "balance": _balance(imgs, names),
        "images": _image_facts(imgs, names),
        "unreadable": meta["unreadable"],
        "not_images": meta["not_images"],
        "seconds": seconds,
    }
    return Report(data, pairs, imgs, None, sorted(drop), rows_of, {k: sorted(v) for k, v in dup_of.items()})


def _warn(log):
    return log or (lambda line: print(line, file=sys.stderr, flush=True))


def _order(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Leaks first (train-test, train-val, val-test), then within-split pairs; closest first."""
    rank = {"train-test": 0, "train-val": 1, "val-test": 2}
    return sorted(items, key=lambda it: (rank.get(f"{it['a']['split']}-{it['b']['split']}", 3),
                                         it["kind"] != "exact", it["hamming"], -(it["cosine"] or 0)))


def _balance(imgs: Images, names: list[str]) -> dict[str, Any]:
    out = {}
    for s, split in enumerate(SPLITS):
        labels = imgs.labels[imgs.split == s]
        if len(labels) == 0:
            continue
        counts = np.bincount(labels, minlength=len(names))
        out[split] = {"counts": {names[c]: int(counts[c]) for c in range(len(names))},
                      "largest_smallest_ratio": round(float(counts.max() / counts.min()), 2) if counts.min() else None,
                      "missing": [names[c] for c in range(len(names)) if counts[c] == 0]}
    return out


def _image_facts(imgs: Images, names: list[str]) -> dict[str, Any]:
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
    return {
        "sizes": {size: dict(c) for size, c in sorted(sizes.items(), key=lambda kv: -sum(kv[1].values()))},
        "modes": dict(Counter(f["mode"] for f in imgs.facts)),
        "formats": dict(Counter(f["format"] for f in imgs.facts)),
        "cameras": dict(Counter(f["camera"] for f in imgs.facts).most_common(20)),
        "kinds": {k: int(v) for k, v in kinds.items()},
        "class_outliers": _class_outliers(imgs, names),
    }


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


# ---- the training run's own check ------------------------------------------------------------

@dataclass(frozen=True)
class HeldCopies:
    """Which held-out images the model may have seen, after any --drop-leaks (indices into the split):
    calibration fits on the other validation images, the record scores the other test images too."""
    val: np.ndarray   # validation images with a copy in train
    test: np.ndarray  # test images with a copy in train or in validation (early stopping and calibration see val)


def held_copies(report: Report, n_train: int, n_val: int, dropped: bool) -> HeldCopies:
    """The report's copied rows as split indices; --drop-leaks removed every training copy, so then only
    test images that copy a validation image are left."""
    def rows(key: str, offset: int) -> set[int]:
        return {r - offset for r in report.copied.get(key, [])}

    val = set() if dropped else rows("val-in-train", n_train)
    test = rows("test-in-val", n_train + n_val) | (set() if dropped else rows("test-in-train", n_train + n_val))
    return HeldCopies(np.asarray(sorted(val), np.int64), np.asarray(sorted(test), np.int64))


def _leak_line(key: str, leak: dict[str, Any], dropped: bool) -> str:
    """One leak ("test-in-train": test images with a copy in train) as the run reports it: a warning,
    unless --drop-leaks has removed the training copies behind it."""
    held, _, source = key.partition("-in-")
    found = f"{leak['images']:,} {held} image(s) ({leak['percent']:.2f}%) have an exact or near copy in {source}"
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
    report = check_dataset(dataset, mode=cfg.data_check, weights=weights, log=log)
    d = report.data
    part: dict[str, Any] = {
        "mode": cfg.data_check,
        "thresholds": d["thresholds"],
        "embeddings": d["embeddings"],
        "search": d["search"]["used"],
        "pairs": {k: v for k, v in d["duplicates"].items()},
        "leaks": d["leaks"],
        "label_conflicts": len(d["label_conflicts"]),
        "dropped": None,
    }
    copies = held_copies(report, len(dataset.train), len(dataset.val), cfg.drop_leaks)
    if cfg.drop_leaks:  # first, so each warning below can say what the drop has already taken care of
        ids = dataset.train.ids()
        drop = np.asarray(report.drop_train, np.int64)  # train rows come first, so rows are train indices
        keep = np.ones(len(dataset.train), bool)
        keep[drop] = False
        part["dropped"] = {"count": int(len(drop)), "train_before": len(dataset.train), "files": [ids[i] for i in drop]}
        if len(drop):
            dataset.train = dataset.train.take(keep)
            log(f"data check: dropped {len(drop):,} of {part['dropped']['train_before']:,} training image(s) "
                "that duplicate a val or test image (--drop-leaks)")
    for key, leak in d["leaks"].items():
        log(_leak_line(key, leak, cfg.drop_leaks))
    if d["label_conflicts"]:
        log(f"warning: data check: {len(d['label_conflicts'])} pair(s) of copies carry different labels")
    part["seconds"] = round(time.perf_counter() - start, 2)
    return dataset, part, copies
