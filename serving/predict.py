"""`tlserve predict`: classify image files with an exported model.

Models are loaded through one loader (serving.sessions.load: the onnxruntime rows of serving.base.formats);
the savedmodel and keras rows need TensorFlow, so training.exported.loader passes its own loader in.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import formats, images
from serving.base.errors import UserError
from serving.base.manifest import Manifest
from serving.sessions import Loader

BATCH = 32
# float32 pixel batches (N, H, W, 3) -> probabilities (N, classes)
Predictor = Callable[[np.ndarray], np.ndarray]


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


def predictor(model_dir: Path, runtime: str, variant: str = "fp32", loader: Loader | None = None,
              manifest: Manifest | None = None) -> Predictor:
    """A function from float32 pixel batches to probabilities, for the chosen row of serving.base.formats.

    `--runtime onnx --variant int8` is the onnx-int8 row. Without a `loader` only the onnxruntime rows
    load (serving/ never imports TensorFlow); training.exported.loader.load adds savedmodel and keras."""
    if loader is None:
        from serving.sessions import load as loader  # noqa: PLC0415
    fmt = formats.by_runtime(runtime)
    if runtime == "onnx":
        fmt = formats.by_variant(variant)
    return loader(model_dir, fmt.runtime, manifest=manifest).predict


def predict_files(model_dir: Path, paths: list[Path], *, runtime: str = "onnx", variant: str = "fp32", k: int = 5,
                  loader: Loader | None = None) -> tuple[list[Prediction], list[str]]:
    """(predictions, failures); an unreadable file is named in failures and the rest still run."""
    manifest = Manifest.load(model_dir)
    if k < 1:
        raise UserError("--top-k must be at least 1")
    (h, w), interpolation = manifest.input.hw, manifest.input.interpolation
    run = predictor(model_dir, runtime, variant, loader, manifest)  # a bad model fails before any file is read
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
        results.extend(Prediction(name, top_k(p, manifest.class_names, k))
                       for name, p in zip(names[start:start + BATCH], probs))
    return results, failures
