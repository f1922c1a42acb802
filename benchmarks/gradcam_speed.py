"""Grad-CAM speed: seconds per image for a 224-input MobileNetV2 (target: under 1 s on a CPU).

    .venv/bin/python benchmarks/gradcam_speed.py [--calls 20] [--train-images 100]

Builds frozen MobileNetV2 with the shared ImageNet weights on banana-leaf images at 224x224 (no
resize inside the model), fits its small head (global pooling + dense) for a few epochs on
--train-images of them, saves and reloads it as `tlserve explain` does, then times
training.exported.explain.GradCam on one image per call, the way `tlserve explain` runs it: the first call
(tracing) is excluded, then the mean of --calls calls, each on a different image. Also prints the
per-image time at batch 16 (what an eval mistakes page would use) and the load average, since the
machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base import images  # noqa: E402
from serving.base.machine import cpu_model  # noqa: E402
from training import env  # noqa: E402
from training.model import build as models  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.exported.explain import GradCam  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
LEAVES = ROOT.parent / "shared" / "datasets" / "banana-leaf"


def leaf_images(per_class: int, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = sorted(d.name for d in LEAVES.iterdir() if d.is_dir())
    x, y = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (LEAVES / name).iterdir() if images.is_image_path(p))[:per_class]
        x.extend(images.load_array(p, (size, size)) for p in files)
        y.extend([label] * len(files))
    return np.stack(x).astype(np.float32), np.array(y), classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    K = env.keras()
    if not WEIGHTS.is_file() or not LEAVES.is_dir():
        sys.exit(f"needs {WEIGHTS} and {LEAVES}")
    x, y, classes = leaf_images(max(args.train_images, args.calls + 1) // 5 + 1, args.size)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]

    cfg = TrainConfig(backbone="mobilenetv2", strategy="frozen", weights=str(WEIGHTS), input_size=args.size)
    built = models.build(cfg, (args.size, args.size), len(classes))
    built.backbone.trainable = False
    built.model.compile(K.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    fit = built.model.fit(x[:args.train_images], y[:args.train_images], epochs=args.epochs, batch_size=32, verbose=0)
    path = Path(tempfile.mkdtemp()) / "model.keras"
    built.model.save(path)
    model = models.load_model(path)

    t0 = time.perf_counter()
    cam = GradCam(model)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cam(x[:1])
    first_s = time.perf_counter() - t0
    times = []
    for i in range(1, args.calls + 1):
        t0 = time.perf_counter()
        result = cam(x[i:i + 1])
        times.append(time.perf_counter() - t0)
    assert result.heatmaps.shape == (1, args.size, args.size)
    t0 = time.perf_counter()
    cam(x[:16])
    batch16 = (time.perf_counter() - t0) / 16

    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.1f} "
          "(other processes share them)")
    print(f"model: MobileNetV2 (ImageNet weights, frozen) at {args.size}x{args.size}, head fit {args.epochs} epochs on "
          f"{args.train_images} banana-leaf images (train accuracy {fit.history['accuracy'][-1]:.2f}); "
          f"layer {cam.layer}, map {cam.map_shape[0]}x{cam.map_shape[1]}")
    print(f"GradCam build {build_s:.2f} s, first call (traces) {first_s:.2f} s")
    print(f"seconds per image, batch 1: mean {np.mean(times):.3f} over {len(times)} calls "
          f"(median {np.median(times):.3f}, max {np.max(times):.3f})")
    print(f"seconds per image, batch 16: {batch16:.3f}")


if __name__ == "__main__":
    main()
