"""Our CIFAR-10 test-in-train pairs against Barz & Denzler's published list, on the training side.

    PYTHONPATH=. .venv/bin/python benchmarks/data_check.py --out DIR     # the full check of the JPEG copy
    PYTHONPATH=. .venv/bin/python benchmarks/cifair_agreement.py --report DIR/report.json [--sheet DIR/sheet.png]

The list (benchmarks/data/cifair_duplicates_cifar10.csv, see benchmarks/data/README.md) names images
by their index in the original CIFAR-10 batches. The JPEG copy in ../shared/ names a training image
`train/<class>/NNNN.jpg`, the NNNN-th training image of that class, so with the original training
label order (benchmarks/data/cifar10_train_labels.txt) every training file maps to its index. The test
label order was not to be found, so a test file cannot be mapped back to its TestID: the comparison is
on the TRAINING image of each pair (a list row is found when some pair of ours links a test image of
the same class to that training image). Both sides count distinct training images:

  recall     list training images (by judgment: 0/1 same scene, 2 very similar) that a pair of ours has;
  precision  our training images that the list has (and with which judgment), the rest listed apart.

"train" here is the original training set: our check's train and val splits (val is carved from it).
--sheet draws a few of our test images that the list does not pair with any of their training partners,
to judge whether they are real copies.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def train_index() -> dict[str, int]:
    """`train/<class>/NNNN.jpg` -> its index in data_batch_1..5."""
    digits = "".join((DATA / "cifar10_train_labels.txt").read_text().split())
    labels = np.frombuffer(digits.encode(), np.uint8) - ord("0")
    assert len(labels) == 50_000 and np.all(np.bincount(labels) == 5_000), "cifar10_train_labels.txt is damaged"
    out = {}
    for c, name in enumerate(CLASSES):
        for k, idx in enumerate(np.nonzero(labels == c)[0]):
            out[f"train/{name}/{k:04d}.jpg"] = int(idx)
    return out


def published() -> list[tuple[int, int, int]]:
    with open(DATA / "cifair_duplicates_cifar10.csv", newline="") as f:
        return [(int(r["TestID"]), int(r["TrainID"]), int(r["Judgment"])) for r in csv.DictReader(f)]


def sheet(pairs: list[tuple[str, str, dict]], path: Path, root: Path, scale: int = 3) -> None:
    """Test | train thumbnails, one pair a row, with the pair's cosine and pixel correlation."""
    side, label_w = 32 * scale, 330
    img = Image.new("RGB", (2 * side + 12 + label_w, len(pairs) * (side + 6) + 6), "white")
    draw = ImageDraw.Draw(img)
    for row, (test, train, p) in enumerate(pairs):
        y = 6 + row * (side + 6)
        for col, name in enumerate((test, train)):
            img.paste(Image.open(root / name).convert("RGB").resize((side, side), Image.Resampling.NEAREST), (4 + col * (side + 4), y))
        draw.text((2 * side + 16, y + 4), f"{test}\n{train}\n{p['kind']} by {p['how']}, cos {p['cosine']}, "
                                          f"pixels {p['pixel_correlation']}", fill="black")
    img.save(path)


def our_pairs(report: dict, index: dict[str, int]) -> dict[int, list[tuple[str, str, dict]]]:
    """train index -> (test file, train file, pair) of every same-label test/train(-or-val) pair the check found."""
    ours: dict[int, list[tuple[str, str, dict]]] = defaultdict(list)
    for p in report["pairs"]:
        sides = {p["a"]["split"]: p["a"], p["b"]["split"]: p["b"]}
        test = sides.get("test")
        train = next((s for s in (p["a"], p["b"]) if s["split"] in ("train", "val")), None)
        if test is None or train is None or test["label"] != train["label"]:
            continue
        ours[index[train["file"]]].append((test["file"], train["file"], p))
    return ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, required=True, help="report.json of a full check of the JPEG copy")
    parser.add_argument("--data-root", type=Path, default=CIFAR)
    parser.add_argument("--sheet", type=Path, default=None, help="PNG of our pairs the list does not have")
    parser.add_argument("--sheet-rows", type=int, default=16)
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    index = train_index()
    rows = published()
    judgment_of: dict[int, int] = {}
    for _, train, j in rows:
        judgment_of[train] = min(j, judgment_of.get(train, j))  # a training image listed twice: its closest judgment
    ours = our_pairs(report, index)
    test_images = {t for pairs in ours.values() for t, _, _ in pairs}
    print(f"report: {args.report} ({report.get('search', {}).get('used', 'exact')} search, thresholds {report['thresholds']})")
    print(f"published list: {len(rows)} rows, {len({t for t, _, _ in rows})} test images, "
          f"{len(judgment_of)} training images; ours: {len(test_images)} test images paired with "
          f"{len(ours)} training images (train or val split)")
    print("\nrecall (distinct training images of the list that a pair of ours has):")
    for name, group in (("judgment 0/1 (same scene)", {0, 1}), ("judgment 2 (very similar)", {2}), ("all", {0, 1, 2})):
        listed = {t for t, j in judgment_of.items() if j in group}
        hit = listed & set(ours)
        print(f"  {name:<28} {len(hit):>4} of {len(listed):>4} = {len(hit) / max(1, len(listed)):.3f}")
    in_list = [t for t in ours if t in judgment_of]
    same = [t for t in in_list if judgment_of[t] in (0, 1)]
    similar = [t for t in in_list if judgment_of[t] == 2]
    missing = sorted(t for t in ours if t not in judgment_of)
    n = max(1, len(ours))
    print("\nprecision (our distinct training images that the list has):")
    print(f"  listed as 0/1 (same scene)   {len(same):>4} of {len(ours):>4} = {len(same) / n:.3f}")
    print(f"  listed as 2 (very similar)   {len(similar):>4} of {len(ours):>4} = {len(similar) / n:.3f}")
    print(f"  not in the list              {len(missing):>4} of {len(ours):>4} = {len(missing) / n:.3f}")
    print(f"  (chance level, a check of the train mapping: a random training image is in the list with "
          f"probability {len(judgment_of) / len(index):.4f})")
    # A test image paired with several copies inside the training set (CIFAR has train-train copies too):
    # the list names one of them, so per test image: listed when any of its training partners is.
    partners = defaultdict(set)
    for t, pairs in ours.items():
        for test, _, _ in pairs:
            partners[test].add(t)
    listed_tests = [x for x, ts in partners.items() if any(t in judgment_of for t in ts)]
    same_tests = [x for x, ts in partners.items() if any(judgment_of.get(t) in (0, 1) for t in ts)]
    print(f"per test image: {len(listed_tests)} of {len(partners)} of ours have a training partner in the list "
          f"({len(same_tests)} as 0/1) = {len(listed_tests) / max(1, len(partners)):.3f}")
    how = defaultdict(int)
    for t in missing:
        how[ours[t][0][2]["how"]] += 1
    print(f"  ...found by: {dict(how)}")
    unlisted = sorted(x for x in partners if x not in listed_tests)
    print(f"test images of ours with no training partner in the list: {len(unlisted)}")
    if args.sheet and unlisted:
        rng = np.random.default_rng(0)
        pick = sorted(rng.choice(unlisted, min(args.sheet_rows, len(unlisted)), replace=False).tolist())
        rows_ = [next(pair for t in sorted(partners[x]) for pair in ours[t] if pair[0] == x) for x in pick]
        sheet(rows_, args.sheet, args.data_root)
        print(f"sheet of {len(pick)} of them with a training partner: {args.sheet}")


if __name__ == "__main__":
    sys.exit(main())
