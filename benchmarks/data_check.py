"""`tlserve data check` on the full CIFAR-10 JPEG copy: time, memory, and test images with a copy in train.

    PYTHONPATH=. .venv/bin/python benchmarks/data_check.py [--data folder:../shared/datasets/cifar10-jpg]
        [--out DIR] [--phash-distance 4] [--cosine 0.9] [--search auto|exact|ann] [--dump pairs.npz]

Runs the full check (decode, hashes, MobileNetV2 embeddings with the shared ImageNet weights, the
exact all-pairs search), writes report.json and index.html, and prints seconds, peak RSS, and how
many test images have a near duplicate in train, beside Barz & Denzler's 3.3% ("Do We Train on Test
Data? Purging CIFAR of Near-Duplicates", J. Imaging 2020). Targets: <= 180 s, <= 4 GB on 2 cores.
--dump keeps every pair's Hamming distance and cosine (run with loose thresholds to study them).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base.machine import cpu_model  # noqa: E402
from training.audit import ann, datacheck, pairs  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.audit.page import default_out, write  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg"
PUBLISHED = 3.3  # % of CIFAR-10 test images with a near duplicate in train (Barz & Denzler 2020)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--phash-distance", type=int, default=pairs.DEFAULT_PHASH)
    parser.add_argument("--cosine", type=float, default=pairs.DEFAULT_COSINE)
    parser.add_argument("--mode", default="full", choices=("fast", "full"))
    parser.add_argument("--search", default="auto", choices=ann.SEARCHES,
                        help="embedding pair search (benchmarks/ann_search.py compares the two alone)")
    parser.add_argument("--dump", type=Path, default=None, help="save every pair (rows, hamming, cosine, names) as .npz")
    args = parser.parse_args()
    weights = str(WEIGHTS) if WEIGHTS.is_file() else "imagenet"
    start = time.perf_counter()
    report = datacheck.check(DataConfig(spec=args.data), mode=args.mode,
                             thresholds=pairs.Thresholds(args.phash_distance, args.cosine), weights=weights,
                             search=args.search)
    check_seconds = time.perf_counter() - start
    out = write(report, args.out or default_out())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    d = report.data
    leak = d["leaks"].get("test-in-train", {"images": 0, "of": d["splits"]["test"], "percent": 0.0})
    print(f"machine: {cpu_model()}")
    print(f"data: {d['source']}: {d['splits']}")
    print(f"thresholds: phash <= {args.phash_distance} bits, cosine >= {args.cosine}; embeddings: {d['embeddings']}")
    print(f"search: {d['search']['used']}" + (f" ({d['search']['index']})" if d['search']['index'] else "") + f": {d['search']['why']}")
    print(f"check: {check_seconds:.1f} s (steps {d['seconds']}); page written in {time.perf_counter() - start - check_seconds:.1f} s")
    print(f"peak RSS: {peak_mb:,.0f} MB")
    print(f"pairs: {d['pairs_found']:,} ({d['duplicates']})")
    print(f"test images with a near duplicate in train: {leak['images']:,} of {leak['of']:,} = {leak['percent']:.2f}% "
          f"(Barz & Denzler 2020: {PUBLISHED}%)")
    # Barz & Denzler searched the whole 50,000-image training set; our val split is carved from it.
    held = {p["b"]["file"] for p in d["pairs"] if p["b"]["split"] == "test" and p["a"]["split"] in ("train", "val")}
    print(f"test images with a near duplicate in train or val (the original training set): {len(held):,} "
          f"= {100 * len(held) / max(1, d['splits']['test']):.2f}%")
    print(f"page: {out / 'index.html'}")
    if args.dump:
        imgs = report.images
        np.savez(args.dump, a=np.array([p.a for p in report.pairs]), b=np.array([p.b for p in report.pairs]),
                 hamming=np.array([p.hamming for p in report.pairs]),
                 cosine=np.array([np.nan if p.cosine is None else p.cosine for p in report.pairs]),
                 names=np.array(imgs.names), split=imgs.split, labels=imgs.labels)
        print(f"pairs dumped to {args.dump}")


if __name__ == "__main__":
    main()
