"""How much does one more JPEG pass cost frozen ImageNet features on CIFAR-10 upsampled to 224?

    .venv/bin/python benchmarks/jpeg_effect.py [--train 2000] [--test 1000] [--size 224] [--quality 75]

The CIFAR-10 here is a JPEG copy (mean absolute difference from the original pixels about
5.8/255, shared/datasets/README.md), and seed 000's notebook ran on the original pixels. We
cannot compare with the originals, so this measures the effect of one *more* JPEG pass of the
same kind: frozen MobileNetV2 (the shared ImageNet weights) pooled features of N training and
test images as they are, and after re-encoding each 32x32 image with Pillow at --quality, then a
softmax head trained on each set of features the same way. A large drop says the copy's own JPEG
pass likely costs the transfer figures a similar amount.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import env  # noqa: E402
from training.fit import feature_cache  # noqa: E402
from training.model import build as models  # noqa: E402
from training.config import DataConfig, TrainConfig  # noqa: E402
from training.data.sources import Split, load_dataset, pipeline  # noqa: E402

SHARED = ROOT.parent / "shared"
WEIGHTS = str(SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5")


def rejpeg(x: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def head_accuracy(train: np.ndarray, ytr: np.ndarray, test: np.ndarray, yte: np.ndarray, seed: int = 0) -> float:
    K = env.keras()
    K.utils.set_random_seed(seed)
    head = K.Sequential([K.Input(train.shape[1:]), K.layers.Dense(10, activation="softmax")])
    head.compile(optimizer=K.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    head.fit(train, ytr, epochs=30, batch_size=64, verbose=0)
    return float(head.evaluate(test, yte, verbose=0)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()
    data = load_dataset(DataConfig(spec=f"folder:{SHARED / 'datasets' / 'cifar10-jpg'}", limit=args.train))
    xtr, ytr = data.train.x, data.train.y
    xte, yte = data.test.x[: args.test], data.test.y[: args.test]
    cfg = TrainConfig(backbone="mobilenetv2", strategy="frozen", weights=WEIGHTS, input_size=args.size)
    built = models.build(cfg, data.image_size, 10)
    built.backbone.trainable = False
    plan = feature_cache.head_plan(built.model, built.backbone, built.features)
    results = {}
    for label, (a, b) in {"as in the copy": (xtr, xte),
                          f"one more JPEG pass (quality {args.quality})": (rejpeg(xtr, args.quality),
                                                                           rejpeg(xte, args.quality))}.items():
        cache = feature_cache.extract(plan.extractor, {"train": Split(a, ytr), "test": Split(b, yte)}, pipeline,
                                      Path(tempfile.mkdtemp()))
        results[label] = (head_accuracy(cache.splits["train"][0], ytr, cache.splits["test"][0], yte),
                          float(np.mean(np.abs(a.astype(np.int16) - xtr.astype(np.int16)))))
    print(f"MobileNetV2 at {args.size}, frozen pooled features, softmax head 30 epochs; "
          f"{len(ytr)} train / {len(yte)} test images of the CIFAR-10 JPEG copy")
    for label, (acc, diff) in results.items():
        print(f"  {label:40s} test accuracy {acc:.4f}   mean |pixel change| {diff:.2f}/255")


if __name__ == "__main__":
    main()
