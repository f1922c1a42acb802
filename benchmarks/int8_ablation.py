"""Which int8 recipe and which onnxruntime kernels keep an exported model's accuracy, and at what speed.

    .venv/bin/python benchmarks/int8_ablation.py MODEL_DIR [MODEL_DIR ...] [--rounds 20] [--test-limit 10000]

For each model exported by `tlserve export` it quantizes the float32 ONNX file from the same stratified
calibration images export uses, and runs:

- fp32;
- int8 7-bit: 7-bit weights (onnxruntime's reduce_range, tlserve's recipe before issue 30);
- int8 8-bit fast: 8-bit weights, onnxruntime's default kernels (U8S8: on a CPU without VNNI their int16
  pair sums saturate);
- int8 8-bit exact: the same file with session.x64quantprecision=1 (U8U8 kernels where there is no VNNI;
  what tlserve's sessions do on such CPUs);
- int8 8-bit in float: the same file with its QDQ pairs run in float (session.disable_quant_qdq=1): the
  recipe's own loss, with no int8 kernel involved;
- int8 export: the file `tlserve export --int8` kept (its float convolutions), exact kernels, if any.

Files are timed in interleaved rounds, so a noisy machine slows all of them alike, at batch 1 and 32,
then scored on the run's test images (top-1 accuracy, worst class's recall drop, agreement with fp32).
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

from serving.base.machine import cpu_model, has_vnni  # noqa: E402
from serving.base.manifest import Manifest  # noqa: E402
from serving.sessions import session_options  # noqa: E402
from training.config import DataConfig  # noqa: E402
from training.data.sources import balanced_sample, load_dataset  # noqa: E402
from training.exported.export import ExportOptions, calibration_size  # noqa: E402
from training.exported.int8 import quantize_int8  # noqa: E402
from training.record import records  # noqa: E402


def session(path: Path, *, kernels: str = "fast", qdq_in_float: bool = False, threads: int | None = None):
    import onnxruntime as ort  # noqa: PLC0415

    opts = session_options(threads, int8_kernels=kernels)
    if qdq_in_float:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def interleaved_p50(sessions: dict[str, object], x: np.ndarray, rounds: int, calls: int) -> dict[str, float]:
    """p50 ms per variant; each round times every variant in turn so machine noise hits all of them."""
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {"image": x})
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                samples[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in samples.items()}


def interleaved_cpu_ms(sessions: dict[str, object], x: np.ndarray, rounds: int, calls: int) -> dict[str, float]:
    """Median CPU milliseconds per call of one-thread sessions (onnxruntime computes on the calling thread):
    what a call costs, nearly untouched by other processes sharing the cores, unlike wall time."""
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, {"image": x})
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(calls):
                t0 = time.thread_time()
                s.run(None, {"image": x})
                samples[k].append((time.thread_time() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in samples.items()}


def predictions(s, x: np.ndarray, batch: int = 128) -> np.ndarray:
    return np.concatenate([s.run(None, {"image": x[i:i + batch].astype(np.float32)})[0].argmax(1)
                           for i in range(0, len(x), batch)])


def worst_class_drop(y: np.ndarray, ref: np.ndarray, pred: np.ndarray) -> float:
    drops = [100 * (np.mean(ref[y == c] == c) - np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(max(drops))


def ablate(model_dir: Path, rounds: int, test_limit: int, timed: tuple[str, ...]) -> dict[str, object]:
    manifest = Manifest.load(model_dir)
    record = records.RunRecord.load(Path(manifest.run_path) / records.RECORD)
    data = load_dataset(DataConfig(**record.config["data"]))
    seed = int(record.config.get("seed", 0) or 0)
    calib = data.train.x[balanced_sample(data.train.y, calibration_size(ExportOptions(), len(manifest.class_names)),
                                         seed)].astype(np.float32)
    test_at = balanced_sample(data.test.y, test_limit, seed)
    test_x, test_y = data.test.x[test_at], data.test.y[test_at]
    with tempfile.TemporaryDirectory() as tmp:
        seven, eight = Path(tmp) / "seven.onnx", Path(tmp) / "eight.onnx"
        quantize_int8(model_dir / "model.onnx", seven, calib, reduce_range=True)
        quantize_int8(model_dir / "model.onnx", eight, calib)
        sessions = {"fp32": session(model_dir / "model.onnx"), "int8 7-bit": session(seven),
                    "int8 8-bit fast": session(eight), "int8 8-bit exact": session(eight, kernels="exact"),
                    "int8 8-bit in float": session(eight, qdq_in_float=True)}
        exported = manifest.artifacts.get("model.int8.onnx")
        if exported is not None and exported.sha256:
            sessions["int8 export"] = session(model_dir / "model.int8.onnx", kernels="exact")
        preds = {k: predictions(s, test_x) for k, s in sessions.items()}
        chosen = {k: s for k, s in sessions.items() if k in timed or k == "fp32"}
        paths = {"fp32": (model_dir / "model.onnx", "fast"), "int8 7-bit": (seven, "fast"),
                 "int8 8-bit fast": (eight, "fast"), "int8 8-bit exact": (eight, "exact"),
                 "int8 export": (model_dir / "model.int8.onnx", "exact")}
        single = {k: session(p, kernels=kern, threads=1) for k, (p, kern) in paths.items() if k in chosen}
        return {
            "model": model_dir.name,
            "float_convs": exported.kept_float["convolutions"] if exported and exported.kept_float else None,
            "p50_b1": interleaved_p50(chosen, test_x[:1].astype(np.float32), rounds, 10),
            "p50_b32": interleaved_p50(chosen, test_x[:32].astype(np.float32), max(3, rounds // 4), 2),
            "cpu_b1": interleaved_cpu_ms(single, test_x[:1].astype(np.float32), rounds, 10),
            "cpu_b32": interleaved_cpu_ms(single, test_x[:32].astype(np.float32), max(3, rounds // 4), 1),
            "accuracy": {k: float(np.mean(p == test_y)) for k, p in preds.items()},
            "worst": {k: worst_class_drop(test_y, preds["fp32"], p) for k, p in preds.items()},
            "agreement": {k: float(np.mean(p == preds["fp32"])) for k, p in preds.items()},
            "test_images": int(len(test_y)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="folders written by tlserve export")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of 10 calls at batch 1")
    parser.add_argument("--test-limit", type=int, default=10000, help="test images scored per variant (stratified)")
    parser.add_argument("--timed", default="int8 7-bit,int8 8-bit fast,int8 8-bit exact,int8 export",
                        help="variants timed beside fp32 (in float is an emulation: never timed)")
    args = parser.parse_args()
    timed = tuple(t.strip() for t in args.timed.split(","))
    rows = [ablate(m, args.rounds, args.test_limit, timed) for m in args.models]
    print(f"\nmachine: {cpu_model()} (VNNI: {has_vnni()}), {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; onnxruntime CPU provider, interleaved rounds")
    print("wall: p50 ms at the default threads; cpu: median CPU ms per call of a one-thread session (load-proof)")
    print("| model | variant | wall b1 | vs fp32 | wall b32 | vs fp32 | cpu b1 | vs fp32 | cpu b32 | vs fp32 | "
          "test images | test accuracy | worst class drop (pt) | top-1 agreement with fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        for v in r["accuracy"]:
            speed = " | ".join(f"{r[k][v]:.2f} ms | {r[k]['fp32'] / r[k][v]:.2f}x" if v in r[k] else "— | —"
                               for k in ("p50_b1", "p50_b32", "cpu_b1", "cpu_b32"))
            name = f"{v} ({r['float_convs']} float convs)" if v == "int8 export" else v
            print(f"| {r['model']} | {name} | {speed} | {r['test_images']} | {r['accuracy'][v]:.4f} | "
                  f"{r['worst'][v]:.1f} | {r['agreement'][v]:.1%} |")


if __name__ == "__main__":
    main()
