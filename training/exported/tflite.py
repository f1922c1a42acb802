"""TFLite files for the edge: fp32, fp16 and int8, converted from the export's SavedModel signature, so
the preprocessing (resize, the backbone's preprocess_input) and the OOD score are inside as in every
other file: float32 0-255 NHWC pixels in, `probabilities` and `ood_score` out.

Run with LiteRT's interpreter (`ai-edge-litert`, the `tflite` extra: no TensorFlow needed) when it is
installed, else TensorFlow's own tf.lite.Interpreter. int8 is TFLite's post-training quantization with
float fallback (weights and activations int8, float32 in and out), calibrated on the same stratified
training images as ONNX int8, and kept or dropped by the same accuracy gate.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import formats
from serving.base.manifest import Manifest, verify_artifacts
from serving.sessions import Loaded, physical_cores
from training import env, progress

SIGNATURE = "serving_default"
PRECISION = {"tflite": "fp32", "tflite-fp16": "fp16", "tflite-int8": "int8"}
QUANTIZATION = ("post-training int8 (TFLite converter, DEFAULT optimization with a representative dataset): int8 "
                "weights and activations where TFLite has int8 kernels, float fallback elsewhere; the OOD score's "
                "ops and the outputs (softmax) kept float; float32 in and out")


def convert(saved_model: Path, precision: str, calib_x: np.ndarray | None = None,
            keep_float: list[str] | None = None) -> bytes:
    """The SavedModel's serving signature as a TFLite flatbuffer at fp32, fp16 (weights) or int8; int8
    leaves the ops that write the tensors named in keep_float in float (QuantizationDebugger's denylist)."""
    T = env.tf()
    converter = T.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    if precision == "fp16":
        converter.optimizations = [T.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [T.float16]
    with env.quiet_library_logging(), env._quiet_stderr_fd():  # the converter logs every MLIR pass
        if precision != "int8":
            return converter.convert()
        converter.optimizations = [T.lite.Optimize.DEFAULT]
        data = lambda: ([calib_x[i:i + 1].astype(np.float32)] for i in range(len(calib_x)))  # noqa: E731
        converter.representative_dataset = data
        options = T.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep_float or [])
        debugger = T.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=data,
                                                            debug_options=options)
        return debugger.get_nondebug_quantized_model()


def float_tensors(fp32_file: Path) -> list[str]:
    """The tensors int8 keeps float: the OOD score's and the outputs (the softmax, as ONNX int8 keeps it).

    Quantized, the score's output is clipped to the range the in-distribution calibration images gave:
    every noise image of a synthetic-data CNN then scored the same 1.17, just above its 1.13 threshold
    (float: 6.9-7.6); kept float it reads 14-17, its verdict right."""
    from training.exported.ood import OUTPUT  # noqa: PLC0415

    interpreter = interpreter_class()(model_path=str(fp32_file))
    outputs = {d["name"] for d in interpreter.get_output_details()}
    return [d["name"] for d in interpreter.get_tensor_details() if f"/{OUTPUT}/" in d["name"] or d["name"] in outputs]


def interpreter_class():
    """LiteRT's Interpreter if installed (TensorFlow-free), else TensorFlow's."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415

        return Interpreter
    except ImportError:
        return env.tf().lite.Interpreter


def engine_name() -> str:
    return "litert" if interpreter_class().__module__.startswith("ai_edge_litert") else "tf.lite"


def runner(path: Path, threads: int | None = None) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]:
    """pixels -> (probabilities, OOD scores or None) through the file's serving signature."""
    interpreter = interpreter_class()(model_path=str(path), num_threads=threads or physical_cores())
    call = interpreter.get_signature_runner(SIGNATURE)

    def scored(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = call(image=np.ascontiguousarray(x, np.float32))  # the runner resizes its input to the batch
        return out["probabilities"], out.get("ood_score")

    return scored


def load(model_dir: Path, runtime: str, manifest: Manifest, threads: int | None = None) -> Loaded:
    """A TFLite row of serving.base.formats, its sha256 checked first."""
    fmt = formats.by_runtime(runtime)
    formats.require(manifest, fmt)
    verify_artifacts(model_dir, manifest, [fmt.file])
    scored = runner(Path(model_dir) / fmt.file, threads)
    return Loaded(runtime, lambda x: scored(x)[0], engine_name(), threads or physical_cores(),
                  scored if manifest.ood is not None else None)


def saved_model_for(model, staging: Path, serve_outputs: Callable[[Any, Any], dict]) -> tuple[Path, Any]:
    """The SavedModel the export wrote, or (--formats without savedmodel) a temporary one; (path, cleanup)."""
    written = staging / formats.BY_RUNTIME["savedmodel"].file
    if written.is_dir():
        return written, None
    T = env.tf()
    h, w = model.input_shape[1:3]
    tmp = tempfile.TemporaryDirectory(prefix="tlserve-tflite-")

    @T.function(input_signature=[T.TensorSpec([None, h, w, 3], T.float32, name="image")])
    def serve(image):
        return serve_outputs(model, image)

    with progress.step("writing a SavedModel for the TFLite converter", None):
        T.saved_model.save(model, tmp.name, signatures={SIGNATURE: serve})
    return Path(tmp.name), tmp


def rows() -> tuple[formats.Format, ...]:
    """The TFLite rows of the formats table, fp32 first (the reference of the gate)."""
    return tuple(f for f in formats.FORMATS if f.engine == formats.LITERT)


def export_files(model, staging: Path, check, opts, log: Callable[[str], None]) -> dict[str, Any]:
    """Write model.tflite, model.fp16.tflite and model.int8.tflite into the staging folder, each measured
    as export measures every file (training.exported.export.measure: parity with Keras, test split, the
    gate against the TFLite fp32 file for fp16 and int8)."""
    from training.exported import export as ex, ood  # noqa: PLC0415 (export calls this module)

    saved_model, cleanup = saved_model_for(model, staging, ood.signature_outputs)
    out: dict[str, Any] = {}
    fp32: dict[str, Any] | None = None
    log(f"TFLite files run with {engine_name()}")
    try:
        for fmt in rows():
            precision = PRECISION[fmt.runtime]
            path = staging / fmt.file
            keep = float_tensors(staging / rows()[0].file) if precision == "int8" else None
            with progress.step(f"converting to TFLite {precision}", None):
                path.write_bytes(convert(saved_model, precision, check.calib_x, keep))
            entry, result = ex.measure("TFLite", path, runner, check, opts, fp32, log)
            if precision == "fp32":
                fp32 = result
            if precision == "int8":
                entry.calibration_images, entry.quantization = int(len(check.calib_x)), QUANTIZATION
            if ex.kept(entry, path, check, log):
                out[fmt.file] = entry
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    return out
