"""The README's in-process performance table, reproduced on CIFAR-10 (the JPEG copy in shared/).

    .venv/bin/python benchmarks/latency.py [--data folder:../shared/datasets/cifar10-jpg] [--limit 512]

For cnn, mobilenetv2 (input 96), resnet50v2 (input 96) and vgg16 (input 32) it trains a short run
(weights do not change latency, so --weights none), exports it with a static int8 variant calibrated
on real training images, and times Keras model.predict, the same model under tf.function, onnxruntime
fp32 and int8 at batch 1 and 32. Beside the batch-32 throughput it prints the model's FLOPs and this
machine's measured float32 matrix-multiply ceiling.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TLSERVE_HOME", str(ROOT / "benchmarks" / ".work"))

import cli  # noqa: E402
from serving.base.machine import cpu_model  # noqa: E402
from training import env  # noqa: E402
from training.config import DataConfig, TrainConfig  # noqa: E402
from training.exported.loader import bench_model  # noqa: E402
from training.fit.train import train  # noqa: E402

MODELS = [  # (name, backbone, input size)
    ("cnn", "cnn", None),
    ("mobilenetv2-96", "mobilenetv2", 96),
    ("resnet50v2-96", "resnet50v2", 96),
    ("vgg16-32", "vgg16", 32),
]


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of a float32 n x n matrix product on all cores, with numpy's BLAS and with onnxruntime.

    The ceiling is the better of the two. numpy's OpenBLAS picks its kernels by CPU model, and on a CPU
    it does not know it falls back to older ones (on the AMD Zen 5, family 26, it chose Haswell's
    AVX2 kernels and the models below then ran above "100%" of its figure); onnxruntime picks by
    instruction set."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    from serving.sessions import session_options  # noqa: PLC0415

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b
    flop = 2 * n**3
    numpy_rate = flop / min(_timed(lambda: a @ b) for _ in range(repeats)) / 1e9
    h = onnx.helper
    graph = h.make_graph([h.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                         [h.make_tensor_value_info(k, onnx.TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
                         [h.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [n, n])])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)  # onnx may be newer than ORT
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(None),
                                   providers=["CPUExecutionProvider"])
    feed = {"a": a, "b": b}
    session.run(None, feed)
    ort_rate = flop / min(_timed(lambda: session.run(None, feed)) for _ in range(repeats)) / 1e9
    return {"numpy": numpy_rate, "onnxruntime": ort_rate, "ceiling": max(numpy_rate, ort_rate)}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops(model) -> float:
    """Multiply-adds x 2 of the convolution and dense layers for one image (what dominates these CNNs)."""
    from training.model.build import leaf_layers

    K = env.keras()
    total = 0.0
    for layer in leaf_layers(model):
        if isinstance(layer, (K.layers.Conv2D, K.layers.DepthwiseConv2D)):
            out = layer.output_shape if isinstance(layer.output_shape, tuple) else layer.output_shape[0]
            kh, kw = layer.kernel_size
            cin = layer.input_shape[-1]
            per_position = kh * kw * (cin if not isinstance(layer, K.layers.DepthwiseConv2D) else 1)
            channels = out[-1]
            total += 2 * out[1] * out[2] * channels * per_position
        elif isinstance(layer, K.layers.Dense):
            total += 2 * layer.input_shape[-1] * layer.units
    return total


def run(cmd: list[str]) -> None:
    try:
        cli.main(cmd)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"tlserve {' '.join(cmd)} failed ({exc.code})") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=f"folder:{ROOT.parent / 'shared' / 'datasets' / 'cifar10-jpg'}")
    parser.add_argument("--limit", type=int, default=512, help="images per split for the short training run")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per runtime and batch size")
    parser.add_argument("--models", default=",".join(m[0] for m in MODELS))
    args = parser.parse_args()
    chosen = [m for m in MODELS if m[0] in args.models.split(",")]
    rates = matmul_ceiling()
    ceiling = rates["ceiling"]
    rows = []
    for name, backbone, size in chosen:
        run_name = f"lat-{name}"
        train(TrainConfig(data=DataConfig(spec=args.data, limit=args.limit), backbone=backbone, epochs=1, name=run_name,
                          overwrite=True, weights="none", strategy="scratch", input_size=size or None))
        run(["export", run_name, "--int8", "--overwrite", "--no-register"])
        model_dir = Path(os.environ["TLSERVE_HOME"]) / "models" / run_name
        report = bench_model(model_dir, runtimes=("keras", "tf-function", "onnx", "onnx-int8"), batch_sizes=(1, 32),
                             duration=args.duration, log=lambda s: None)
        from serving.base.manifest import Manifest
        from training.model.build import load_model

        manifest = Manifest.load(model_dir)
        flops = model_flops(load_model(manifest.keras_path))
        p50 = {(r["runtime"], r["batch_size"]): r for r in report["results"]}
        int8 = manifest.artifacts["model.int8.onnx"]
        rows.append((name, p50, flops, int8))
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; float32 matmul ceiling {ceiling:.1f} GFLOP/s "
          f"(numpy {rates['numpy']:.1f}, onnxruntime {rates['onnxruntime']:.1f})")
    print("| model | keras predict p50 b1 | tf.function p50 b1 | onnx fp32 p50 b1 | onnx int8 p50 b1 | ORT vs predict | "
          "ORT vs tf.function | int8 speed-up b1 | int8 acc. delta | onnx b32 img/s | GFLOP/img | b32 GFLOP/s (% of ceiling) |")
    print("|" + "---|" * 13)
    for name, p, flops, int8 in rows:
        k, f, o, q = (p[(rt, 1)]["p50_ms"] for rt in ("keras", "tf-function", "onnx", "onnx-int8"))
        b32 = p[("onnx", 32)]["images_per_sec"]
        achieved = b32 * flops / 1e9
        print(f"| {name} | {k:.2f} ms | {f:.2f} ms | {o:.3f} ms | {q:.3f} ms | {k / o:.1f}x | {f / o:.1f}x | {o / q:.2f}x | "
              f"{int8.accuracy_delta:+.4f} | {b32:.0f} | {flops / 1e9:.3f} | {achieved:.1f} ({achieved / ceiling:.0%}) |")


if __name__ == "__main__":
    main()
