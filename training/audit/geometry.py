"""Crops and small rotations: near copies that neither the hashes nor the embedding cosine catch.

A 5-15% crop resized back, or a 3-8 degree rotation cut to its corners, moves every pixel: phash
changes, and the 64-px embedding puts the copy at cosine 0.72-0.77 from its original, below clean
nearest neighbours (docs/decisions.md, "A near copy keeps..."). Two cheap steps find them:

  candidates  each image's NEIGHBOURS nearest images by a zoom descriptor: its own 8x8 grey view
              against every other image's centre window (ZOOM_SCALE of the frame). A crop or a rotation
              is a zoomed-in view of its original, so its full view matches the original's centre window;
              this put the original in the top 10 for 98-100% of planted crops and rotations, where
              the embedding's top 10 held 84-92% on CIFAR-10.
  verify      align each candidate over a grid of scale, rotation and shift (the zoomed-in image is a
              sub-window of the other, either way round) on band-passed grey thumbnails, and accept the
              pair when the best normalized correlation clears MIN_ALIGNED and the colours agree.

Everything is numpy/scipy over all pairs at once: scipy.ndimage blurs, a scipy.sparse matrix of bilinear
weights does every warp of every image in one product (a warp is linear in the pixels). No OpenCV or
scikit-image: neither is a dependency, and their registration (ECC, phase correlation) works one pair at
a time in a Python loop, far too slow for the ~15 candidates of each of 60,000 images.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse

# ---- candidates ------------------------------------------------------------------------------------
ZOOM_SIDE = 8        # the descriptor's side: 64 dims, 4x cheaper per pair than the 256-dim embedding
ZOOM_BLUR = 1.5      # sd in 32-px grey pixels: tolerates the 0-7% shift of an off-centre crop
ZOOM_SCALE = 0.9     # the centre window a crop or rotation most often is (crops 85-95%, rotations 3-8
                     # degrees keep 89-95%); measured: top-10 recall 0.98-1.00 at 0.9 on both sets
NEIGHBOURS = 10      # candidates per image, by zoom descriptor and again by embedding (pairs.search):
                     # top-10 by zoom held 98-100% of planted originals, the two together 100%
SUBSAMPLE = 16       # top-k without a full sort: the k-th best of every 16th column is a lower bound
CANDIDATE_BLOCK = 512

# ---- verification ------------------------------------------------------------------------------------
ALIGN_SIDE = 12      # aligned thumbnails' side: 144 dims per transform
BAND = (1.0, 4.0)    # band-pass (difference of Gaussians, sd in 32-px grey pixels): without it smooth
                     # images (sky, a plain wall) correlate at 0.95+ under some warp (clean CIFAR-10
                     # candidates' 99th percentile); with it that percentile is 0.78
SCALES = (0.80, 0.85, 0.90, 0.95, 1.0)   # the zoomed-in image is this share of the other's frame
ANGLES = (-8.0, -4.0, 0.0, 4.0, 8.0)     # degrees; a planted 3-8 degree rotation is within 2 of one
SHIFTS = (-0.08, -0.04, 0.0, 0.04, 0.08) # window centre, as a share of the frame: a crop's centre moves at
                                         # most (1 - scale) / 2, so 225 transforms in all; 0.04 is half an
                                         # aligned pixel. (A step more reach, 465 transforms, found no more
                                         # planted copies once near misses are refined, at 1.3x the time.)
# Accept at this best aligned correlation: the highest that kept >= 24 of 25 planted crops, rotations
# and their JPEG copies on CIFAR-10 (10,000 images; banana-leaf's JPEG'd crops 23 of 25), where clean
# candidates at or above were 183 of 90,778 (banana-leaf 19 of 4,749), many of them real re-shot or
# re-cropped copies but not all (benchmarks/label_issues.py --part copies prints the trade-off at
# 0.86-0.94; docs/decisions.md, "Crops and small rotations").
MIN_ALIGNED = 0.88
# ...and each colour channel of the aligned colour thumbnails must keep its pattern (the hash rule's
# MIN_COLOUR_CORRELATION idea; lower, because a 16-px thumbnail resampled under a crop loses detail),
# with the mean colour's shares within pairs.MAX_CHROMA_SHIFT: a shape redrawn in other colours is not
# a copy.
MIN_ALIGNED_COLOUR = 0.6
# The grid's steps (0.05 in scale, 4 degrees, 0.04 in shift) leave up to half a step of misalignment, which
# cost a few planted crops 0.01-0.09 of correlation (banana-leaf: 0.79-0.875 against a median of 0.96); a
# pair that comes this close is refined by a local search (coordinate steps halving from REFINE_STEPS).
REFINE_FROM = 0.7
REFINE_STEPS = (0.02, 2.0, 0.02, 0.02)   # scale, degrees, dx, dy
REFINE_ROUNDS = 6                       # each tries +-one step on each parameter; steps halve every 2
IMAGE_BATCH = 8      # images warped at once: their (225 x 144) stacks must be made contiguous, and
                     # that transpose runs 11x faster per image in groups of 8 than of 256 (cache)


@dataclass(frozen=True)
class Transform:
    scale: float
    degrees: float
    dx: float
    dy: float


def transforms() -> list[Transform]:
    """The search grid: every scale and angle, and the shifts a window of that scale allows."""
    out = []
    for s in SCALES:
        reach = (1 - s) / 2 + 1e-9
        out += [Transform(s, a, dx, dy) for a in ANGLES for dx in SHIFTS for dy in SHIFTS
                if abs(dx) <= reach and abs(dy) <= reach]
    return out


def _standardised(x: np.ndarray) -> np.ndarray:
    """Zero-mean unit vectors along the last axis (a dot product is then a correlation), float32, C order."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x -= x.mean(axis=-1, keepdims=True)
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))   # einsum: 3x faster than linalg.norm here
    x /= np.maximum(norm, 1e-6)[..., None]
    return x


def _one_blas_thread():
    """Many tiny products (225 x 144 by 144 x ~20) run 30x slower with OpenBLAS's threads than without on
    a busy 2-core machine (measured: 1.5 s against 0.05 s for 256 images); threadpoolctl comes with the
    label search's scikit-learn, and without it the products simply keep their threads."""
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, "blas")


def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Output pixel centres in frame units (-0.5..0.5): (u across, v down), flattened."""
    c = (np.arange(side) + 0.5) / side - 0.5
    v, u = np.meshgrid(c, c, indexing="ij")
    return u.ravel(), v.ravel()


def _source(t: np.ndarray, side: int, src: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in a src x src image that transforms t (..., 4: scale, degrees, dx, dy) sample."""
    u, v = _grid(side)
    s, a, dx, dy = (t[..., k, None] for k in range(4))
    a = np.radians(a)
    x = s * (np.cos(a) * u - np.sin(a) * v) + dx
    y = s * (np.sin(a) * u + np.cos(a) * v) + dy
    # Clamped to the image: a corner that falls outside repeats the edge (rotations reach 0.5-2% out).
    return (np.clip((x + 0.5) * src - 0.5, 0, src - 1.001), np.clip((y + 0.5) * src - 0.5, 0, src - 1.001))


def warp_matrix(ts: list[Transform], side: int, src: int) -> sparse.csr_matrix:
    """(len(ts) * side^2, src^2) bilinear weights: one product warps a flattened image every way at once."""
    t = np.array([[x.scale, x.degrees, x.dx, x.dy] for x in ts], np.float64)
    px, py = _source(t, side, src)
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    fx, fy = px - x0, py - y0
    rows = np.broadcast_to(np.arange(px.size).reshape(px.shape), px.shape)
    parts = [((y0 + oy) * src + x0 + ox, w) for ox, oy, w in
             ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy))]
    return sparse.csr_matrix((np.concatenate([w.ravel() for _, w in parts]).astype(np.float32),
                              (np.concatenate([rows.ravel()] * 4), np.concatenate([c.ravel() for c, _ in parts]))),
                             shape=(px.size, src * src))


def sample(images: np.ndarray, t: np.ndarray, side: int) -> np.ndarray:
    """images (P, H, W[, C]) each sampled by its own transform t (P, 4) -> (P, side^2[, C]), bilinear."""
    p, h = images.shape[:2]
    px, py = _source(t, side, h)
    x0, y0 = px.astype(np.int64), py.astype(np.int64)
    fx, fy = px - x0, py - y0
    if images.ndim == 4:
        fx, fy = fx[..., None], fy[..., None]
    img = images.astype(np.float32)
    rows = np.arange(p)[:, None]
    return (img[rows, y0, x0] * (1 - fx) * (1 - fy) + img[rows, y0, x0 + 1] * fx * (1 - fy)
            + img[rows, y0 + 1, x0] * (1 - fx) * fy + img[rows, y0 + 1, x0 + 1] * fx * fy)


# ---- candidates ------------------------------------------------------------------------------------

def zoom_descriptors(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full view, centre window) 8x8 descriptors of (N, 32, 32) grey images, unit zero-mean vectors."""
    g = ndimage.gaussian_filter(grey.astype(np.float32), (0, ZOOM_BLUR, ZOOM_BLUR)).reshape(len(grey), -1)
    full = warp_matrix([Transform(1.0, 0.0, 0.0, 0.0)], ZOOM_SIDE, grey.shape[1])
    centre = warp_matrix([Transform(ZOOM_SCALE, 0.0, 0.0, 0.0)], ZOOM_SIDE, grey.shape[1])
    return _standardised((full @ g.T).T), _standardised((centre @ g.T).T)


def top_k(s: np.ndarray, start: int, split: np.ndarray | None, cross_only: bool, k: int, col0: int = 0,
          later: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of each row's k largest in s (rows start.., columns col0..), never an image with
    itself (nor, `later`, with an earlier row); s is overwritten."""
    rows = np.arange(len(s))
    if col0 <= start < col0 + s.shape[1]:   # the block's own square
        width = min(len(s), col0 + s.shape[1] - start)
        own = s[:, start - col0:start - col0 + width]
        cols = np.arange(width)[None, :]
        own[(cols <= rows[:, None]) if later else (cols == rows[:, None])] = -np.inf
    if cross_only and split is not None:
        s[split[start:start + len(s)][:, None] == split[None, col0:col0 + s.shape[1]]] = -np.inf
    # The k-th best of a subsample is at most the k-th best of the row: keep what clears it (about
    # k * SUBSAMPLE per row), then sort only those (a full argpartition of each row cost 4x more).
    sub = s[:, ::SUBSAMPLE]
    floor = np.partition(sub, -k, axis=1)[:, -k] if sub.shape[1] >= k else np.full(len(s), -np.inf, np.float32)
    r, c = np.nonzero(s >= floor[:, None])
    order = np.lexsort((-s[r, c], r))
    r, c = r[order], c[order]
    first = np.searchsorted(r, r, side="left")
    keep = (np.arange(len(r)) - first < k) & np.isfinite(s[r, c])
    return r[keep] + start, c[keep] + col0


def candidates(grey: np.ndarray, split: np.ndarray, cross_only: bool, k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k nearest by zoom descriptor (its full view against the others' centre windows, which
    finds the original of a crop and, from the original's side, its crop): unique pairs (ii < jj)."""
    n = len(grey)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    full, centre = zoom_descriptors(grey)
    k = min(k, n - 1)
    out_i, out_j = [], []
    for start in range(0, n, CANDIDATE_BLOCK):
        stop = min(n, start + CANDIDATE_BLOCK)
        # One way only: the block's full views against the others' centre windows finds a crop's original
        # from the crop's row; the reverse product (centre against full views) found no more (measured).
        r, c = top_k(full[start:stop] @ centre.T, start, split, cross_only, k)
        out_i.append(r)
        out_j.append(c)
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    a, b = np.minimum(i, j), np.maximum(i, j)
    uniq = np.unique(a * n + b)
    return uniq // n, uniq % n


# ---- verification ------------------------------------------------------------------------------------

def _band(grey: np.ndarray) -> np.ndarray:
    g = grey.astype(np.float32)
    lo, hi = BAND
    return ndimage.gaussian_filter(g, (0, lo, lo)) - ndimage.gaussian_filter(g, (0, hi, hi))


@dataclass
class Aligned:
    score: np.ndarray        # (P,) best normalized correlation of the band-passed grey thumbnails
    zoomed: np.ndarray       # (P,) bool: jj is the zoomed-in view (a sub-window of ii), else ii is
    transform: np.ndarray    # (P, 4) scale, degrees, dx, dy of the window in the other image


def align(grey: np.ndarray, ii: np.ndarray, jj: np.ndarray) -> Aligned:
    """The best alignment of each pair, both ways round (which of the two is the crop is not known)."""
    grid = transforms()
    tr = np.array([[t.scale, t.degrees, t.dx, t.dy] for t in grid], np.float32)
    band = _band(grey).reshape(len(grey), -1)
    warp = warp_matrix(grid, ALIGN_SIDE, grey.shape[1])
    whole = warp_matrix([Transform(1.0, 0.0, 0.0, 0.0)], ALIGN_SIDE, grey.shape[1])
    # Directed pairs: (window taken from `src`, compared with the whole of `dst`), grouped by `src` so that
    # each image's warps are computed once and multiplied with all its partners in one small product.
    src, dst = np.concatenate([ii, jj]), np.concatenate([jj, ii])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    target = _standardised((whole @ band.T).T)
    images, first = np.unique(src, return_index=True)
    bounds = np.append(first, len(src))
    best = np.full(len(src), -1.0, np.float32)
    arg = np.zeros(len(src), np.int64)
    with _one_blas_thread():
        for g in range(0, len(images), IMAGE_BATCH):
            group = images[g:g + IMAGE_BATCH]
            stacks = _standardised((warp @ band[group].T).T.reshape(len(group), len(grid), ALIGN_SIDE ** 2))
            for u in range(len(group)):
                lo, hi = bounds[g + u], bounds[g + u + 1]
                c = stacks[u] @ target[dst[lo:hi]].T          # (transforms, partners)
                best[lo:hi], arg[lo:hi] = c.max(axis=0), c.argmax(axis=0)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    best, arg = best[back], arg[back]
    t = tr[arg]
    close = np.nonzero((best >= REFINE_FROM) & (best < MIN_ALIGNED))[0]
    if len(close):
        best[close], t[close] = refine(band.reshape(grey.shape), src[back][close], dst[back][close], t[close])
    n = len(ii)
    zoomed = best[:n] >= best[n:]   # the window came from ii: jj is the zoomed-in one
    return Aligned(np.where(zoomed, best[:n], best[n:]), zoomed, np.where(zoomed[:, None], t[:n], t[n:]))


def refine(band: np.ndarray, src: np.ndarray, dst: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local search from transforms t (P, 4): each round moves each pair to the best of its transform and
    one step either way on each parameter; (correlation, transform) at the end. Per pair, so only for the
    few pairs that came close on the grid."""
    steps = np.array(REFINE_STEPS, np.float32)
    moves = np.concatenate([np.zeros((1, 4), np.float32), np.eye(4, dtype=np.float32), -np.eye(4, dtype=np.float32)])
    whole = np.tile(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), (len(src), 1))
    target = _standardised(sample(band[dst], whole, ALIGN_SIDE))
    a = band[src]
    t = t.astype(np.float32).copy()
    score = np.zeros(len(src), np.float32)
    for r in range(REFINE_ROUNDS):
        tries = t[:, None, :] + moves[None] * (steps / 2 ** (r // 2))[None, None]       # (P, 9, 4)
        tries[..., 0] = np.minimum(tries[..., 0], 1.0)   # a window no larger than the frame
        got = _standardised(np.stack([sample(a, tries[:, m], ALIGN_SIDE) for m in range(len(moves))], axis=1))
        c = np.einsum("pmd,pd->pm", got, target)
        pick = c.argmax(axis=1)
        t, score = tries[np.arange(len(t)), pick], c[np.arange(len(t)), pick]
    return score, t


def colour_after(colour: np.ndarray, ii: np.ndarray, jj: np.ndarray, al: Aligned) -> np.ndarray:
    """The lowest per-channel correlation of the colour thumbnails once aligned (the window of the
    larger view sampled by the best transform against the whole of the zoomed-in one)."""
    if len(ii) == 0:
        return np.zeros(0, np.float32)
    big = np.where(al.zoomed, ii, jj)
    small = np.where(al.zoomed, jj, ii)
    side = colour.shape[1]
    a = sample(colour[big], al.transform, side)
    b = sample(colour[small], np.tile(np.array([[1.0, 0, 0, 0]], np.float32), (len(ii), 1)), side)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    # A channel flat in both images has no pattern to disagree with (as pairs.colour_agreement).
    flat = (a.std(axis=1) < 4.0) & (b.std(axis=1) < 4.0)
    return np.where(flat, 1.0, num / np.maximum(den, 1e-6)).min(axis=1)


def kind_of(t: np.ndarray) -> str:
    """The report's `how` for a geometric match: a rotation if the best window was turned, else a crop."""
    return "rotation" if abs(float(t[1])) > 0 else "crop"

