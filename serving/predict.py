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
from serving.sessions import Loaded, Loader

BATCH = 32
# float32 pixel batches (N, H, W, 3) -> probabilities (N, classes)
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class Prediction:
    path: str
    top: list[dict[str, Any]]  # [{label, probability}] best first
    ood_score: float | None = None  # None: the runtime or the model has no OOD score
    in_distribution: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "top": self.top}
        if self.ood_score is not None:
            out.update(ood_score=self.ood_score, in_distribution=self.in_distribution)
        return out


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
    return _loaded(model_dir, runtime, variant, loader, manifest).predict


def _loaded(model_dir: Path, runtime: str, variant: str, loader: Loader | None, manifest: Manifest | None) -> Loaded:
    if loader is None:
        from serving.sessions import load as loader  # noqa: PLC0415
    fmt = formats.by_runtime(runtime)
    if runtime == "onnx":
        fmt = formats.by_variant(variant)
    return loader(model_dir, fmt.runtime, manifest=manifest)


def predict_files(model_dir: Path, paths: list[Path], *, runtime: str = "onnx", variant: str = "fp32", k: int = 5,
                  loader: Loader | None = None) -> tuple[list[Prediction], list[str]]:
    """(predictions, failures); an unreadable file is named in failures and the rest still run."""
    manifest = Manifest.load(model_dir)
    if k < 1:
        raise UserError("--top-k must be at least 1")
    (h, w), interpolation = manifest.input.hw, manifest.input.interpolation
    loaded = _loaded(model_dir, runtime, variant, loader, manifest)  # a bad model fails before any file is read
    run = loaded.scored or (lambda x: (loaded.predict(x), None))
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
    threshold = manifest.ood.threshold if manifest.ood else None
    for start in range(0, len(arrays), BATCH):
        probs, scores = run(np.stack(arrays[start:start + BATCH]).astype(np.float32))
        for i, (name, p) in enumerate(zip(names[start:start + BATCH], probs)):
            score = None if scores is None else float(scores[i])
            results.append(Prediction(name, top_k(p, manifest.class_names, k), score,
                                      None if score is None else score <= threshold))
    return results, failures
