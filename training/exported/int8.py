"""tlserve's int8 recipe: static QDQ quantization with onnxruntime.quantization, which nodes stay
float32, and the accuracy-driven fallback that keeps more of the network float when the gate says no.

The figures behind each choice are in docs/decisions.md ("int8 that holds") and come from
benchmarks/int8_accuracy.py and benchmarks/int8_ablation.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training import env, progress

# 8-bit weights everywhere. 7-bit weights (onnxruntime's reduce_range, meant for CPUs without VNNI) cost a
# frozen MobileNetV2 on CIFAR-10 about 21 points (issue 30); on CPUs without VNNI the serving session turns
# on onnxruntime's exact U8U8 kernels instead (serving.sessions, session.x64quantprecision), so one file
# gives the same answers on every x86 CPU.
WEIGHT_BITS = 8
CALIBRATION_METHOD = "MinMax"  # percentile and entropy were no better here (issue 30)
CALIBRATION_BATCH = 32


@dataclass
class Budget:
    """How long the fallback may search for an int8 file the gate keeps."""
    tries: int = 6          # quantize-and-score rounds, the plain recipe included
    seconds: float = 600.0  # wall time; a try already begun is finished


@dataclass
class Attempt:
    """One quantized file: how many convolutions stayed float, and what the gate said of it."""
    float_convs: int
    path: Path
    passed: bool
    facts: Any = None       # the Artifact export measured
    seconds: float = 0.0
    float_nodes: list[str] = field(default_factory=list)


def conv_nodes(model_path: Path) -> list[str]:
    import onnx  # noqa: PLC0415

    return [n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node if n.op_type == "Conv"]


def float_nodes(model_path: Path, float_convs: int = 0) -> list[str]:
    """Nodes left float32: the pixel preprocessing before the first convolution (layout, resize,
    rescale), the softmax, and with float_convs=k everything before the (k+1)-th convolution (ONNX
    nodes are in topological order, so that is the stem and the first blocks).

    In uint8 the resize ran 3x slower than in float (MobileNetV2 @96: 168 vs 56 us), and a uint8 softmax
    has 1/255 steps, so near-equal classes tie and argmax falls to the lowest index (an untrained
    MobileNetV2 agreed with float32 on 0% of top-1 answers). The OOD score's nodes stay float too
    (training.exported.ood.onnx_nodes): a distance quantized to 8 bits moves the threshold's verdicts."""
    import onnx  # noqa: PLC0415

    from training.exported.ood import onnx_nodes  # noqa: PLC0415

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    cut = (convs[float_convs] if float_convs < len(convs) else len(nodes)) if convs else 0
    kept = [n.name for n in nodes[:cut]] + [n.name for n in nodes[cut:] if n.op_type == "Softmax"]
    return kept + [name for name in onnx_nodes(nodes[cut:])]


def quantize_int8(src: Path, dst: Path, calib_x: np.ndarray, *, float_convs: int = 0, keep_float: bool = True,
                  reduce_range: bool = False) -> list[str]:
    """Static QDQ quantization calibrated on training images (dynamic int8 runs these CNNs slower than
    fp32); returns the nodes kept float32. keep_float=False quantizes every node, reduce_range=True gives
    7-bit weights: the recipes benchmarks/int8_ablation.py compares against."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,  # noqa: PLC0415
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, advance):
            self._batches = iter([{"image": images[i:i + CALIBRATION_BATCH]}
                                  for i in range(0, len(images), CALIBRATION_BATCH)])
            self.advance = advance

        def get_next(self):
            feed = next(self._batches, None)
            if feed is not None:
                self.advance(len(feed["image"]))  # counted as handed over: the calibrator runs it next
            return feed

    prepared = dst.with_name(dst.stem + ".prep.onnx")
    try:
        with env.quiet_library_logging(), progress.step("int8 calibration", len(calib_x)) as advance:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            kept = float_nodes(prepared, float_convs) if keep_float else []
            quantize_static(str(prepared), str(dst), Reader(calib_x, advance), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHOD), reduce_range=reduce_range,
                            nodes_to_exclude=kept)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in dst.parent.glob("*.onnx.data"):
            leftover.unlink(missing_ok=True)
    return kept


def describe(float_convs: int, convs: int, *, reduce_range: bool = False) -> str:
    bits = 7 if reduce_range else WEIGHT_BITS
    kept = "pixel preprocessing, softmax and the OOD score kept float32"
    if float_convs:
        kept = (f"pixel preprocessing, the first {float_convs} of {convs} convolutions, softmax and the OOD score "
                "kept float32")
    return (f"static QDQ, per-channel {bits}-bit int8 weights, uint8 activations, {CALIBRATION_METHOD} "
            f"calibration; {kept}")


def search(attempt: Callable[[int], Attempt], convs: int, budget: Budget, log: Callable[[str], None]) -> list[Attempt]:
    """Quantize everything but the preprocessing (k=0); while the gate refuses, keep the first 1, 2, 4, ...
    convolutions float (from the stem up: the error builds up in the first blocks, issue 30), and once
    one passes, bisect between the last refused and it for the fewest float convolutions that pass,
    while the budget lasts. Returns every attempt, in order."""
    start = time.monotonic()
    tries = [attempt(0)]
    refused, passed = 0, (0 if tries[0].passed else None)  # most float convs refused, fewest passed
    while passed != refused + 1 and passed != 0:
        if len(tries) >= budget.tries or time.monotonic() - start >= budget.seconds:
            log(f"int8 fallback: budget spent ({len(tries)} tries, {time.monotonic() - start:.0f} s)")
            break
        if passed is None:
            k = min(max(1, 2 * refused), convs - 1)
            if k <= refused:  # every convolution but the last already float
                break
        else:
            k = (refused + passed) // 2
        tries.append(attempt(k))
        if tries[-1].passed:
            passed = k
        else:
            refused = k
    return tries


def chosen(tries: list[Attempt]) -> Attempt:
    """The passing attempt with the fewest float convolutions, else the one that lost least accuracy."""
    kept = [t for t in tries if t.passed]
    if kept:
        return min(kept, key=lambda t: t.float_convs)
    return min(tries, key=lambda t: (t.facts.gate["accuracy_drop_points"], t.float_convs))


def speed(sessions: dict[str, Any], images: np.ndarray, batches: tuple[int, ...] = (1, 32),
          seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """p50 milliseconds per session at each batch size, timed in interleaved rounds so a noisy machine
    slows all of them alike: {"batch_1": {"fp32": ms, "int8": ms}, ...}."""
    out: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = np.resize(images, (batch, *images.shape[1:])).astype(np.float32)
        samples: dict[str, list[float]] = {k: [] for k in sessions}
        for s in sessions.values():
            s.run(None, {"image": x})  # warm-up
        deadline = time.perf_counter() + seconds * len(sessions)
        while time.perf_counter() < deadline or min(len(v) for v in samples.values()) < 5:
            for name, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"image": x})
                samples[name].append((time.perf_counter() - t0) * 1000)
        out[f"batch_{batch}"] = {k: float(np.median(v)) for k, v in samples.items()}
    return out
