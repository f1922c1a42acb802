"""The TensorFlow runtimes `tlserve predict` and `tlserve bench` offer beside onnxruntime.

keras (the run's model.keras), tf-function (the same model under tf.function) and savedmodel
(the export's SavedModel) need TensorFlow, so they live here and are passed in to serving.predict
and serving.bench, which hold the onnxruntime paths: serving/ never imports training/ or TensorFlow.
TensorFlow itself is imported only when one of these runtimes is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from serving import bench as _bench, predict as _predict
from serving.errors import UserError
from serving.manifest import verify_artifacts
from training import env

# ---- tlserve predict ------------------------------------------------------------------------


def _predict_savedmodel(model_dir: Path, manifest: dict[str, Any]) -> _predict.Predictor:
    if "saved_model" not in manifest["artifacts"]:
        raise UserError(f"{model_dir} was exported without a SavedModel")
    verify_artifacts(model_dir, manifest, ["saved_model"])
    T = env.tf()
    fn = T.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    return lambda x: fn(image=T.constant(x))["probabilities"].numpy()


def _predict_keras(model_dir: Path, manifest: dict[str, Any]) -> _predict.Predictor:
    keras_path = Path(manifest["run_path"]) / "model.keras"
    if not keras_path.is_file():
        raise UserError(f"--runtime keras needs the run's model.keras, which is not at {keras_path}")
    from training.models import load_model  # noqa: PLC0415

    model = load_model(keras_path)
    return lambda x: model.predict(x, verbose=0)


# After onnx, in this order: `--runtime onnx | savedmodel | keras`.
PREDICTORS: dict[str, _predict.PredictorFactory] = {"savedmodel": _predict_savedmodel, "keras": _predict_keras}


def predictor(model_dir: Path, runtime: str, variant: str = "fp32") -> _predict.Predictor:
    """serving.predict.predictor with the TensorFlow runtimes too."""
    return _predict.predictor(model_dir, runtime, variant, PREDICTORS)


def predict_files(model_dir: Path, paths: list[Path], **options: Any) -> tuple[list[_predict.Prediction], list[str]]:
    """`tlserve predict`: serving.predict.predict_files with the savedmodel and keras runtimes too."""
    return _predict.predict_files(model_dir, paths, runtimes=PREDICTORS, **options)


# ---- tlserve bench --------------------------------------------------------------------------


def _tf_device() -> str:
    return "GPU" if env.gpus() else "CPU"


def _bench_savedmodel(model_dir: Path, manifest: dict[str, Any], threads: int | None):
    T = env.tf()
    if "saved_model" not in manifest["artifacts"]:
        return None, f"no saved_model in this export; make it with: {_bench.export_command(manifest, 'savedmodel')}"
    fn = T.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    return (lambda x: fn(image=T.constant(x))["probabilities"].numpy(), _tf_device(), None), None


def _bench_keras_model(model_dir: Path, manifest: dict[str, Any], *, compiled: bool):
    T = env.tf()
    keras_path = Path(manifest["run_path"]) / "model.keras"
    if not keras_path.is_file():
        return None, f"the run's model.keras is not at {keras_path}"
    from training.models import load_model  # noqa: PLC0415

    model = load_model(keras_path)
    if not compiled:
        return (lambda x: model.predict(x, verbose=0), _tf_device(), None), None
    call = T.function(lambda x: model(x, training=False))
    return (lambda x: call(T.constant(x)).numpy(), _tf_device(), None), None


# Before the onnx ones, in this order: `--runtimes keras, tf-function, savedmodel, onnx, onnx-fp16, onnx-int8`.
RUNNERS: dict[str, _bench.RunnerFactory] = {
    "keras": lambda model_dir, manifest, threads: _bench_keras_model(model_dir, manifest, compiled=False),
    "tf-function": lambda model_dir, manifest, threads: _bench_keras_model(model_dir, manifest, compiled=True),
    "savedmodel": _bench_savedmodel,
}
RUNTIMES = (*RUNNERS, *_bench.ONNX_RUNTIMES)
DEFAULT_RUNTIMES = ("keras", "savedmodel", "onnx", "onnx-int8", "onnx-fp16")


def bench_model(model_dir: Path, *, runtimes: tuple[str, ...] = DEFAULT_RUNTIMES,
                **options: Any) -> dict[str, Any]:
    """`tlserve bench MODEL`: serving.bench.bench_model with the TensorFlow runtimes too, and the GPUs
    TensorFlow sees in the stored machine facts once it is loaded."""
    return _bench.bench_model(model_dir, runtimes=runtimes, runners=RUNNERS, facts=env.machine_facts, **options)

