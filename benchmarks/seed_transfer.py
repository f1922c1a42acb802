"""The seeds' transfer-learning experiments, for real: ImageNet MobileNetV2 weights, full data.

    .venv/bin/python benchmarks/seed_transfer.py [--only s000,s000-notebook,s001,s003] [--seeds 3] [--limit N]

Runs each experiment with `training.fit.train.train(TrainConfig(...))` on the shared data and the
shared MobileNetV2 weights (../shared/weights), and prints one Markdown table: the experiment,
the notebook's own figure (accuracy and seconds, copied from ../shared/seeds), tlserve's measured
test accuracy, its training seconds (feature extraction included), seconds per epoch, and the
machine. No VGG16 or ResNet50V2 weights exist on this machine, so none of their rows is run.

  s000           seed 000 at 224 on CIFAR-10 (JPEG copy): frozen 3 epochs, then the top 30 layers
                 3 epochs at 1e-5; no augmentation, so both phases train on cached activations
  s000-notebook  the same as the notebook ran it: --augment, so nothing can be cached
  s001           seed 001 on the banana-leaf set at 128: CNN, MobileNetV2 frozen / unfrozen /
                 partial (from block_15_expand); --seeds runs each, mean and spread
  s003           seed 003 on CIFAR-10: MobileNetV2 with the Dense256-Dropout head at the notebook's
                 32x32 input and at 96 (the resize inside the model), against the baseline CNN

--limit N caps every split (a quick look; the figures are then not the full experiment's).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from serving.base.machine import cpu_model  # noqa: E402
from training.config import DataConfig, TrainConfig  # noqa: E402
from training.record.records import RunRecord  # noqa: E402
from training.fit.train import train  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = str(SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5")
CIFAR = f"folder:{SHARED / 'datasets' / 'cifar10-jpg'}"
LEAVES = f"folder:{SHARED / 'datasets' / 'banana-leaf'}"


@dataclass
class Row:
    experiment: str
    seed_figure: str                    # the notebook's accuracy and seconds
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    per_epoch: list[float] = field(default_factory=list)
    peak_gb: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)


def _run(cfg: TrainConfig) -> tuple[RunRecord, float]:
    t0 = time.perf_counter()
    run = train(replace(cfg, overwrite=True, patience=None), log=lambda line: print(f"  {line}", flush=True),
                progress=False)
    return run.record, time.perf_counter() - t0


def _phase(record: RunRecord, phase: str) -> tuple[float, float, int]:
    """(seconds of the phase's epochs plus its cache extraction, steady seconds per epoch, epochs)."""
    rows = [h for h in record.history if h["phase"] == phase]
    cache = record.training.caches.get(phase, {})
    total = sum(h["seconds"] for h in rows) + cache.get("seconds", 0.0)
    later = rows[1:] or rows  # the first epoch traces the graph
    return total, sum(h["seconds"] for h in later) / len(later), len(rows)


def seed000(limit: int | None, augment: bool) -> list[Row]:
    label = "as the notebook (--augment, no cache)" if augment else "cached (no augmentation)"
    cfg = TrainConfig(data=DataConfig(spec=CIFAR, limit=limit), backbone="mobilenetv2", strategy="finetune",
                      weights=WEIGHTS, input_size=224, dropout=0.2, augment=augment, epochs=3, finetune_epochs=3,
                      unfreeze=30, lr=1e-3, finetune_lr=1e-5, batch_size=64,
                      name=f"s000-{'notebook' if augment else 'cached'}")
    record, wall = _run(cfg)
    frozen, ft = Row(f"s000 MobileNetV2@224 frozen 3 ep, {label}", "0.8233 in 1,287 s"), \
        Row(f"s000 then top-30 fine-tune 3 ep, {label}", "0.8521 in 1,529 s")
    for row, phase, acc in ((frozen, "head", record.test.phase1_accuracy),
                            (ft, "finetune", record.test.accuracy)):
        seconds, per_epoch, _ = _phase(record, phase)
        row.accuracies.append(acc)
        row.seconds.append(seconds)
        row.per_epoch.append(per_epoch)
        row.peak_gb.append(record.training.peak_rss_bytes / 1e9)
        row.wall.append(wall)
    return [frozen, ft]


def seed001(limit: int | None, seeds: int) -> list[Row]:
    data = DataConfig(spec=LEAVES, image_size=128, limit=limit)
    mobilenet = dict(backbone="mobilenetv2", weights=WEIGHTS, input_size=128, head="gap-dense", head_units=128,
                     dropout=0.5)
    experiments = [
        ("s001 CNN (seed001 layers), 10 ep", "0.9019 in 2,280 s",
         TrainConfig(data=data, backbone="cnn", cnn_layers="seed001", epochs=10)),
        ("s001 MobileNetV2 frozen, 10 ep", "0.9335 in 263 s",
         TrainConfig(data=data, strategy="frozen", epochs=10, **mobilenet)),
        ("s001 MobileNetV2 unfrozen (full), 10 ep at 1e-4", "0.9381 in 363 s",
         TrainConfig(data=data, strategy="full", lr=1e-4, epochs=10, **mobilenet)),
        ("s001 MobileNetV2 partial (from block_15_expand), 5 ep at 1e-4", "0.8209 in 142 s",
         TrainConfig(data=data, strategy="finetune", epochs=0, unfreeze_from="block_15_expand", finetune_epochs=5,
                     finetune_lr=1e-4, **mobilenet)),
    ]
    rows = []
    for label, figure, cfg in experiments:
        row = Row(label, figure)
        for seed in range(seeds):
            name = f"s001-{label.split()[1].lower()}-{cfg.strategy}-seed{seed}"
            record, wall = _run(replace(cfg, seed=seed, data=replace(cfg.data, seed=seed), name=name))
            seconds = record.total_time_sec
            later = record.history[1:] or record.history
            row.accuracies.append(record.test.accuracy)
            row.seconds.append(seconds)
            row.per_epoch.append(sum(h["seconds"] for h in later) / len(later))
            row.peak_gb.append(record.training.peak_rss_bytes / 1e9)
            row.wall.append(wall)
        rows.append(row)
    return rows


def seed003(limit: int | None) -> list[Row]:
    data = DataConfig(spec=CIFAR, limit=limit)
    head = dict(backbone="mobilenetv2", strategy="frozen", weights=WEIGHTS, head="gap-dense", head_units=256,
                dropout=0.5, lr=1e-3, epochs=20)
    experiments = [
        ("s003 MobileNetV2 frozen, Dense256 head, 32x32 input, 20 ep", "~85-90% claimed",
         TrainConfig(data=data, input_size=32, name="s003-mobilenet32", **head)),
        ("s003 the same, resized to 96 inside the model", "—",
         TrainConfig(data=data, input_size=96, name="s003-mobilenet96", **head)),
        ("s003 baseline CNN, 20 ep", "60-70% claimed",
         TrainConfig(data=data, backbone="cnn", cnn_layers="seed003", epochs=20, name="s003-cnn")),
    ]
    rows = []
    for label, figure, cfg in experiments:
        record, wall = _run(cfg)
        later = record.history[1:] or record.history
        rows.append(Row(label, figure, [record.test.accuracy], [record.total_time_sec],
                        [sum(h["seconds"] for h in later) / len(later)], [record.training.peak_rss_bytes / 1e9],
                        [wall]))
    return rows


def _fmt(values: list[float], digits: int, spread: bool = True) -> str:
    if len(values) == 1 or not spread:
        return f"{statistics.mean(values):.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="s000,s000-notebook,s001,s003")
    parser.add_argument("--seeds", type=int, default=3, help="runs per seed 001 experiment (mean ± spread)")
    parser.add_argument("--limit", type=int, default=None, help="images per split (quick look, not the full run)")
    args = parser.parse_args()
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    rows: list[Row] = []
    for name in wanted:
        print(f"== {name}", flush=True)
        if name == "s000":
            rows += seed000(args.limit, augment=False)
        elif name == "s000-notebook":
            rows += seed000(args.limit, augment=True)
        elif name == "s001":
            rows += seed001(args.limit, args.seeds)
        elif name == "s003":
            rows += seed003(args.limit)
        else:
            raise SystemExit(f"unknown experiment {name}")
    machine = f"{cpu_model()}, {os.cpu_count()} cores, no GPU"
    print(f"\nmachine: {machine}; weights: {WEIGHTS}" + (f"; --limit {args.limit}" if args.limit else "; full data"))
    print("| experiment | the notebook | tlserve test accuracy | training s (extraction incl.) | s / epoch "
          "| runs | peak memory GB | wall s per run |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.experiment} | {r.seed_figure} | {_fmt(r.accuracies, 4)} | {_fmt(r.seconds, 1)} | "
              f"{_fmt(r.per_epoch, 2)} | {len(r.accuracies)} | {max(r.peak_gb):.2f} | {_fmt(r.wall, 0, False)} |")


if __name__ == "__main__":
    main()
