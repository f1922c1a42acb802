"""Does `--class-weight balanced` raise macro F1 on an imbalanced set? Trains the same recipe with and
without it over several seeds and scores each run's test confusion matrix with training.record.metrics.summary.

    .venv/bin/python benchmarks/class_weight_effect.py [--data folder:../shared/datasets/banana-leaf]
        [--seeds 0,1,2] [--epochs 10] [-- extra tlserve train options]

Each seed draws its own split (the data seed is the run seed), so a seed's two runs see the same images.
Runs go to TLSERVE_HOME (default benchmarks/.work)/runs as cw-<mode>-s<seed>.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base import storage  # noqa: E402
from training.record import metrics  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{ROOT.parent / 'shared' / 'datasets' / 'banana-leaf'}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("extra", nargs="*", help="more `tlserve train` options (after --)")
    args = parser.parse_args()
    recipe = ["--data", args.data, "--image-size", "128", "-b", "mobilenetv2", "-s", "frozen",
              "--weights", str(WEIGHTS), "--epochs", str(args.epochs), *args.extra]
    tlserve = Path(sys.executable).with_name("tlserve")
    scores: dict[str, list[float]] = {"none": [], "balanced": []}
    print(f"recipe: tlserve train {' '.join(recipe)} --seed S --class-weight MODE")
    print("| seed | class weight | test accuracy | macro F1 | weighted F1 | smallest class recall |")
    print("|---:|---|---:|---:|---:|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in scores:
            name = f"cw-{mode}-s{seed}"
            subprocess.run([str(tlserve), "train", *recipe, "--seed", str(seed), "--class-weight", mode,
                            "--name", name, "--overwrite", "--json"], check=True, stdout=subprocess.DEVNULL)
            record = RunRecord.load(storage.runs_dir() / name / RECORD)
            names = record.data.class_names
            summary = metrics.summary(np.array(record.test.confusion_matrix), names)
            counts = record.data.train_class_counts
            small = min(counts, key=counts.get)
            scores[mode].append(summary["macro_f1"])
            print(f"| {seed} | {mode} | {summary['accuracy']:.4f} | {summary['macro_f1']:.4f} | "
                  f"{summary['weighted_f1']:.4f} | {small} {summary['per_class'][small]['recall']:.3f} |", flush=True)
    for mode, values in scores.items():
        print(f"{mode}: macro F1 mean {np.mean(values):.4f} (sd {np.std(values):.4f}) over {len(values)} seeds")
    print(f"balanced - none: {np.mean(scores['balanced']) - np.mean(scores['none']):+.4f} macro F1")


if __name__ == "__main__":
    main()
