"""What flip test-time augmentation would add to finished runs, measured on their own test split.

    .venv/bin/python benchmarks/tta_gain.py RUN [RUN...]   (runs under TLSERVE_HOME, default benchmarks/.work)

For each run: its model as trained, and the same weights in the model `--tta flip` builds (each
image and its mirror, logits averaged), both scored on the run's test images. A run trained with
`--tta flip` already has it; it is scored as is.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

from training.data import sources as datasets  # noqa: E402
from training.model import build as models  # noqa: E402
from training.record import records  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data.sources import pipeline  # noqa: E402


def accuracy(model, split) -> tuple[float, float]:
    started = time.perf_counter()
    probs = model.predict(pipeline(split, 256), verbose=0)
    return float(np.mean(probs.argmax(axis=1) == split.y)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args()
    print("| run | test images | accuracy | with flip TTA | gain (points) | predict s: plain / TTA |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.runs:
        run = records.load_run(name)
        cfg = TrainConfig.from_dict(run.record.config)
        if cfg.from_run:
            raise SystemExit(f"{name}: a --from-run model is not rebuilt from its config; score its source instead")
        test = datasets.load_dataset(cfg.data).test
        trained = models.load_model(run.model_path)
        if cfg.tta == "flip":
            acc, seconds = accuracy(trained, test)
            print(f"| {name} | {len(test.y):,} | (trained with --tta flip) | {acc:.4f} | | {seconds:.1f} |")
            continue
        twin = models.build(dataclasses.replace(cfg, tta="flip"),
                            tuple(run.record.model.input_shape[:2]), len(run.record.data.class_names)).model
        twin.set_weights(trained.get_weights())  # the TTA layers hold no weights: same order, same values
        plain, t_plain = accuracy(trained, test)
        flipped, t_flip = accuracy(twin, test)
        print(f"| {name} | {len(test.y):,} | {plain:.4f} | {flipped:.4f} | {100 * (flipped - plain):+.2f} | "
              f"{t_plain:.1f} / {t_flip:.1f} |")


if __name__ == "__main__":
    main()
