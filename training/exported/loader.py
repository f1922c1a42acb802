"""The one loader of every row of serving.base.formats: keras, savedmodel, onnx, onnx-fp16, onnx-int8, and
the TFLite rows (training.exported.tflite).

`load` checks what the manifest says about the file before anything runs: the sha256 of every
export artifact (the SavedModel too), and for keras, which is the run's model.keras and not an
artifact, what can be checked (see _check_keras). The TensorFlow rows are loaded here; the
onnxruntime rows are delegated to serving.sessions.load, which the service uses alone (serving/
never imports training/ or TensorFlow). predict, bench, eval and export's parity check all come
through here; TensorFlow itself is imported only when a TensorFlow row is loaded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from serving import timing as _bench, predict as _predict, sessions as _runtime
from serving.base import formats
from serving.base.errors import UserError
from serving.base.manifest import Manifest, verify_artifacts
from serving.sessions import Loaded
from training import env


def load(model_dir: Path, runtime: str, *, manifest: Manifest | None = None, device: str = "auto",
         threads: int | None = None, spin: str = "always") -> Loaded:
    """Any runtime of serving.base.formats (or bench's tf-function mode of keras) for this model folder,
    its file checked against the manifest first. A row the model lacks is formats.MissingFormat."""
    model_dir = Path(model_dir)
    manifest = manifest or Manifest.load(model_dir)
    fmt = formats.by_runtime(formats.BENCH_MODES.get(runtime, runtime), formats.RUNTIMES)
    if fmt.serving_can_load:
        return _runtime.load(model_dir, fmt.runtime, manifest=manifest, device=device, threads=threads, spin=spin)
    formats.require(manifest, fmt)
    if fmt.engine == formats.LITERT:
        from training.exported import tflite  # noqa: PLC0415

        return tflite.load(model_dir, fmt.runtime, manifest, threads)
    if fmt.runtime == "savedmodel":
        verify_artifacts(model_dir, manifest, [fmt.file])
        if manifest.ood is None:
            return Loaded(runtime, savedmodel_predictor(model_dir / fmt.file), _tf_device())
        scored = savedmodel_predictor(model_dir / fmt.file, scored=True)
        return Loaded(runtime, lambda x: scored(x)[0], _tf_device(), scored=scored)
    if fmt.runtime == "keras":
        model = _check_keras(manifest)
        if runtime == "tf-function":
            T = env.tf()
            call = T.function(lambda x: model(x, training=False))
            return Loaded(runtime, lambda x: call(T.constant(x)).numpy(), _tf_device())
        return Loaded(runtime, lambda x: model.predict(x, verbose=0), _tf_device())
    raise AssertionError(f"serving.base.formats row {fmt.runtime} has no loader branch in training.exported.loader")


def savedmodel_predictor(path: Path, *, scored: bool = False):
    """The SavedModel's serving signature as a pixels -> probabilities function, or with `scored`
    pixels -> (probabilities, OOD scores) (export's parity check loads the file it has just written,
    and hashed, this way too)."""
    T = env.tf()
    fn = T.saved_model.load(str(path)).signatures["serving_default"]
    if scored:
        def both(x):
            out = fn(image=T.constant(x))
            return out["probabilities"].numpy(), out["ood_score"].numpy()
        return both
    return lambda x: fn(image=T.constant(x))["probabilities"].numpy()


def _check_keras(manifest: Manifest):
    """The run's model.keras, checked as far as the manifest allows.

    It has no sha256 in the manifest: it belongs to the run, not to the export (the artifacts are what
    export wrote and a bento carries), and the manifest keeps the keys it has always had. What export
    did record of it is checked instead: the file is there, it takes the manifest's input size, gives
    one output per class and has the parameter count the export saw."""
    path = manifest.keras_path
    if path is None or not path.is_file():
        raise formats.MissingFormat(f"the run's model.keras is not at {path}")
    from training.model.build import load_model  # noqa: PLC0415

    model = load_model(path)
    h, w = manifest.input.hw
    facts = {"input size": (tuple(model.input_shape[1:3]), (h, w)),
             "classes": (int(model.output_shape[-1]), manifest.num_classes)}
    if manifest.params is not None:
        facts["parameters"] = (int(model.count_params()), manifest.params)
    for what, (found, expected) in facts.items():
        if found != expected:
            raise UserError(f"{path} is not the model {manifest.name} was exported from ({what} {found}, "
                            f"manifest {expected}); refusing to load it")
    return model


def _tf_device() -> str:
    return "GPU" if env.gpus() else "CPU"


# ---- tlserve predict / bench: serving's functions with this loader ----------------------------


def predictor(model_dir: Path, runtime: str, variant: str = "fp32") -> _predict.Predictor:
    """serving.predict.predictor with the TensorFlow runtimes too."""
    return _predict.predictor(model_dir, runtime, variant, load)


def predict_files(model_dir: Path, paths: list[Path], **options: Any) -> tuple[list[_predict.Prediction], list[str]]:
    """`tlserve predict`: serving.predict.predict_files with the savedmodel and keras runtimes too."""
    return _predict.predict_files(model_dir, paths, loader=load, **options)


def bench_model(model_dir: Path, *, runtimes: tuple[str, ...] = formats.BENCH_DEFAULT,
                **options: Any) -> dict[str, Any]:
    """`tlserve bench MODEL`: serving.timing.bench_model with the TensorFlow runtimes too, and the GPUs
    TensorFlow sees in the stored machine facts once it is loaded."""
    return _bench.bench_model(model_dir, runtimes=runtimes, loader=load, known=formats.BENCH_RUNTIMES,
                              facts=env.machine_facts, **options)
