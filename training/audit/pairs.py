"""Exact and near copies: every pair of images within the thresholds.

Pairs are searched exactly, block by block with numpy (Hamming distance as a dot product of +-1
bit vectors, cosine as a dot product of unit vectors): ~60k images take seconds per pass on 2 cores.
A hash match must also correlate pixel for pixel and keep its mean colour; an embedding match must
still look alike pixel for pixel (see judge). Past training.audit.ann.ANN_ABOVE images the embedding
candidates come from a faiss index instead of the all-pairs cosine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.base.errors import UserError
from training import progress
from training.audit import geometry
from training.audit.fingerprints import SPLITS, Images

SEARCH_BLOCK = 256       # rows per block: each 256 x 60k float32 matrix is 61 MB
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
# A hash match must also keep each colour channel's pattern (16x16 thumbnails, the lowest correlation
# of R, G and B): brightness, contrast, saturation and white-balance shifts scale and offset a channel
# and keep it, a shape recoloured does not. (It replaced a mean-colour limit that a saturation x1.3 broke:
# docs/decisions.md, benchmarks/label_issues.py.)
MIN_COLOUR_CORRELATION = 0.8
# ...and its mean colour may move only so far (L1 distance of the R, G, B shares of the mean): a channel's
# pattern survives any per-channel gain and offset, so on its own it calls a shape redrawn in other colours
# a copy. Saturation x1.3 moved the shares up to 0.19 on banana-leaf (0.13 on CIFAR-10; 300 images each),
# the same shapes in other colours of the built-in synthetic set 0.38 at the median.
MAX_CHROMA_SHIFT = 0.25
FLAT_CHANNEL = 4.0       # grey levels (sd): a channel this flat has no pattern to compare
# A grey copy of a colour image (its saturation taken to zero) has no colour to keep or shift: where one image of
# a pair is grey and the other is not, the colour rules give way and the grey ones (hash, pixel correlation,
# alignment), which compare luminance alone, decide. Grey: its 16x16 colour thumbnail's channels differ by at
# most this many levels on average (a grey image saved as RGB JPEG: 0.0; the greyest of banana-leaf's 577
# photos: 8.2; CIFAR-10 holds real grey photos, 56 of 3,000 at or below it).
GREY_SPREAD = 2.0


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
class Pair:
    a: int
    b: int
    kind: str            # exact | near
    how: str             # pixels | phash | phash-mirror | embedding | crop | rotation (geometry.align)
    hamming: int
    cosine: float | None
    pixels: float        # correlation of the 32x32 grey images (mirrored for a mirror match); for a crop or
                         # rotation, of the band-passed grey thumbnails once aligned


@dataclass
class _Prepared:
    """Per-image vectors the blocks multiply: hash bits as +-1, grey images as zero-mean unit vectors."""
    bits: np.ndarray
    mirror: np.ndarray
    z: np.ndarray
    z_mirror: np.ndarray
    emb: np.ndarray | None
    split_end: np.ndarray
    shares: np.ndarray          # (N, 3) the mean colour's R, G, B shares (chroma_shift)
    grey: np.ndarray            # (N,) bool: an image without colour (GREY_SPREAD)


@dataclass
class _Candidates:
    """One block's candidate pairs (rows ii < jj) with their distances, before judging."""
    ii: np.ndarray
    jj: np.ndarray
    hamming: np.ndarray     # the better of direct and mirrored
    mirrored: np.ndarray    # the mirror hash was the closer one
    cosine: np.ndarray | None
    nearest: tuple[np.ndarray, np.ndarray] | None = None  # each row's geometry.NEIGHBOURS nearest later images
                                                          # by cosine: candidates for the crop/rotation check


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
           log=None, bar: bool | None = None, candidates=None, geometric: bool = False) -> tuple[list[Pair], bool]:
    """Every pair within the thresholds; (pairs, truncated).

    A hash match alone is not enough: low-detail images (a shape on a plain ground, sky) share
    their few low frequencies without being copies, so a hash candidate must also correlate
    pixel for pixel (on phash's own 32x32 grey reduction, mirrored when the mirror hash matched).
    `candidates` (ann search: a sparse upper-triangular matrix from ann.ann_candidates) replaces the
    all-pairs cosine: only its pairs are embedding candidates. `geometric` adds the crops and rotations
    that training.audit.geometry aligns (off by default: see analysis.Options.crops)."""
    n = len(imgs.labels)
    prep = _Prepared(_bits(imgs.phash), _bits(imgs.phash_mirror), _standardised(imgs.grey),
                     _standardised(imgs.grey[:, :, ::-1]), emb,
                     np.searchsorted(imgs.split, np.arange(len(SPLITS)), side="right"),
                     colour_shares(imgs.colour), is_grey(imgs.colour))
    pairs: list[Pair] = []
    nearest: list[tuple[np.ndarray, np.ndarray]] = []
    with progress.step("searching pairs", n, log=log, bar=bar) as advance:
        for start in range(0, n, SEARCH_BLOCK):
            stop = min(n, start + SEARCH_BLOCK)
            found = _block(imgs, prep, start, stop, thresholds, cross_only, candidates, geometric)
            if found is not None:
                pairs.extend(judge(imgs, prep, found, thresholds))
                if found.nearest is not None:
                    nearest.append(found.nearest)
            advance(stop - start)
            if len(pairs) > MAX_PAIRS:
                return pairs, True
    if geometric:
        known = np.array([p.a * n + p.b for p in pairs], np.int64)
        pairs.extend(geometric_pairs(imgs, prep, known, cross_only, nearest, log=log, bar=bar))
    return pairs, len(pairs) > MAX_PAIRS


def geometric_pairs(imgs: Images, prep: _Prepared, known: np.ndarray, cross_only: bool,
                    nearest: list[tuple[np.ndarray, np.ndarray]] = (), log=None, bar: bool | None = None) -> list[Pair]:
    """Crops and small rotations (training.audit.geometry): each image's few nearest by zoom descriptor
    (and by embedding, `nearest`), kept when they align (band-passed grey) and keep their colours; pairs
    already found (`known`: their codes a * n + b) are not repeated."""
    n = len(imgs.labels)
    with progress.step("aligning crops and rotations", n, log=log, bar=bar) as advance:
        ii, jj = geometry.candidates(imgs.grey, imgs.split, cross_only)
        if nearest:
            codes = np.unique(np.concatenate([ii * n + jj] + [a * n + b for a, b in nearest]))
            ii, jj = codes // n, codes % n
        # One membership test over pair codes, not a Python set lookup per candidate (20 a row: 1.2M on 60k).
        new = ~np.isin(ii * n + jj, known)
        ii, jj = ii[new], jj[new]
        al = geometry.align(imgs.grey, ii, jj)
        ok = al.score >= geometry.MIN_ALIGNED
        ii, jj = ii[ok], jj[ok]
        al = geometry.Aligned(al.score[ok], al.zoomed[ok], al.transform[ok])
        keep = colour_kept(geometry.colour_after(imgs.colour, ii, jj, al), geometry.MIN_ALIGNED_COLOUR, prep, ii, jj)
        out = []
        for k in np.nonzero(keep)[0]:
            i, j = int(ii[k]), int(jj[k])
            dot = max(float(prep.bits[i] @ prep.bits[j]), float(prep.bits[i] @ prep.mirror[j]))
            cosine = None if prep.emb is None else round(float(prep.emb[i] @ prep.emb[j]), 4)
            out.append(Pair(i, j, "near", geometry.kind_of(al.transform[k]), int(round((64 - dot) / 2)), cosine,
                            round(float(al.score[k]), 4)))
        advance(n)
    return out


def _block(imgs: Images, prep: _Prepared, start: int, stop: int, thresholds: Thresholds, cross_only: bool,
           candidates, geometric: bool = False) -> _Candidates | None:
    """Candidate pairs of rows start..stop against every later row (cross-split only: later splits)."""
    n, split = len(imgs.labels), imgs.split
    cols = slice(int(prep.split_end[split[start]]) if cross_only else start, n)
    if cols.start >= n:
        return None
    # Thresholds as dot products (Hamming <= T  <=>  +-1 dot >= 64 - 2T): no full-size arithmetic
    # beyond the products and one comparison each, then work only on the hits.
    min_dot = 64 - 2 * thresholds.phash - 0.5
    dot = prep.bits[start:stop] @ prep.bits[cols].T
    dot_m = prep.bits[start:stop] @ prep.mirror[cols].T
    hit = (dot >= min_dot) | (dot_m >= min_dot)
    cos = prep.emb[start:stop] @ prep.emb[cols].T if prep.emb is not None and candidates is None else None
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
    if cos is not None:
        cosines = cos[rr, cc]
    elif prep.emb is not None:  # ann: the exact cosine of the few hits, so both searches report alike
        cosines = np.einsum("kd,kd->k", prep.emb[ii], prep.emb[jj])
    else:
        cosines = None
    nearest = None
    if cos is not None and geometric:
        # The embedding's nearest neighbours are crop and rotation candidates too: on CIFAR-10 they held the
        # originals of JPEG'd crops that the zoom descriptor ranked past its top 10 (and the reverse).
        # From this block's cosines (each pair seen from its earlier image), so no second product.
        nearest = geometry.top_k(cos, start, split, cross_only, geometry.NEIGHBOURS,
                                 col0=cols.start, later=True)
    return _Candidates(ii, jj, np.minimum(ham, ham_m), ham_m < ham, cosines, nearest)


def colour_agreement(colour: np.ndarray, ii: np.ndarray, jj: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """The lowest correlation over R, G and B between the colour thumbnails of ii and jj (jj mirrored
    where `mirrored`); a channel flat in both images has no pattern and counts as agreeing, one flat in
    only one image (and clearly patterned in the other) as disagreeing."""
    if len(ii) == 0:
        return np.zeros(0, np.float32)
    a = colour[ii].astype(np.float32)
    b = colour[jj].astype(np.float32)
    b = np.where(mirrored[:, None, None, None], b[:, :, ::-1], b)
    a, b = a.reshape(len(ii), -1, 3), b.reshape(len(jj), -1, 3)
    a -= a.mean(axis=1, keepdims=True)
    b -= b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    sa, sb = a.std(axis=1), b.std(axis=1)
    # Flat in both: no pattern to compare, so they agree. Flat in one only: a pattern that the other image
    # lacks (a red shape on black against a green one) disagrees, unless the other is nearly flat too.
    both = (sa < FLAT_CHANNEL) & (sb < FLAT_CHANNEL)
    one = ((sa < FLAT_CHANNEL) | (sb < FLAT_CHANNEL)) & ~both
    near_flat = np.maximum(sa, sb) < 2 * FLAT_CHANNEL
    r = np.where(both | (one & near_flat), 1.0, np.where(one, 0.0, num / np.maximum(den, 1e-6)))
    return r.min(axis=1)


def colour_shares(colour: np.ndarray) -> np.ndarray:
    """Each image's mean colour as R, G, B shares (computed once per search, not per block)."""
    means = colour.reshape(len(colour), -1, 3).astype(np.float32).mean(axis=1) + 1.0  # +1: black has shares too
    return means / means.sum(axis=1, keepdims=True)


def is_grey(colour: np.ndarray) -> np.ndarray:
    """(N,) bool: images whose colour thumbnails' channels are (nearly) equal everywhere (GREY_SPREAD)."""
    c = colour.astype(np.int16)
    return (c.max(axis=-1) - c.min(axis=-1)).reshape(len(c), -1).mean(axis=1) <= GREY_SPREAD


def colour_kept(agreement: np.ndarray, floor: float, prep: _Prepared, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """The colour rule of every pair kind: each channel keeps its pattern (agreement >= floor) and the mean
    colour moves no more than MAX_CHROMA_SHIFT; or exactly one image is grey (GREY_SPREAD), with no colour to
    compare."""
    return (((agreement >= floor) & (chroma_shift(prep.shares, ii, jj) <= MAX_CHROMA_SHIFT))
            | (prep.grey[ii] != prep.grey[jj]))


def chroma_shift(shares: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> np.ndarray:
    """How far the mean colour moved between ii and jj: L1 distance of its R, G, B shares."""
    return np.abs(shares[ii] - shares[jj]).sum(axis=1)


def judge(imgs: Images, prep: _Prepared, c: _Candidates, thresholds: Thresholds) -> list[Pair]:
    """The candidates that are copies: exact pixels, a hash match that correlates and keeps its colour,
    or an embedding match that still correlates (the better of direct and mirrored)."""
    ii, jj = c.ii, c.jj
    direct = np.einsum("kd,kd->k", prep.z[ii], prep.z[jj])
    flipped = np.einsum("kd,kd->k", prep.z[ii], prep.z_mirror[jj])
    corr = np.where(c.mirrored, flipped, direct)
    corr_any = np.maximum(direct, flipped)
    same_colour = colour_kept(colour_agreement(imgs.colour, ii, jj, c.mirrored), MIN_COLOUR_CORRELATION, prep, ii, jj)
    out = []
    for k in range(len(ii)):
        i, j = int(ii[k]), int(jj[k])
        d = int(round(c.hamming[k]))
        cosine = None if c.cosine is None else round(float(c.cosine[k]), 4)
        r = corr[k]
        if imgs.exact[i] == imgs.exact[j]:
            kind, how = "exact", "pixels"
        elif d <= thresholds.phash and corr[k] >= thresholds.pixels and same_colour[k]:
            kind, how = "near", "phash-mirror" if c.mirrored[k] else "phash"
        elif cosine is not None and cosine >= thresholds.cosine and corr_any[k] >= EMBED_MIN_PIXELS:
            kind, how, r = "near", "embedding", corr_any[k]
        else:
            continue
        out.append(Pair(i, j, kind, how, d, cosine, round(float(r), 4)))
    return out
