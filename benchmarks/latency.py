"""The README's in-process performance table, reproduced on CIFAR-10 (the JPEG copy in shared/).

    .venv/bin/python benchmarks/latency.py [--data folder:../shared/datasets/cifar10-jpg] [--limit 512]

For cnn, mobilenetv2 (input 96), resnet50v2 (input 96) and vgg16 (input 32) it trains a short run
(weights do not change latency, so --weights none), exports it with a static int8 variant calibrated
on real training images, and times Keras model.predict, the same model under tf.function, onnxruntime
fp32 and int8 at batch 1 and 32. Beside the batch-32 throughput it prints the model's FLOPs and this
machine's float32 matrix-multiply ceiling, measured with the engine and threads the models run on
(onnxruntime, the bench sessions' intra-op threads; see matmul_ceiling). `--ceiling-only` measures just it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

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


# (op, M, K, N): square products, and the tall-skinny shapes a batch-32 convolution becomes (im2col rows x
# kernel taps) in these models; the ceiling is the best of them.
CEILING_SHAPES = [("MatMul", 1024, 1024, 1024), ("MatMul", 2048, 2048, 2048), ("Gemm", 2048, 2048, 2048),
                  ("Gemm", 32768, 576, 128), ("Gemm", 8192, 2304, 256)]


def matmul_ceiling(threads: int, repeats: int = 5) -> dict[str, Any]:
    """GFLOP/s of float32 matrix products run by the engine the models run on: onnxruntime's CPU provider
    with the bench sessions' own options (serving.sessions.session_options: `threads` intra-op threads, one
    inter-op, spinning as served), on one-node MatMul and Gemm graphs built with onnx.helper. Best of
    `repeats` timed runs per shape; the ceiling is the best shape.

    It used to be numpy's: OpenBLAS picks its kernels and threads by its own rules (on an AMD EPYC it
    reported 105 GFLOP/s while onnxruntime ran VGG16 at 208, "197% of the ceiling"). numpy's figure is
    still printed beside it, for reference only."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    from serving.sessions import session_options  # noqa: PLC0415

    h = onnx.helper
    rng = np.random.default_rng(0)
    rates, cpu_rates = {}, {}
    for op, m, k, n in CEILING_SHAPES:
        a, b = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
        graph = h.make_graph([h.make_node(op, ["a", "b"], ["c"])], op.lower(),
                             [h.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [m, k]),
                              h.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [k, n])],
                             [h.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [m, n])])
        proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)  # onnx may be newer than ORT
        session = ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(threads),
                                       providers=["CPUExecutionProvider"])
        feed = {"a": a, "b": b}
        session.run(None, feed)  # warm-up: first-run allocations and thread start
        wall, cpu = min(_timed_cpu(lambda: session.run(None, feed)) for _ in range(repeats))
        rates[f"{op} {m}x{k} @ {k}x{n}"] = 2 * m * k * n / wall / 1e9
        cpu_rates[f"{op} {m}x{k} @ {k}x{n}"] = 2 * m * k * n / cpu / 1e9
    best = max(rates, key=rates.get)
    a = rng.standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    numpy_rate = 2 * 2048**3 / min(_timed(lambda: a @ a) for _ in range(repeats)) / 1e9
    how = (f"onnxruntime {ort.__version__} CPUExecutionProvider, {threads} intra-op threads (the bench sessions' "
           f"options), float32 {best} (best of {len(rates)} MatMul/Gemm shapes, best of {repeats} runs each)")
    # Per CPU-second (user + system, all threads): what a loaded machine's wall time hides; x threads it
    # estimates the unloaded wall-clock rate (spinning threads count as busy, so it is a lower bound).
    return {"ceiling": rates[best], "how": how, "shapes": rates, "numpy": numpy_rate,
            "per_cpu_second": cpu_rates[best], "threads": threads}


def print_ceiling(rates: dict[str, Any]) -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} logical cores, load average {load}")
    print(f"float32 matmul ceiling {rates['ceiling']:.1f} GFLOP/s: {rates['how']}; per CPU-second "
          f"{rates['per_cpu_second']:.1f} GFLOP (x {rates['threads']} threads: {rates['per_cpu_second'] * rates['threads']:.1f} "
          "GFLOP/s if the cores were not shared)")
    print("  per shape: " + "; ".join(f"{k} {v:.1f}" for k, v in rates["shapes"].items())
          + f"; for reference, numpy (its own BLAS and threads) 2048^3: {rates['numpy']:.1f}")


def _timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one call."""
    import resource  # noqa: PLC0415

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    c0, t0 = cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, cpu() - c0


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
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: physical cores)")
    parser.add_argument("--ceiling-only", action="store_true", help="measure and print the ceiling, nothing else")
    args = parser.parse_args()
    chosen = [m for m in MODELS if m[0] in args.models.split(",")]
    from serving.sessions import physical_cores  # noqa: PLC0415

    threads = args.threads or physical_cores()  # the bench sessions' default, given to both explicitly
    if args.ceiling_only:
        return print_ceiling(matmul_ceiling(threads))
    rows = []
    for name, backbone, size in chosen:
        run_name = f"lat-{name}"
        train(TrainConfig(data=DataConfig(spec=args.data, limit=args.limit), backbone=backbone, epochs=1, name=run_name,
                          overwrite=True, weights="none", strategy="scratch", input_size=size or None))
        # A table of speed from barely trained runs (512 test images): the gate stays open so that the int8
        # file is timed whatever a class's recall does; its accuracy delta is in the table.
        run(["export", run_name, "--int8", "--overwrite", "--no-register", "--max-accuracy-drop", "100",
             "--max-class-drop", "100", "--int8-tries", "1"])
        model_dir = Path(os.environ["TLSERVE_HOME"]) / "models" / run_name
        report = bench_model(model_dir, runtimes=("keras", "tf-function", "onnx", "onnx-int8"), batch_sizes=(1, 32),
                             duration=args.duration, threads=threads, log=lambda s: None)
        used = {r["threads"] for r in report["results"] if r["runtime"].startswith("onnx")}
        if used != {threads}:
            raise SystemExit(f"the bench ran onnxruntime with {used} threads, the ceiling would use {threads}")
        from serving.base.manifest import Manifest
        from training.model.build import load_model

        manifest = Manifest.load(model_dir)
        flops = model_flops(load_model(manifest.keras_path))
        p50 = {(r["runtime"], r["batch_size"]): r for r in report["results"]}
        int8 = manifest.artifacts["model.int8.onnx"]
        rows.append((name, p50, flops, int8))
    rates = matmul_ceiling(threads)  # right after the models' timings, under the same load
    ceiling = rates["ceiling"]
    print_ceiling(rates)
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
