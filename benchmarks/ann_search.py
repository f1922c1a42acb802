"""Exact all-pairs cosine against faiss indexes on the CIFAR-10 JPEG copy's embeddings: time and recall.

    PYTHONPATH=. .venv/bin/python benchmarks/ann_search.py [--data folder:../shared/datasets/cifar10-jpg]
        [--cache emb.npy] [--sizes 10000,20000,40000,60000] [--cosine 0.9]

Embeds the set as `tlserve data check --mode full` does (MobileNetV2 at 64 px with the shared ImageNet
weights, centred, top 256 PCA axes, unit length; --cache keeps them for the next run), then for each
size (a random subset) times
  exact   the check's blocked all-pairs cosine (pairs >= --cosine), the reference;
  ivf     faiss IndexIVFFlat (~4 sqrt(n) lists) at a few nprobe, ANN_NEIGHBOURS neighbours per image;
  hnsw    faiss IndexHNSWFlat (M 32, efSearch 64);
and prints seconds (index build + search) and recall (pairs found / exact pairs). The exact search
grows as n^2, the index more slowly: the last lines fit both (power laws over the measured sizes)
and say where the default index (IVF-Flat, nprobe IVF_NPROBE) starts to pay.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base.machine import cpu_model  # noqa: E402
from training.audit import ann, embeddings, fingerprints, pairs  # noqa: E402
from training.config import DataConfig, DataSpec  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg"
VARIANTS = [("ivf", {"nprobe": 4}), ("ivf", {"nprobe": 8}), ("ivf", {"nprobe": 16}), ("ivf", {"nprobe": 32}),
            ("hnsw", {"ef_search": 64})]


def embed(data: str) -> np.ndarray:
    from training.data.sources import list_folder

    cfg = DataConfig(spec=data)
    listing = list_folder(cfg, DataSpec.parse(data).local)
    imgs, _ = fingerprints.fingerprint_files(listing, "full", print, False)
    weights = str(WEIGHTS) if WEIGHTS.is_file() else "imagenet"
    return embeddings.project(embeddings.embeddings(imgs.small, weights, print, False))


def exact_pairs(x: np.ndarray, cosine: float) -> set[tuple[int, int]]:
    """All pairs i < j with cosine >= threshold, block by block as pairs.search does."""
    out = set()
    for start in range(0, len(x), pairs.SEARCH_BLOCK):
        stop = min(len(x), start + pairs.SEARCH_BLOCK)
        cos = x[start:stop] @ x[start:].T
        cos[:, :stop - start] = np.where(np.arange(start, stop)[None, :] > np.arange(start, stop)[:, None],
                                         cos[:, :stop - start], -1)
        rr, cc = np.nonzero(cos >= cosine)
        out.update(zip((rr + start).tolist(), (cc + start).tolist()))
    return out


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    parser.add_argument("--cache", type=Path, default=None, help="embeddings .npy: read if it exists, else written")
    parser.add_argument("--sizes", default="10000,20000,40000,60000")
    parser.add_argument("--cosine", type=float, default=pairs.DEFAULT_COSINE)
    args = parser.parse_args()
    if args.cache and args.cache.is_file():
        emb = np.load(args.cache)
    else:
        emb, secs = timed(lambda: embed(args.data))
        print(f"embedded {len(emb):,} images in {secs:.1f} s")
        if args.cache:
            np.save(args.cache, emb)
    import faiss

    print(f"machine: {cpu_model()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; "
          f"cosine >= {args.cosine}; {ann.ANN_NEIGHBOURS} neighbours per image")
    rng = np.random.default_rng(0)
    exact_t, ann_t = {}, {}
    for n in [int(s) for s in args.sizes.split(",") if int(s) <= len(emb)]:
        x = np.ascontiguousarray(emb[np.sort(rng.choice(len(emb), n, replace=False))])
        truth, t_exact = timed(lambda: exact_pairs(x, args.cosine))
        exact_t[n] = t_exact
        print(f"\nn {n:,}: exact {t_exact:.1f} s, {len(truth):,} pairs")
        for kind, extra in VARIANTS:
            found, t = timed(lambda: ann.ann_candidates(x, args.cosine, kind=kind, **extra))
            got = {(int(a), int(b)) for a, b in zip(*found.nonzero())}
            recall = len(got & truth) / max(1, len(truth))
            label = f"{kind} " + " ".join(f"{k} {v}" for k, v in extra.items())
            print(f"  {label:<20} {t:6.1f} s  recall {recall:.4f} ({len(got & truth):,} of {len(truth):,})")
            if kind == ann.ANN_INDEX and extra.get("nprobe") == ann.IVF_NPROBE:
                ann_t[n] = t
    if len(exact_t) >= 2 and ann_t:
        ns = np.array(sorted(exact_t))
        a_exact = np.polyfit(np.log(ns), np.log([exact_t[n] for n in ns]), 1)
        a_ann = np.polyfit(np.log(ns), np.log([ann_t[n] for n in ns]), 1)
        print(f"\nfit: exact ~ n^{a_exact[0]:.2f}, ivf nprobe {ann.IVF_NPROBE} ~ n^{a_ann[0]:.2f}")
        for n in (60_000, 100_000, 200_000, 500_000, 1_000_000):
            te, ta = np.exp(np.polyval(a_exact, np.log(n))), np.exp(np.polyval(a_ann, np.log(n)))
            print(f"  n {n:>9,}: exact {te:8.1f} s, ivf {ta:7.1f} s" + (f" (extrapolated past {ns[-1]:,})" if n > ns[-1] else ""))


if __name__ == "__main__":
    main()
