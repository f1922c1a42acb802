"""What tlserve's int8 recipe gains over quantizing every node, per exported model.

    .venv/bin/python benchmarks/int8_ablation.py MODEL_DIR [MODEL_DIR ...] [--rounds 40] [--test-limit 10000]

For each model exported by `tlserve export` it quantizes the float32 ONNX file twice from the same
calibration images (the run's first training images, as export does): the plain recipe (every node,
8-bit weights) and tlserve's (pixel preprocessing and softmax kept float32, 7-bit weights). The three files
are timed in interleaved rounds, so a noisy VM slows all of them alike, at batch 1 and 32; then
scored on the run's test images (top-1 accuracy and agreement with float32). Switching sessions can
itself favour one file (on an AMD Zen 5 it slowed float32 more at batch 1: 0.69 ms here, 0.42 ms
under `tlserve bench`), so this compares the recipes; quote `tlserve bench` for absolute speed-ups.
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
from serving.base.manifest import Manifest  # noqa: E402
from serving.sessions import make_session  # noqa: E402
from training.record import records  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data.sources import load_dataset  # noqa: E402
from training.exported.export import quantize_int8  # noqa: E402

VARIANTS = ("fp32", "int8 plain", "int8 tlserve")


def interleaved_p50(sessions: dict[str, object], x: np.ndarray, rounds: int, calls: int = 25) -> dict[str, float]:
    """p50 ms per variant; each round times every variant in turn so VM noise hits all of them."""
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(20):
            s.run(None, {"image": x})
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                samples[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in samples.items()}


def predictions(session, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([session.run(None, {"image": x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def ablate(model_dir: Path, rounds: int, test_limit: int) -> dict[str, object]:
    manifest = Manifest.load(model_dir)
    record = records.RunRecord.load(Path(manifest.run_path) / records.RECORD)
    data = load_dataset(DataConfig(**record.config["data"]))
    int8 = manifest.artifacts.get("model.int8.onnx")
    calib = data.train.x[:int8.calibration_images if int8 and int8.calibration_images else 256]
    calib = calib.astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": model_dir / "model.onnx", "int8 plain": Path(tmp) / "plain.onnx",
                 "int8 tlserve": Path(tmp) / "tlserve.onnx"}
        quantize_int8(paths["fp32"], paths["int8 plain"], calib, keep_float=False, reduce_range=False)
        quantize_int8(paths["fp32"], paths["int8 tlserve"], calib)
        sessions = {k: make_session(p, device="cpu")[0] for k, p in paths.items()}
        test_x = data.test.x[:test_limit].astype(np.float32)
        test_y = data.test.y[:test_limit]
        preds = {k: predictions(s, test_x) for k, s in sessions.items()}
        return {
            "model": model_dir.name,
            "p50_b1": interleaved_p50(sessions, test_x[:1], rounds),
            "p50_b32": interleaved_p50(sessions, test_x[:32], max(4, rounds // 4)),
            "accuracy": {k: float(np.mean(p == test_y)) for k, p in preds.items()},
            "agreement": {k: float(np.mean(p == preds["fp32"])) for k, p in preds.items()},
            "test_images": int(len(test_y)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="folders written by tlserve export")
    parser.add_argument("--rounds", type=int, default=40, help="interleaved rounds of 25 calls at batch 1")
    parser.add_argument("--test-limit", type=int, default=10000, help="test images scored per variant")
    args = parser.parse_args()
    rows = [ablate(m, args.rounds, args.test_limit) for m in args.models]
    print(f"\nmachine: {cpu_model()}; onnxruntime, CPU provider, interleaved rounds")
    print("| model | variant | p50 b1 | vs fp32 b1 | p50 b32 | vs fp32 b32 | test images | test accuracy | "
          "top-1 agreement with fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for v in VARIANTS:
            b1, b32 = r["p50_b1"], r["p50_b32"]
            print(f"| {r['model']} | {v} | {b1[v]:.3f} ms | {b1['fp32'] / b1[v]:.2f}x | {b32[v]:.2f} ms | "
                  f"{b32['fp32'] / b32[v]:.2f}x | {r['test_images']} | {r['accuracy'][v]:.4f} | {r['agreement'][v]:.1%} |")


if __name__ == "__main__":
    main()
