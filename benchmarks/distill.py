"""Does a small CNN learn more from a MobileNetV2 teacher than from the labels alone, at its own latency?

    nice -n 5 .venv/bin/python benchmarks/distill.py [--split-seeds 0,1,2] [--seeds 0,1,2] [--views 128] [--epochs 128] ...

For each split seed S (--split-seed S: which images are train / val / test) one teacher is trained on
that split; then, for each training seed R (--seed R: initial weights, shuffles, the views drawn), on
the same split:
  teacher  MobileNetV2@128 (--teacher-size), frozen, the real ImageNet weights (the data loaded at that size), seed S
  alone    the small CNN at --image-size (the teacher's 128 px: at 64 the student cannot see what the
           teacher knows; docs/tuning.md, P-S), labels only, with the same augmentation as the student
           (128 views for 128 epochs: the defaults are S, the configuration that met the target)
  student  the same CNN, same options, with --teacher (its probabilities computed at the teacher's size; with
           --views K on each of the K augmented views the CNN trains on: consistent teaching)
Printed: each run's test accuracy and its validation accuracy (at the epoch early stopping kept); per
split seed, the mean and sd over training seeds and the paired student - alone difference of every
training seed; then over every (split, seed) pair. The training seeds' spread (sd within a split) is
what the target's "margin larger than the seeds' spread" is checked against, and the spread over
split seeds too. Then split S0, seed R0's three are exported (ONNX) and benchmarked at batch 1
(`tlserve bench --runtimes onnx`), and `tlserve compare` puts them side by side.

A run whose name (a hash of its options) is already in TLSERVE_HOME is read back, not trained again,
and marked "(kept)"; --fresh trains every run anew. Runs and models go to TLSERVE_HOME (default
benchmarks/.work).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base import storage  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

# shared/ beside the repository (a helper's worktree sits one folder deeper)
SHARED = next((p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared").resolve()
WEIGHTS = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CNN = "c16,p,c32,p,c64,p,c128,p,g,d128,dr0.3"  # four blocks at 128 px: about the compute of three at 64


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{SHARED / 'datasets' / 'banana-leaf'}")
    parser.add_argument("--split-seeds", default="0,1,2", help="one teacher and one split per seed")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, on every split")
    parser.add_argument("--image-size", type=int, default=128, help="the CNN's image size")
    parser.add_argument("--teacher-size", type=int, default=128, help="the teacher's image and input size")
    parser.add_argument("--cnn-layers", default=CNN)
    parser.add_argument("--epochs", type=int, default=128)
    parser.add_argument("--patience", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--schedule", default="cosine", help="--schedule of the CNN (alone and student)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--views", type=int, default=128, help="--augment-views for alone and student (0: none)")
    parser.add_argument("--policy", default="seed", help="--augment-policy of the views: seed, flip-crop, crop, mixup, crop-mixup")
    parser.add_argument("--fresh", action="store_true", help="train every run again, even if it is there")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    data = ["--data", args.data, "--json"]
    size = str(args.teacher_size)
    teacher = [*data, "--image-size", size, "--input-size", size, "-b", "mobilenetv2", "-s", "frozen",
               "--weights", str(WEIGHTS), "--epochs", "30", "--patience", "8", "--head", "gap-dense", "--dropout", "0.3"]
    cnn = [*data, "--image-size", str(args.image_size), "-b", "cnn", "--cnn-layers", args.cnn_layers,
           "--epochs", str(args.epochs), "--patience", str(args.patience)]
    if args.lr != 1e-3 or args.schedule != "constant":
        cnn += ["--lr", str(args.lr), "--schedule", args.schedule]
    if args.views:
        cnn += ["--augment-views", str(args.views), "--augment-policy", args.policy]
    distil = ["--distill-temperature", str(args.temperature), "--distill-weight", str(args.weight)]
    tlserve = Path(sys.executable).with_name("tlserve")
    splits = [int(s) for s in args.split_seeds.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"teacher: tlserve train {' '.join(teacher)} --seed S --split-seed S")
    print(f"alone:   tlserve train {' '.join(cnn)} --seed R --split-seed S")
    print(f"student: the alone command --teacher TEACHER_S {' '.join(distil)}")
    print(f"split seeds {splits} (the split: which images are train/val/test), training seeds {seeds} on each; "
          f"paired differences are student - alone on the same split and training seed")
    print(f"before: {load()}", flush=True)
    test: dict[str, dict[tuple[int, int], float]] = {"teacher": {}, "alone": {}, "student": {}}
    val: dict[str, dict[tuple[int, int], float]] = {"teacher": {}, "alone": {}, "student": {}}
    names: dict[tuple[str, int, int], str] = {}
    print("| split | seed | model | test accuracy | val accuracy | epochs | train s (wall; kept: the record's training time) |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    cpu0, t_all = _children_cpu(), time.perf_counter()
    for split in splits:
        tname = _name("teacher", teacher, split, split)
        names["teacher", split, split] = tname
        record, seconds = _train(tlserve, tname, [*teacher, "--seed", str(split), "--split-seed", str(split)], args.fresh)
        test["teacher"][split, split], val["teacher"][split, split] = record.test.accuracy, _val_accuracy(record)
        _row(split, split, "teacher", record, seconds)
        for seed in seeds:
            for label, options in (("alone", cnn), ("student", [*cnn, "--teacher", tname, *distil])):
                options = [*options, "--seed", str(seed), "--split-seed", str(split)]
                name = names[label, split, seed] = _name(label, options, split, seed)
                record, seconds = _train(tlserve, name, options, args.fresh)
                test[label][split, seed], val[label][split, seed] = record.test.accuracy, _val_accuracy(record)
                _row(split, seed, label, record, seconds)
    print(f"training: {time.perf_counter() - t_all:.0f} s wall, {_children_cpu() - cpu0:.0f} s CPU; {load()}")
    summary(test, val, splits, seeds)
    if not args.no_latency:
        latency(tlserve, [names["teacher", splits[0], splits[0]], names["alone", splits[0], seeds[0]],
                          names["student", splits[0], seeds[0]]])


def summary(test, val, splits: list[int], seeds: list[int]) -> None:
    teacher = list(test["teacher"].values())
    print(f"teacher: test accuracy mean {np.mean(teacher):.4f}, sd {np.std(teacher):.4f} over {len(teacher)} split seeds")
    within = []
    for split in splits:
        a = np.array([test["alone"][split, s] for s in seeds])
        b = np.array([test["student"][split, s] for s in seeds])
        va = np.array([val["alone"][split, s] for s in seeds])
        vb = np.array([val["student"][split, s] for s in seeds])
        within += [np.std(a), np.std(b)]
        print(f"split {split}: alone {a.mean():.4f} (sd {a.std():.4f}), student {b.mean():.4f} (sd {b.std():.4f}) over "
              f"training seeds {seeds}; student - alone per training seed {', '.join(f'{d:+.4f}' for d in b - a)}, "
              f"mean {np.mean(b - a):+.4f}; val accuracy alone {va.mean():.4f}, student {vb.mean():.4f}")
    pairs = [(sp, s) for sp in splits for s in seeds]
    a = np.array([test["alone"][p] for p in pairs])
    b = np.array([test["student"][p] for p in pairs])
    diff = b - a
    gain = float(diff.mean())
    seed_spread = float(np.sqrt(np.mean(np.square(within))))  # pooled sd over training seeds within a split
    split_means = [np.mean([test["student"][sp, s] - test["alone"][sp, s] for s in seeds]) for sp in splits]
    print(f"all {len(pairs)} runs: alone {a.mean():.4f} (sd {a.std():.4f}), student {b.mean():.4f} (sd {b.std():.4f}); "
          f"student - alone {gain:+.4f} (sd of the paired differences {diff.std():.4f}; "
          f"{int(np.sum(diff > 0))} of {len(diff)} pairs positive, {int(np.sum(diff < 0))} negative); "
          f"per split seed {', '.join(f'{m:+.4f}' for m in split_means)}")
    overall = max(float(a.std()), float(b.std()))
    print(f"spread: training seeds (sd within a split, pooled) {seed_spread:.4f}; every run (splits and seeds) {overall:.4f}; "
          f"the gain {gain:+.4f} {'beats' if gain > seed_spread else 'does NOT beat'} the training seeds' spread and "
          f"{'beats' if gain > overall else 'does NOT beat'} the spread over splits and seeds")


def _name(label: str, options: list[str], split: int, seed: int) -> str:
    digest = hashlib.sha256(json.dumps(options).encode()).hexdigest()[:8]
    return f"distill-{label}-{digest}-sp{split}-s{seed}"


def _train(tlserve: Path, name: str, options: list[str], fresh: bool) -> tuple[RunRecord, float | None]:
    path = storage.runs_dir() / name / RECORD
    if path.is_file() and not fresh:
        return RunRecord.load(path), None
    t0 = time.perf_counter()
    done = subprocess.run([str(tlserve), "train", *options, "--name", name, "--overwrite"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr}")
    return RunRecord.load(path), time.perf_counter() - t0


def _val_accuracy(record: RunRecord) -> float:
    """The validation accuracy of the weights the run kept: early stopping restores the lowest val_loss's."""
    rows = [r for r in record.history if r.get("val_loss") is not None]
    return float(min(rows, key=lambda r: r["val_loss"])["val_accuracy"]) if rows else float("nan")


def _row(split: int, seed: int, label: str, record: RunRecord, seconds: float | None) -> None:
    took = f"{record.total_time_sec:.0f} (kept)" if seconds is None else f"{seconds:.0f}"
    print(f"| {split} | {seed} | {label} | {record.test.accuracy:.4f} | {_val_accuracy(record):.4f} | {record.epochs} | "
          f"{took} |", flush=True)


def latency(tlserve: Path, names: list[str]) -> None:
    """Export (ONNX) and batch-1 onnxruntime latency of each, then the compare report."""
    print(f"latency (onnxruntime, batch 1), {load()}", flush=True)
    for name in names:
        subprocess.run([str(tlserve), "export", name, "--formats", "onnx", "--no-register", "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
        out = subprocess.run([str(tlserve), "bench", name, "--runtimes", "onnx", "--batch-sizes", "1",
                              "--duration", "5", "--threads", "1", "--json"], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout)["results"][0]
        print(f"{name}: p50 {row['p50_ms']:.3f} ms, p90 {row['p90_ms']:.3f} ms (1 onnxruntime thread)", flush=True)
    folder = storage.home() / "report-distill"
    subprocess.run([str(tlserve), "compare", *names, "--out", str(folder)], check=True)
    print(f"after: {load()}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
