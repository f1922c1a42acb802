"""`tlserve predict`: classify image files with an exported model.

onnxruntime is here; the savedmodel and keras runtimes need TensorFlow and come from training.runtimes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from serving import images
from serving.errors import UserError
from serving.manifest import load_manifest

BATCH = 32
# float32 pixel batches (N, H, W, 3) -> probabilities (N, classes)
Predictor = Callable[[np.ndarray], np.ndarray]
# (model folder, its manifest) -> a Predictor; for the runtimes other than onnx
PredictorFactory = Callable[[Path, dict[str, Any]], Predictor]


@dataclass
class Prediction:
    path: str
    top: list[dict[str, Any]]  # [{label, probability}] best first


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders become their image files (recursively, sorted)."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if images.is_image_path(p)))
        else:
            out.append(path)
    return out


def top_k(probs: np.ndarray, class_names: list[str], k: int) -> list[dict[str, Any]]:
    order = np.argsort(-probs)[:k]
    return [{"label": class_names[i], "probability": float(probs[i])} for i in order]


def predictor(model_dir: Path, runtime: str, variant: str = "fp32",
              runtimes: Mapping[str, PredictorFactory] | None = None) -> Predictor:
    """A function from float32 pixel batches to probabilities, for the chosen runtime.

    onnx is served here; other runtimes come in `runtimes` (training.runtimes.PREDICTORS: savedmodel,
    keras), so that this module, like all of serving/, never imports TensorFlow."""
    manifest = load_manifest(model_dir)
    others = dict(runtimes or {})
    if runtime != "onnx" and runtime not in others:
        raise UserError(f"unknown runtime '{runtime}'; choose from {', '.join(['onnx', *others])}")
    if runtime == "onnx":
        from serving.runtime import OnnxClassifier  # noqa: PLC0415

        return OnnxClassifier.load(model_dir, variant=variant).predict
    return others[runtime](model_dir, manifest)


def predict_files(model_dir: Path, paths: list[Path], *, runtime: str = "onnx", variant: str = "fp32", k: int = 5,
                  runtimes: Mapping[str, PredictorFactory] | None = None) -> tuple[list[Prediction], list[str]]:
    """(predictions, failures); an unreadable file is named in failures and the rest still run."""
    manifest = load_manifest(model_dir)
    if k < 1:
        raise UserError("--top-k must be at least 1")
    h, w = int(manifest["input"]["shape"][1]), int(manifest["input"]["shape"][2])
    interpolation = manifest["input"].get("interpolation", images.DEFAULT_INTERPOLATION)
    run = predictor(model_dir, runtime, variant, runtimes)  # a bad model fails before any file is read
    files = expand(paths)
    if not files:
        raise UserError("no image files given")
    arrays, names, failures = [], [], []
    for path in files:
        try:
            arrays.append(images.load_array(path, (h, w), interpolation=interpolation, name=str(path)))
            names.append(str(path))
        except images.ImageError as exc:
            failures.append(str(exc))
    results = []
    for start in range(0, len(arrays), BATCH):
        probs = run(np.stack(arrays[start:start + BATCH]).astype(np.float32))
        results.extend(Prediction(name, top_k(p, manifest["class_names"], k))
                       for name, p in zip(names[start:start + BATCH], probs))
    return results, failures
