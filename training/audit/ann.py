"""Nearest-neighbour candidates for the embedding pair search past ANN_ABOVE images.

Past ANN_ABOVE images the all-pairs cosine grows quadratically, so the embedding search moves to a
faiss index (the optional extra `pip install 'tlserve[ann]'`): each image's ANN_NEIGHBOURS nearest
neighbours, kept when their exact cosine clears the threshold. The 64-bit hash search stays exact:
it is 4x cheaper per pair than the 256-dim cosine. --search exact|ann|auto forces one; without faiss
installed the check falls back to exact search and says how to install it.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

from training import progress

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


def warn(log):
    """The check's log, or stderr: a note the user must see even without a log."""
    return log or (lambda line: print(line, file=sys.stderr, flush=True))


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
        warn(log)(f"note: {n:,} images: {why}")
        return {**out, "why": why}
    return {**out, "used": "ann", "index": f"faiss IVF-Flat (~4 sqrt(n) lists, nprobe {IVF_NPROBE}), "
                                          f"{ANN_NEIGHBOURS} neighbours per image",
            "why": f"{n:,} images" + (f" > {ANN_ABOVE:,}" if requested == "auto" else ", --search ann")}

