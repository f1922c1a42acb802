"""From-scratch accuracy on CIFAR-10 (the JPEG copy in shared/): recipe, epochs, wall time, test accuracy.

    .venv/bin/python benchmarks/cifar_recipes.py [--recipes cnn-bn,resnet9s,resnet9m,resnet9m-page,resnet9m-page-tta] [--epochs N] [--limit N]

Trains each recipe (recipes/cifar-<recipe>.yaml: its options, epochs and target accuracy) on the
full 45,000 / 5,000 / 10,000 split (or --limit images per split for a quick check) and prints the test accuracy beside the target the issue sets and the wall time
on this machine. A finished run of the same name is reported, not retrained (--retrain to redo).
Runs land in benchmarks/.work/runs (TLSERVE_HOME).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

import cli  # noqa: E402
import yaml  # noqa: E402
from serving.base.machine import cpu_flags, package_versions  # noqa: E402
from training import env  # noqa: E402
from training.fit.accel import BF16_FLAGS  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

RECIPE_DIR = ROOT / "recipes"
# bfloat16 where the CPU computes it (AVX512-BF16, AMX); emulated elsewhere and many times slower than float32.
_PRECISION = "mixed_bfloat16" if (cpu_flags() or set()) & BF16_FLAGS else "float32"
# recipe (recipes/cifar-<recipe>.yaml, which holds its options, epochs and target accuracy): what the target is
RECIPES: dict[str, str] = {
    "seed002-as-written": "seed 002's expected 83-85%",
    "cnn-bn": "seed 002's 83-85%",
    "resnet9s": "90%, the fast CIFAR-10 records' class",
    "resnet9m": "90%, the fast CIFAR-10 records' class",
    "resnet9m-page": "90%, the fast CIFAR-10 records' class",
    "resnet9m-page-tta": "90%, the fast CIFAR-10 records' class",
    "resnet9-page-tta": "90%, the fast CIFAR-10 records' class",
}


def recipe_file(recipe: str) -> tuple[Path, dict]:
    path = RECIPE_DIR / f"cifar-{recipe}.yaml"
    return path, yaml.safe_load(path.read_text()) or {}


def recipe_args(recipe: str) -> list[str]:
    """`--config recipes/cifar-<recipe>.yaml`, and this CPU's precision where the recipe sets one."""
    path, options = recipe_file(recipe)
    return ["--config", str(path), *(["--precision", _PRECISION] if "precision" in options else [])]


def run(name: str, args: list[str], retrain: bool) -> RunRecord:
    record_path = Path(os.environ["TLSERVE_HOME"]) / "runs" / name / RECORD
    if record_path.is_file() and not retrain:
        return RunRecord.load(record_path)
    try:
        cli.main(["train", *args, "--name", name, "--overwrite"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"training {name} failed ({exc.code})") from None
    return RunRecord.load(record_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg'}")
    parser.add_argument("--recipes", default="cnn-bn,resnet9s,resnet9m,resnet9m-page,resnet9m-page-tta", help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--epochs", type=int, help="override every recipe's epochs")
    parser.add_argument("--limit", type=int, help="images per split (a quick check, not the benchmark)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a finished run exists")
    args = parser.parse_args()
    chosen = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe {unknown[0]}; choose from {', '.join(RECIPES)}")
    rows = []
    for recipe in chosen:
        extra = (["--epochs", str(args.epochs)] if args.epochs else []) + (["--limit", str(args.limit)] if args.limit else [])
        suffix = (f"-e{args.epochs}" if args.epochs else "") + (f"-l{args.limit}" if args.limit else "")
        record = run(f"cifar-{recipe}{suffix}", [*recipe_args(recipe), "--data", args.data, *extra], args.retrain)
        acc, target = record.test.accuracy, recipe_file(recipe)[1]["target"]
        rows.append((recipe, record.config["cnn_layers"], record.epochs, record.data.splits["train"],
                     record.total_time_sec, record.avg_epoch_time_sec, acc, target, RECIPES[recipe],
                     record.environment.precision))
    machine = env.machine_facts()
    print(f"\nCIFAR-10 from scratch on {machine.get('cpu')} ({machine.get('cpu_count')} cores), "
          f"TensorFlow {package_versions().get('tensorflow')}")
    print("| recipe | layers | precision | epochs | train images | wall time | s/epoch | test accuracy | target | met |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---|")
    for recipe, layers, epochs, n, total, per_epoch, acc, target, meaning, precision in rows:
        print(f"| {recipe} | {layers} | {precision} | {epochs} | {n:,} | {total / 60:.1f} min | {per_epoch:.1f} | "
              f"{acc:.4f} | {meaning} | {'yes' if acc >= target else 'NO'} |")


if __name__ == "__main__":
    main()
