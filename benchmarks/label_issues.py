"""Planted label flips and near-copies: what `tlserve data check` finds of them, and its time.

    PYTHONPATH=. .venv/bin/python benchmarks/label_issues.py [--sets banana,cifar10k] [--copies 25]
        [--part labels,copies,whole] [--mode full|fast] [--no-crops] [--draws 3] [--fold-c C]

labels   flips a known share of labels (5% of banana-leaf, 2% of a 10,000-image CIFAR-10 subset), once
         uniformly (to any other class) and once to the most similar class (the class whose mean
         embedding is nearest), runs the check's own label search (training.audit.labels: out-of-fold
         LogisticRegression + cleanlab) and prints recall among the top-k suspects (k = twice the flips),
         and precision and recall of the default list, per draw of flips and their mean; targets recall@2k >= 0.9, precision >= 0.5.
copies   plants near-copies of each kind (saturation x1.3, a colour shift, a 5-15% crop resized back, a
         3-8 degree rotation, a mirror, and each of those re-encoded as JPEG quality 60) from training
         images into the test split, runs the check's pair search (training.audit.pairs) with its default
         thresholds, and prints recall per kind and the pairs found on the clean set (no copies planted).
whole    the whole check, labels included, on all 60,000 CIFAR-10 images (folder:shared/datasets/cifar10-jpg):
         wall and CPU time per step, with the load average, since the machine may be shared.

Every figure comes from the run that prints it; the seeds are fixed (--seed).
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base import images  # noqa: E402
from serving.base.machine import cpu_model  # noqa: E402
from training.audit import embeddings, fingerprints, geometry, labels, pairs  # noqa: E402

# The shared folder beside the checkout (/work/shared for /work/main); TLSERVE_SHARED for a worktree elsewhere.
SHARED = Path(os.environ.get("TLSERVE_SHARED", ROOT.parent / "shared"))
WEIGHTS = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
SETS = {"banana": SHARED / "datasets" / "banana-leaf", "cifar10k": SHARED / "datasets" / "cifar10-jpg"}
FLIP_SHARE = {"banana": 0.05, "cifar10k": 0.02}
CIFAR_SUBSET = 10_000
JPEG_QUALITY = 60


# ---- planted near-copies -----------------------------------------------------------------------

def saturation(im: Image.Image, rng) -> Image.Image:
    return ImageEnhance.Color(im).enhance(1.3)


def colour(im: Image.Image, rng) -> Image.Image:
    """Brightness +-15% and a white-balance shift (red up, blue down by 5-10%)."""
    im = ImageEnhance.Brightness(im).enhance(float(rng.choice([0.85, 1.15])))
    k = float(rng.uniform(0.9, 0.95))
    r, g, b = im.split()
    return Image.merge("RGB", (r.point(lambda v: min(255, int(v / k))), g, b.point(lambda v: int(v * k))))


def crop(im: Image.Image, rng) -> Image.Image:
    """5-15% off each side's length at a random place, resized back to the original size."""
    w, h = im.size
    f = rng.uniform(0.05, 0.15)
    cw, ch = int(round(w * (1 - f))), int(round(h * (1 - f)))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)


def rotation(im: Image.Image, rng) -> Image.Image:
    """3-8 degrees either way, cut to the largest centred rectangle without corners, resized back."""
    w, h = im.size
    angle = float(rng.uniform(3, 8)) * (1 if rng.random() < 0.5 else -1)
    t = np.radians(abs(angle))
    s = 1 / (np.cos(t) + np.sin(t))
    cw, ch = int(w * s), int(h * s)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return im.rotate(angle, Image.Resampling.BICUBIC).crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)


def flip(im: Image.Image, rng) -> Image.Image:
    return ImageOps.mirror(im)


def reencoded(make: Callable) -> Callable:
    def copy(im: Image.Image, rng) -> Image.Image:
        buf = io.BytesIO()
        make(im, rng).save(buf, format="JPEG", quality=JPEG_QUALITY)
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    return copy


BASE_KINDS = {"saturation": saturation, "colour": colour, "crop": crop, "rotation": rotation, "flip": flip}
KINDS = {**BASE_KINDS, **{f"{k}+jpeg": reencoded(f) for k, f in BASE_KINDS.items()}}


# ---- data --------------------------------------------------------------------------------------

def load(name: str, seed: int) -> tuple[list[Image.Image], np.ndarray, list[str]]:
    """(RGB images, labels, class names): all of banana-leaf, or a CIFAR_SUBSET sample of CIFAR-10."""
    root = SETS[name]
    names = sorted(d.name for d in (root / "train" if name == "cifar10k" else root).iterdir() if d.is_dir())
    files = [(f, k) for k, c in enumerate(names)
             for split in (("train", "test") if name == "cifar10k" else ("",))
             for f in sorted((root / split / c).iterdir()) if images.is_image_path(f)]
    if name == "cifar10k":
        rng = np.random.default_rng(seed)
        files = [files[i] for i in sorted(rng.choice(len(files), CIFAR_SUBSET, replace=False))]
    return [images.open_image(f) for f, _ in files], np.asarray([k for _, k in files], np.int64), names


def fingerprint_all(ims: list[Image.Image], split: list[int], mode: str, side: int | None) -> fingerprints.Images:
    fps = [fingerprints.fingerprint(im, mode, side) for im in ims]
    return fingerprints.columns(split, [f"#{i}" for i in range(len(ims))], [0] * len(ims), fps, [{}] * len(ims))


def subset(imgs: fingerprints.Images, rows: np.ndarray) -> fingerprints.Images:
    return fingerprints.Images(
        split=imgs.split[rows], names=[imgs.names[i] for i in rows], labels=imgs.labels[rows],
        exact=[imgs.exact[i] for i in rows], phash=imgs.phash[rows], phash_mirror=imgs.phash_mirror[rows],
        small=None, label_small=None, grey=imgs.grey[rows], colour=imgs.colour[rows], facts=[{}] * len(rows))


# ---- near-copies ---------------------------------------------------------------------------------

def copies(name: str, ims: list[Image.Image], per_kind: int, mode: str, seed: int, crops: bool) -> None:
    rng = np.random.default_rng(seed)
    n0 = len(ims)
    originals = rng.choice(n0, per_kind * len(KINDS), replace=False)
    made, kinds = [], []
    for k, (kind, make) in enumerate(KINDS.items()):
        for i in originals[k * per_kind:(k + 1) * per_kind]:
            made.append(make(ims[int(i)], rng))
            kinds.append(kind)
    kinds = np.asarray(kinds)
    t = time.perf_counter()
    imgs = fingerprint_all(ims + made, [0] * n0 + [2] * len(made), mode, None)
    emb = None
    if mode == "full":
        features = embeddings.embeddings(imgs.small, str(WEIGHTS))
        emb = embeddings.project(features)
        clean_emb = embeddings.project(features[:n0])
    found, _ = pairs.search(imgs, emb, pairs.Thresholds(), cross_only=False, geometric=crops)
    seconds = time.perf_counter() - t
    family = {int(n0 + j): int(originals[j]) for j in range(len(made))}  # copy row -> its original

    def root(r: int) -> int:
        return family.get(r, r)
    hits = {(p.a, p.b) for p in found}
    print(f"\n{name}: {len(made)} planted copies ({per_kind} per kind) of {n0} images, {mode} mode, default "
          f"thresholds {pairs.Thresholds()}, crops and rotations {'on' if crops else 'off'}; fingerprints, embeddings "
          f"and search {seconds:.1f} s")
    for kind in KINDS:
        rows = np.nonzero(kinds == kind)[0]
        got = sum((int(originals[j]), int(n0 + j)) in hits for j in rows)
        how = sorted({p.how for p in found if p.b >= n0 and kinds[p.b - n0] == kind and root(p.a) == root(p.b)})
        print(f"  {kind:16s} recall {got / len(rows):.2f} ({got}/{len(rows)})  found by {', '.join(how) or '-'}")
    if crops:
        aligned(imgs, n0, originals, kinds)
    false = [p for p in found if root(p.a) != root(p.b) and (p.a >= n0 or p.b >= n0)]
    print(f"  pairs between a copy and an image it was not made from: {len(false)}")
    clean, _ = pairs.search(subset(imgs, np.arange(n0)), clean_emb if mode == "full" else None, pairs.Thresholds(),
                            cross_only=False, geometric=crops)
    by_how = {h: sum(p.how == h for p in clean) for h in sorted({p.how for p in clean})}
    print(f"  pairs on the clean set (no copies planted): {len(clean)} {by_how}")


def aligned(imgs: fingerprints.Images, n0: int, originals: np.ndarray, kinds: np.ndarray) -> None:
    """What set geometry.MIN_ALIGNED: the aligned correlation of each planted crop and rotation with its
    original, against that of the clean images' own candidates (their top geometry.NEIGHBOURS)."""
    rows = np.nonzero(np.isin(kinds, ["crop", "crop+jpeg", "rotation", "rotation+jpeg"]))[0]
    planted = geometry.align(imgs.grey, originals[rows], n0 + rows).score
    ii, jj = geometry.candidates(imgs.grey[:n0], imgs.split[:n0], cross_only=False)
    clean = geometry.align(imgs.grey[:n0], ii, jj).score
    q = np.quantile
    print(f"  aligned correlation (geometry.MIN_ALIGNED {geometry.MIN_ALIGNED}): planted crops and rotations "
          f"min {planted.min():.3f}, 2nd {np.sort(planted)[1]:.3f}, 5% {q(planted, 0.05):.3f}, median "
          f"{q(planted, 0.5):.3f}; clean candidates ({len(ii):,}) 99% {q(clean, 0.99):.3f}, 99.9% {q(clean, 0.999):.3f}, "
          f"max {clean.max():.3f}, at or above the threshold {int((clean >= geometry.MIN_ALIGNED).sum())}")
    # The trade-off the threshold picks from (the aligned score alone, before the colour rule).
    for th in (0.86, 0.88, 0.90, 0.92, 0.94):
        kept = " ".join(f"{k} {int((planted[kinds[rows] == k] >= th).sum())}/{int((kinds[rows] == k).sum())}"
                        for k in ("crop", "crop+jpeg", "rotation", "rotation+jpeg"))
        print(f"    at {th:.2f}: planted {kept}; clean candidates {int((clean >= th).sum())}")


# ---- label flips ---------------------------------------------------------------------------------

def flips(name: str, ims: list[Image.Image], y: np.ndarray, class_names: list[str], seed: int, draws: int,
          fold_c: float) -> None:
    side = embeddings.label_side(len(ims))
    t, c = time.perf_counter(), time.process_time()
    x = np.stack([np.asarray(im.resize((side, side), Image.Resampling.BILINEAR), np.uint8) for im in ims])
    features = embeddings.embeddings(x, str(WEIGHTS), layers=embeddings.LABEL_LAYERS)  # what the check's classifier reads
    embed_s, embed_cpu = time.perf_counter() - t, time.process_time() - c
    k = len(class_names)
    last = embeddings.last_layer(features)  # "similar" by the last layer, as before the classifier read five
    centres = np.stack([last[y == c].mean(axis=0) for c in range(k)])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    sim = centres @ centres.T
    np.fill_diagonal(sim, -np.inf)
    similar = sim.argmax(axis=1)
    print(f"\n{name}: {len(y)} images, {k} classes, features at {side} px ({embed_s:.1f} s wall, {embed_cpu:.1f} s CPU); "
          f"most similar class: " + ", ".join(f"{class_names[a]}->{class_names[b]}" for a, b in enumerate(similar)))
    for how in ("uniform", "similar"):
        rows = [_flip_draw(features, y, similar, name, how, seed + draw, fold_c) for draw in range(draws)]
        mean, sd = np.mean(rows, axis=0), np.std(rows, axis=0)
        print(f"  {how:8s} mean over {draws} draws (sd): recall in top 2k {mean[0]:.2f} ({sd[0]:.2f}); default list "
              f"precision {mean[1]:.2f} ({sd[1]:.2f}), recall {mean[2]:.2f} ({sd[2]:.2f})")


def _flip_draw(features: np.ndarray, y: np.ndarray, similar: np.ndarray, name: str, how: str, seed: int,
               fold_c: float) -> tuple:
    """One draw of planted flips: (recall in the top 2k, precision and recall of the default list)."""
    k = len(similar)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(y), int(round(FLIP_SHARE[name] * len(y))), replace=False)
    noisy = y.copy()
    noisy[flipped] = similar[y[flipped]] if how == "similar" else (y[flipped] + rng.integers(1, k, len(flipped))) % k
    t, c = time.perf_counter(), time.process_time()
    oof = labels.out_of_fold(features, noisy, k, seed=seed, c=fold_c)
    issues, scores = labels.ranked_issues(noisy, oof)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    planted = set(flipped.tolist())
    top = set(np.argsort(scores, kind="stable")[:2 * len(flipped)].tolist())
    listed = set(issues.tolist())
    recall_top, precision, recall = (len(planted & top) / len(planted), len(planted & listed) / max(1, len(listed)),
                                     len(planted & listed) / len(planted))
    print(f"  {how:8s} seed {seed}: {len(flipped)} flipped: recall in top {2 * len(flipped)} {recall_top:.2f}; "
          f"default list {len(listed)}: precision {precision:.2f}, recall {recall:.2f}; out-of-fold accuracy on the "
          f"true labels {(oof.probs.argmax(axis=1) == y).mean():.3f}; {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    return recall_top, precision, recall


# ---- the whole check on CIFAR-10 -----------------------------------------------------------------

def whole(crops: bool) -> None:
    from training.audit.datacheck import check  # noqa: PLC0415
    from training.config import DataConfig  # noqa: PLC0415

    load_before = os.getloadavg()
    t = time.perf_counter()
    report = check(DataConfig(spec=f"folder:{SETS['cifar10k']}"), mode="full", weights=str(WEIGHTS), labels=True,
                   crops=crops)
    wall = time.perf_counter() - t
    self_, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    d = report.facts
    issues = d.label_issues
    print(f"\nwhole check, CIFAR-10 (JPEG copy), {sum(d.splits.values()):,} images, crops and rotations "
          f"{'on' if crops else 'off'}: {wall:.1f} s wall; CPU "
          f"{self_.ru_utime + kids.ru_utime:.1f} s user + {self_.ru_stime + kids.ru_stime:.1f} s system; steps "
          f"{d.seconds}; peak RSS {self_.ru_maxrss / 1024:,.0f} MB; load average before "
          f"{' '.join(f'{v:.1f}' for v in load_before)}, after {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print(f"  pairs {d.pairs_found:,}; label issues: {issues.status}: {issues.why}; "
          f"out-of-fold accuracy {issues.out_of_fold_accuracy}; {issues.classifier}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="banana,cifar10k")
    parser.add_argument("--part", default="labels,copies,whole")
    parser.add_argument("--copies", type=int, default=25, help="planted copies per kind (banana: at most 57)")
    parser.add_argument("--mode", default="full", choices=("fast", "full"), help="copies: hashes only, or + embeddings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=3, help="labels: draws of planted flips (seeds seed, seed+1, ...)")
    parser.add_argument("--fold-c", type=float, default=labels.C, help="labels: the fold model's C (the check's own by default)")
    parser.add_argument("--crops", action=argparse.BooleanOptionalAction, default=True,
                        help="copies and whole: with the crop and rotation search (`tlserve data check --crops`)")
    args = parser.parse_args()
    parts = args.part.split(",")
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    for name in args.sets.split(","):
        if not {"labels", "copies"} & set(parts):
            break
        ims, y, class_names = load(name, args.seed)
        if "labels" in parts:
            flips(name, ims, y, class_names, args.seed, args.draws, args.fold_c)
        if "copies" in parts:
            copies(name, ims, args.copies, args.mode, args.seed, args.crops)
    if "whole" in parts:
        whole(args.crops)


if __name__ == "__main__":
    main()
