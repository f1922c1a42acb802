"""Training speed on CIFAR-10 (the JPEG copy in shared/): images/s and seconds per epoch.

    .venv/bin/python benchmarks/train_speed.py [--limit 2000] [--limit-224 400]

Compares the seeds' frozen-MobileNetV2 loop (the frozen backbone re-run on every image every
epoch: --no-feature-cache) with tlserve's cached path (backbone once, head on the features) at
input 96 and 224, and times cnn / cnn-bn from scratch and fine-tune phase 2. Epoch 1 is left
out of the per-epoch figures (graph tracing); the one-time feature extraction is shown apart.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base.machine import cpu_model  # noqa: E402
from training.config import DataConfig, TrainConfig  # noqa: E402
from training.record.records import RunRecord  # noqa: E402
from training.fit.train import train as run_training  # noqa: E402


def train(name: str, data: str, limit: int, **options) -> RunRecord:
    """One run (no early stopping, so every configuration trains its epochs), its record."""
    cfg = TrainConfig(data=DataConfig(spec=data, limit=limit), name=name, overwrite=True, patience=None, **options)
    return run_training(cfg).record


def steady(record: RunRecord, phase: str | None = None) -> float:
    """Mean seconds of the epochs after the first of a phase (the first includes tracing)."""
    rows = [h for h in record.history if phase is None or h["phase"] == phase]
    later = rows[1:] or rows
    return sum(h["seconds"] for h in later) / len(later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg'}")
    parser.add_argument("--limit", type=int, default=2000, help="images per split (input 96 and the CNNs)")
    parser.add_argument("--limit-224", type=int, default=400, help="images per split at input 224")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    rows = []
    common = dict(data=args.data, weights="none", epochs=args.epochs, batch_size=64)
    for size, limit in ((96, args.limit), (224, args.limit_224)):
        frozen = dict(common, limit=limit, backbone="mobilenetv2", strategy="frozen", input_size=size)
        seed_style = train(f"speed-frozen{size}-seedstyle", **frozen, feature_cache=False)
        cached = train(f"speed-frozen{size}-cached", **frozen)
        n = seed_style.data.splits["train"]
        a, b = steady(seed_style), steady(cached)
        rows.append((f"frozen MobileNetV2 @{size}, seed-style loop", n, a, n / a, "", ""))
        rows.append((f"frozen MobileNetV2 @{size}, cached features", n, b, n / b,
                     f"{cached.training.extract_seconds:.1f} s once", f"{a / b:.0f}x"))
    for backbone in ("cnn", "cnn-bn"):
        r = train(f"speed-{backbone}", **common, limit=args.limit, backbone=backbone, cnn_layers="seed002")
        n = r.data.splits["train"]
        rows.append((f"{backbone} (seed002 layers) from scratch @32", n, steady(r), n / steady(r), "", ""))
    ft = train("speed-finetune96", **dict(common, epochs=1), limit=args.limit, backbone="mobilenetv2", strategy="finetune",
               input_size=96, finetune_epochs=args.epochs, unfreeze=30)
    n = ft.data.splits["train"]
    rows.append(("MobileNetV2 @96 fine-tune phase 2 (top 30)", n, steady(ft, "finetune"), n / steady(ft, "finetune"), "", ""))
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; data {args.data}")
    print("| configuration | train images | s / epoch (after the first) | images / s | feature extraction | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, n, seconds, ips, extract, ratio in rows:
        print(f"| {name} | {n:,} | {seconds:.2f} | {ips:,.0f} | {extract} | {ratio} |")


if __name__ == "__main__":
    main()
