"""Feature extraction against inference: is the one-time backbone pass as fast as serving it?

    .venv/bin/python benchmarks/extract_speed.py [--size 224] [--images 2048]

Builds frozen MobileNetV2 (the shared ImageNet weights, 32x32 pixels resized to --size inside the
model, as seed 000 runs it) and times, on the same random pixels:
  - tlserve's extraction (training/fit/feature_cache.py: the pooled-feature extractor, TensorFlow,
    batches of feature_cache.EXTRACT_BATCH), in images/s;
  - the same extractor converted to ONNX and run by onnxruntime at batch 32 (the serving engine).
Prints both and their ratio (target: extraction at >= 70% of onnxruntime's batch-32 images/s).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base.machine import cpu_model  # noqa: E402
from training import env  # noqa: E402
from training.fit import feature_cache  # noqa: E402
from training.model import build as models  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.data.sources import Split, pipeline  # noqa: E402

WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    T = env.tf()
    weights = str(WEIGHTS) if WEIGHTS.is_file() else "none"
    cfg = TrainConfig(backbone="mobilenetv2", strategy="frozen", weights=weights, input_size=args.size)
    built = models.build(cfg, (32, 32), 10)
    built.backbone.trainable = False
    plan = feature_cache.head_plan(built.model, built.backbone, built.features)
    x = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    split = Split(x, np.zeros(args.images, np.int64))

    feature_cache.extract(plan.extractor, {"warm": Split(x[:128], split.y[:128])}, pipeline, Path(tempfile.mkdtemp()))
    tf_rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        feature_cache.extract(plan.extractor, {"train": split}, pipeline, Path(tempfile.mkdtemp()))
        tf_rates.append(args.images / (time.perf_counter() - t0))

    import tf2onnx  # noqa: PLC0415

    from serving.sessions import make_session  # noqa: PLC0415

    path = Path(tempfile.mkdtemp()) / "extractor.onnx"
    with env._quiet_stderr_fd():
        tf2onnx.convert.from_keras(plan.extractor, input_signature=(T.TensorSpec((None, 32, 32, 3), T.float32,
                                                                                 name="image"),),
                                   opset=17, output_path=str(path))
    session, _ = make_session(path, device="cpu")
    name = session.get_inputs()[0].name
    xf = x.astype(np.float32)
    for i in range(0, 128, 32):
        session.run(None, {name: xf[i:i + 32]})
    ort_rates = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(0, args.images, 32):
            session.run(None, {name: xf[i:i + 32]})
        ort_rates.append(args.images / (time.perf_counter() - t0))
    tf_best, ort_best = max(tf_rates), max(ort_rates)
    print(f"machine: {cpu_model()}; MobileNetV2 at {args.size}, weights {Path(weights).name}, "
          f"{args.images} images, best of {args.rounds}")
    print(f"tlserve extraction (TensorFlow, batch {feature_cache.EXTRACT_BATCH}): {tf_best:.1f} images/s "
          f"(rounds: {', '.join(f'{r:.1f}' for r in tf_rates)})")
    print(f"onnxruntime batch 32:                      {ort_best:.1f} images/s "
          f"(rounds: {', '.join(f'{r:.1f}' for r in ort_rates)})")
    print(f"extraction / onnxruntime: {tf_best / ort_best:.0%} (target >= 70%)")


if __name__ == "__main__":
    main()
