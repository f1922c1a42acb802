"""`tlserve predict`: classify image files with an exported model through onnx, savedmodel or keras."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.manifest import load_manifest, verify_artifacts
from training import images
from training.errors import UserError

RUNTIMES = ("onnx", "savedmodel", "keras")
BATCH = 32


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


def predictor(model_dir: Path, runtime: str, variant: str = "fp32") -> Callable[[np.ndarray], np.ndarray]:
    """A function from float32 pixel batches to probabilities, for the chosen runtime."""
    manifest = load_manifest(model_dir)
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime '{runtime}'; choose from {', '.join(RUNTIMES)}")
    if runtime == "onnx":
        from serving.runtime import OnnxClassifier  # noqa: PLC0415

        return OnnxClassifier.load(model_dir, variant=variant).predict
    if runtime == "savedmodel":
        if "saved_model" not in manifest["artifacts"]:
            raise UserError(f"{model_dir} was exported without a SavedModel")
        verify_artifacts(model_dir, manifest, ["saved_model"])
        from training.env import tf  # noqa: PLC0415

        T = tf()
        fn = T.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
        return lambda x: fn(image=T.constant(x))["probabilities"].numpy()
    keras_path = Path(manifest["run_path"]) / "model.keras"
    if not keras_path.is_file():
        raise UserError(f"--runtime keras needs the run's model.keras, which is not at {keras_path}")
    from training.models import load_model  # noqa: PLC0415

    model = load_model(keras_path)
    return lambda x: model.predict(x, verbose=0)


def predict_files(model_dir: Path, paths: list[Path], *, runtime: str = "onnx", variant: str = "fp32", k: int = 5,
                  ) -> tuple[list[Prediction], list[str]]:
    """(predictions, failures); an unreadable file is named in failures and the rest still run."""
    manifest = load_manifest(model_dir)
    if k < 1:
        raise UserError("--top-k must be at least 1")
    h, w = int(manifest["input"]["shape"][1]), int(manifest["input"]["shape"][2])
    interpolation = manifest["input"].get("interpolation", images.DEFAULT_INTERPOLATION)
    run = predictor(model_dir, runtime, variant)  # a bad model fails before any file is read
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
