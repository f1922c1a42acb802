"""`tlserve export`: a finished run → models/<name>/ with SavedModel, ONNX (fp32, optional fp16 and
int8), a manifest, and the same files registered in the BentoML model store.

Parity is measured, not assumed: one check batch of real images goes through Keras, the SavedModel
and every ONNX file, and the export fails when fp32 disagrees.
"""
from __future__ import annotations

import re
import secrets
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import formats as table, machine, storage
from serving.base.errors import UserError
from serving.base.manifest import Artifact, ExportFacts, Gate, InputSpec, Manifest, artifact_digest, tree_bytes
from training import env, progress
from training.record import records
from training.config import DataConfig
from training.exported import ood as ood_scores

FORMATS = table.EXPORT_FORMATS  # savedmodel, onnx
PARITY_TOLERANCE = 1e-4
DEFAULT_OPSET = 17
Log = Callable[[str], None]


@dataclass
class ExportOptions:
    name: str | None = None
    formats: tuple[str, ...] = FORMATS
    opset: int = DEFAULT_OPSET
    fp16: bool = False
    int8: bool = False
    overwrite: bool = False
    check_images: int = 32
    calibration_images: int = 256
    register: bool = True
    # The gate for fp16/int8: a variant losing more test accuracy than this (points), or more recall on
    # any one class, is not kept.
    max_accuracy_drop: float = 1.0
    max_class_drop: float = 5.0
    # The OOD score as every file's second output (training.exported.ood): its threshold accepts this
    # share of the validation split; the reference is fitted on at most ood_images training images.
    ood: bool = True
    ood_accept: float = ood_scores.DEFAULT_ACCEPT
    ood_images: int = ood_scores.DEFAULT_IMAGES


@dataclass
class _Check:
    images: np.ndarray
    keras_probs: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: np.ndarray
    class_names: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, Artifact] = field(default_factory=dict)  # variants the accuracy gate did not keep
    data: Any = None  # the run's dataset (training.data.sources), for the OOD reference
    ood: ood_scores.Fitted | None = None

    @property
    def spread(self) -> float:
        """How far any check image's output is from the first one's: about 0 for a model that
        answers every image the same (untrained, or collapsed), where parity can tell nothing."""
        return float(np.max(np.abs(self.keras_probs - self.keras_probs[:1]))) if len(self.keras_probs) else 0.0

    @property
    def informative(self) -> bool:
        return self.spread > DEGENERATE_SPREAD


DEGENERATE_SPREAD = 1e-6


def bento_name(name: str) -> str:
    """BentoML tag names are lowercase [a-z0-9._-], starting and ending alphanumeric."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    if not cleaned:
        raise UserError(f"--name '{name}' has no letters or digits")
    return cleaned[:60]


def parse_formats(spec: str) -> tuple[str, ...]:
    formats = tuple(f.strip() for f in spec.split(",") if f.strip())
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise UserError(f"unknown format '{bad[0] if bad else spec}'; choose from {', '.join(FORMATS)}")
    return formats


def export(run_ref: str, opts: ExportOptions, *, runs_dir: Path | None = None, models_dir: Path | None = None,
           log: Log = print) -> tuple[Path, Manifest]:
    run = records.load_run(run_ref, runs_dir)
    if not run.model_path.is_file():
        raise UserError(f"run '{run.name}' has no {records.MODEL}")
    if (opts.fp16 or opts.int8) and "onnx" not in opts.formats:
        raise UserError("--fp16 / --int8 are ONNX variants; include onnx in --formats")
    if not 9 <= opts.opset <= 21:
        raise UserError("--opset must be between 9 and 21")
    for flag, value in (("--max-accuracy-drop", opts.max_accuracy_drop), ("--max-class-drop", opts.max_class_drop)):
        if not np.isfinite(value):
            raise UserError(f"{flag} must be a number of accuracy points")
    if opts.ood:
        ood_scores.check_options(opts.ood_accept, opts.ood_images)
    name = bento_name(opts.name or run.name)
    if opts.name and name != opts.name:
        # A name the user typed is used as typed or refused: `../x` or `a/b` must not land elsewhere.
        raise UserError(f"--name '{opts.name}': a model name is lowercase letters, digits, '.', '_' and '-' "
                        f"(starting and ending with a letter or digit), at most 60 characters; e.g. '{name}'")
    if name != run.name:
        log(f"model name: '{name}' (from run '{run.name}': BentoML names are lowercase letters, digits, '.', '_', '-')")
    final = storage.models_dir(models_dir) / name
    if final.exists() and not opts.overwrite:
        raise UserError(f"model '{name}' already exists in {final.parent}; pass --overwrite or choose --name")

    from training.model.build import load_model  # noqa: PLC0415

    model = load_model(run.model_path)
    check = _check_data(run, model, opts)
    if not check.informative:
        log(f"warning: the model gives the same output for every check image (spread {check.spread:.1e}); "
            "the parity check below can only show that the runtimes agree on that constant")
    if opts.ood:
        check.ood, model = _fit_ood(model, run, check, opts, log)
    version = f"{datetime.now(timezone.utc):%Y%m%d%H%M%S}{secrets.token_hex(2)}"
    for stale in storage.remove_stale_staging(final.parent, name):
        log(f"removed {stale.name}: left by an export that was killed")
    with storage.staged_dir(final, overwrite=opts.overwrite) as staging:
        artifacts: dict[str, Artifact] = {}
        if "savedmodel" in opts.formats:
            saved_model = table.BY_RUNTIME["savedmodel"].file
            artifacts[saved_model] = _export_savedmodel(model, staging / saved_model, check, log)
        if "onnx" in opts.formats:
            artifacts.update(_export_onnx(model, staging, check, opts, log))
        if "tflite" in opts.formats:
            from training.exported import tflite  # noqa: PLC0415

            artifacts.update(tflite.export_files(model, staging, check, opts, log))
        manifest = _manifest(run, name, version, opts, artifacts, check)
        if check.ood is not None:
            ood_scores.write_reference(check.ood, staging)
            manifest.ood = check.ood.entry
        manifest.save(staging)
        if opts.register:
            _register(name, version, staging, manifest)
            log(f"registered in the BentoML model store as {name}:{version}")
    return final, manifest


def _check_data(run: records.Run, model, opts: ExportOptions) -> _Check:
    from training.data.sources import load_dataset  # noqa: PLC0415

    data = load_dataset(DataConfig(**run.record.config["data"]))
    images = data.test.x[: opts.check_images].astype(np.float32)
    keras_probs = model.predict(images, verbose=0)
    calib = data.train.x[: opts.calibration_images].astype(np.float32)
    return _Check(images, keras_probs, data.test.x, data.test.y, calib, list(run.record.data.class_names), data=data)


def _fit_ood(model, run: records.Run, check: _Check, opts: ExportOptions, log: Log):
    """(the OOD reference, the model with its score as a second output) — the model every file is written from."""
    data = check.data
    fitted, scored = ood_scores.fit_for_export(
        model, (data.train.x, data.train.y), (data.val.x, data.val.y), check.images, check.class_names,
        accept=opts.ood_accept, images=opts.ood_images, seed=int(run.record.config.get("seed", 0)))
    e = fitted.entry
    log(f"OOD score: {e.method} on {e.dims} features of {e.train_images} training images (shrinkage "
        f"{e.shrinkage:.3f}); threshold {e.threshold:.4g} accepts {e.val_accepted:.1%} of {e.val_images} validation images")
    return fitted, scored


def _compare(probs: np.ndarray, check: _Check) -> dict[str, Any]:
    diff = float(np.max(np.abs(probs.astype(np.float64) - check.keras_probs)))
    agree = float(np.mean(probs.argmax(1) == check.keras_probs.argmax(1)))
    return {"max_abs_diff": diff, "top1_agreement": agree}


def _export_savedmodel(model, path: Path, check: _Check, log: Log) -> Artifact:
    from training.exported.loader import savedmodel_predictor  # noqa: PLC0415

    T = env.tf()
    h, w = model.input_shape[1:3]

    @T.function(input_signature=[T.TensorSpec([None, h, w, 3], T.float32, name="image")])
    def serve(image):
        return ood_scores.signature_outputs(model, image)

    with progress.step("writing the SavedModel", None):
        T.saved_model.save(model, str(path), signatures={"serving_default": serve})
        # hashed first, then loaded the way training.exported.loader.load loads it once the manifest exists
        digest = artifact_digest(path)
        predict = savedmodel_predictor(path, scored=check.ood is not None)
    outputs = predict(check.images)
    probs, scores = outputs if check.ood is not None else (outputs, None)
    parity = _compare(probs, check)
    _require_parity("SavedModel", parity)
    parity.update(ood_scores.score_parity(scores, check.ood))
    log(f"saved_model: max |Keras - SavedModel| {parity['max_abs_diff']:.2e}, top-1 agreement "
        f"{parity['top1_agreement']:.0%}{ood_scores.parity_note(parity)}")
    return Artifact(digest, tree_bytes(path), **parity)


def _require_parity(what: str, parity: dict[str, Any]) -> None:
    if parity["max_abs_diff"] > PARITY_TOLERANCE or parity["top1_agreement"] < 1.0:
        raise UserError(f"{what} disagrees with Keras (max |diff| {parity['max_abs_diff']:.2e}, top-1 agreement "
                        f"{parity['top1_agreement']:.1%}); export refused, nothing written")


def _export_onnx(model, staging: Path, check: _Check, opts: ExportOptions, log: Log) -> dict[str, Artifact]:
    import onnx  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    T = env.tf()
    h, w = model.input_shape[1:3]
    fp32_path = staging / table.BY_VARIANT["fp32"].file
    with progress.step("converting to ONNX", None), env._quiet_stderr_fd():  # tf2onnx logs every rewrite at INFO
        tf2onnx.convert.from_keras(model, input_signature=(T.TensorSpec((None, h, w, 3), T.float32, name="image"),),
                                   opset=opts.opset, output_path=str(fp32_path))
    proto = onnx.load(str(fp32_path))
    expected = ["probabilities"] + ([ood_scores.OUTPUT] if check.ood is not None else [])
    if [o.name for o in proto.graph.output] != expected:
        raise RuntimeError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}, not {expected}")
    onnx.checker.check_model(proto)

    out: dict[str, Artifact] = {}
    fp32: dict[str, Any] | None = None
    for fmt in table.ONNX:
        variant, file = fmt.variant, fmt.file
        if variant == "fp16" and not opts.fp16 or variant == "int8" and not opts.int8:
            continue
        path = staging / file
        if variant == "fp16":
            _to_fp16(fp32_path, path)
        elif variant == "int8":
            quantize_int8(fp32_path, path, check.calib_x)
        # opened as serving.sessions.load opens it once the manifest exists
        entry, scores = measure("ONNX", path, _onnx_runner, check, opts, fp32, log)
        if variant == "fp32":
            fp32 = scores
        if variant == "int8":
            entry.calibration_images = int(len(check.calib_x))
            entry.quantization = ("static QDQ, per-channel 7-bit int8 weights, uint8 activations, MinMax "
                                  "calibration; pixel preprocessing, softmax and the OOD score kept float32")
        if kept(entry, path, check, log):
            out[file] = entry
    return out


# pixels -> (probabilities, OOD scores or None): one exported file, opened
Runner = Callable[[np.ndarray], tuple[np.ndarray, Any]]


def _onnx_runner(path: Path) -> Runner:
    from serving.sessions import make_session  # noqa: PLC0415

    session, _ = make_session(path, device="cpu")

    def run(x: np.ndarray) -> tuple[np.ndarray, Any]:
        probs, *scores = session.run(None, {"image": x})
        return probs, scores[0] if scores else None

    return run


def measure(what: str, path: Path, open_file: Callable[[Path], Runner], check: _Check, opts: ExportOptions,
            fp32: dict[str, Any] | None, log: Log) -> tuple[Artifact, dict[str, Any]]:
    """(one written file's manifest entry, its test-split scores): hashed first, then opened; its parity
    with Keras on the check batch (the probabilities; an fp32 file must agree), the OOD score's parity,
    its test-split accuracy, recall and ECE, and for a variant (fp32 given) the gate against fp32."""
    digest = artifact_digest(path)
    run = open_file(path)
    probs, scores = run(check.images)
    parity = _compare(probs, check)
    if fp32 is None:
        _require_parity(what, parity)
    parity.update(ood_scores.score_parity(scores, check.ood))
    result = _test_scores(lambda x: run(x)[0], check, path.name)
    entry = Artifact(digest, path.stat().st_size, **parity, test_accuracy=result["accuracy"],
                     test_ece=result["ece"], test_per_class_recall=result["recall"])
    if fp32 is not None:
        entry.accuracy_delta = result["accuracy"] - fp32["accuracy"]
        entry.gate = gate(fp32, result, opts.max_accuracy_drop, opts.max_class_drop)
    delta = f", accuracy delta {entry.accuracy_delta:+.4f}" if entry.accuracy_delta is not None else ""
    log(f"{path.name}: {entry.bytes / 1e6:.2f} MB, max |Keras - {what}| {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.0%}, test accuracy {result['accuracy']:.4f}{delta}, "
        f"ECE {result['ece']:.4f}{ood_scores.parity_note(parity)}")
    return entry, result


def kept(entry: Artifact, path: Path, check: _Check, log: Log) -> bool:
    """Whether the gate kept a variant. Not kept: the file leaves the model folder, its figures stay in
    the manifest to say why."""
    if entry.gate is None or entry.gate["passed"]:
        return True
    path.unlink()
    entry.sha256 = None
    entry.kept = False
    check.rejected[path.name] = entry
    log(f"{path.name}: not kept: {entry.gate['reason']}")
    return False


def gate(reference: dict[str, Any], scores: dict[str, Any], max_accuracy_drop: float,
         max_class_drop: float) -> dict[str, Any]:
    """A variant's losses against fp32 in accuracy points (overall, and the worst class's recall) and
    which limit, if any, it crossed and by how much."""
    drop = 100 * (reference["accuracy"] - scores["accuracy"])
    class_drops = {name: 100 * (reference["recall"][name] - scores["recall"][name]) for name in reference["recall"]}
    worst = max(class_drops, key=class_drops.get) if class_drops else None
    worst_drop = class_drops[worst] if worst is not None else 0.0
    crossed = []
    if drop > max_accuracy_drop:
        crossed.append({"limit": "max_accuracy_drop", "limit_points": max_accuracy_drop, "drop_points": drop,
                        "over_by_points": drop - max_accuracy_drop})
    if worst is not None and worst_drop > max_class_drop:
        crossed.append({"limit": "max_class_drop", "limit_points": max_class_drop, "drop_points": worst_drop,
                        "class": worst, "over_by_points": worst_drop - max_class_drop})
    reason = "; ".join(
        f"{'accuracy' if c['limit'] == 'max_accuracy_drop' else 'recall of ' + repr(c['class'])} dropped "
        f"{c['drop_points']:.2f} points, over --{c['limit'].replace('_', '-')} {c['limit_points']:g} by "
        f"{c['over_by_points']:.2f}" for c in crossed)
    return {"passed": not crossed, "accuracy_drop_points": drop, "worst_class": worst,
            "worst_class_drop_points": worst_drop, "max_accuracy_drop": max_accuracy_drop,
            "max_class_drop": max_class_drop, "crossed": crossed, "reason": reason or None}


def _test_scores(predict: Callable[[np.ndarray], np.ndarray], check: _Check, file: str,
                 batch: int = 256) -> dict[str, Any]:
    """Accuracy, per-class recall and ECE of one file (pixels -> probabilities) over the run's whole test split."""
    from training.record import metrics  # noqa: PLC0415

    parts = [np.zeros((0, len(check.class_names)), np.float32)]
    with progress.step(f"test accuracy of {file}", len(check.test_y)) as advance:
        for start in range(0, len(check.test_y), batch):
            x = check.test_x[start:start + batch].astype(np.float32)
            parts.append(predict(x))
            advance(len(x))
    probs = np.concatenate(parts)
    matrix = metrics.confusion(check.test_y, probs.argmax(1), len(check.class_names))
    summary = metrics.summary(matrix, check.class_names)
    return {"accuracy": summary["accuracy"] or 0.0, "ece": metrics.ece(check.test_y, probs),
            "recall": {name: c["recall"] for name, c in summary["per_class"].items()}}


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx  # noqa: PLC0415
    from onnxconverter_common import float16  # noqa: PLC0415

    import warnings  # noqa: PLC0415

    # float32 inputs/outputs, float16 inside: clients send the same pixels as to every other file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one line per tiny weight clipped to fp16's range
        converted = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(converted, str(dst))


def float_nodes(model_path: Path) -> list[str]:
    """Nodes left float32 in the int8 model: the pixel preprocessing before the first convolution
    (layout, resize, rescale) and the softmax.

    In uint8 the resize ran 3x slower than in float (MobileNetV2 @96: 168 vs 56 us), and a uint8 softmax
    has 1/255 steps, so near-equal classes tie and argmax falls to the lowest index (an untrained
    MobileNetV2 agreed with float32 on 0% of top-1 answers). Keeping the first convolution float too
    was tried and dropped: the seed CNN, whose first convolution is a large share of its work, then ran
    its int8 file at 0.87x float32 speed."""
    import onnx  # noqa: PLC0415

    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    first_conv = next((i for i, n in enumerate(nodes) if n.op_type == "Conv"), 0)
    return ([n.name for n in nodes[:first_conv]] + [n.name for n in nodes if n.op_type == "Softmax"]
            + ood_scores.onnx_nodes(nodes))


def quantize_int8(src: Path, dst: Path, calib_x: np.ndarray, *, keep_float: bool = True,
                  reduce_range: bool = True) -> None:
    """Static QDQ quantization calibrated on training images (dynamic int8 runs these CNNs slower than fp32).

    reduce_range keeps weights to 7 bits. On x86 CPUs without VNNI, onnxruntime multiplies uint8 by int8
    with VPMADDUBSW, whose int16 pair sums saturate with full 8-bit weights: a trained CIFAR-10 CNN lost
    1.50 points that way on an AVX2-only EPYC and 0.13 points with 7-bit weights, at the same speed.
    The file may be served on any CPU, so it is always quantized the safe way.
    keep_float=False / reduce_range=False give the plain recipe benchmarks/int8_ablation.py compares against."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,  # noqa: PLC0415
                                          QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, advance, batch: int = 32):
            self._batches = iter([{"image": images[i:i + batch]} for i in range(0, len(images), batch)])
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
            quantize_static(str(prepared), str(dst), Reader(calib_x, advance), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, reduce_range=reduce_range,
                            nodes_to_exclude=float_nodes(prepared) if keep_float else [])
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in dst.parent.glob("*.onnx.data"):
            leftover.unlink(missing_ok=True)


def _manifest(run: records.Run, name: str, version: str, opts: ExportOptions, artifacts: dict[str, Artifact],
              check: _Check) -> Manifest:
    r = run.record
    h, w = r.data.image_size
    class_names = r.data.class_names
    return Manifest(
        schema=1,
        name=name,
        version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run=run.name,
        run_path=str(run.path.resolve()),
        class_names=class_names,
        input=InputSpec(name="image", shape=[None, h, w, 3], dtype="float32", range=[0, 255], layout="NHWC",
                        interpolation=r.data.interpolation or "bilinear"),
        output={"name": "probabilities", "shape": [None, len(class_names)]},
        backbone=r.model.backbone,
        strategy=r.model.strategy,
        tta=r.config.get("tta", "none"),
        test_accuracy=r.test.accuracy,
        params=r.model.total_params,
        export=ExportFacts(
            opset=opts.opset if "onnx" in opts.formats else None, formats=list(opts.formats),
            check_batch=int(len(check.images)), parity_tolerance=PARITY_TOLERANCE,
            check_informative=check.informative, check_output_spread=check.spread,
            versions=machine.package_versions(),
            # fp16/int8 against fp32 on the run's test split, in accuracy points.
            gate=Gate(max_accuracy_drop=opts.max_accuracy_drop, max_class_drop=opts.max_class_drop,
                      test_images=int(len(check.test_y)), rejected=check.rejected)),
        # each artifact's test_ece is that variant's own ECE on the test split
        calibration=r.calibration.to_dict() if r.calibration else None,
        artifacts=artifacts,
        bentoml_tag=f"{name}:{version}" if opts.register else None,
    )


def _register(name: str, version: str, folder: Path, manifest: Manifest) -> None:
    import bentoml  # noqa: PLC0415

    metadata = {"run": manifest.run, "backbone": manifest.backbone, "strategy": manifest.strategy,
                "test_accuracy": float(manifest.test_accuracy), "classes": manifest.num_classes}
    with bentoml.models.create(bentoml.Tag(name, version), labels={"tool": "tlserve"}, metadata=metadata) as ref:
        shutil.copytree(folder, ref.path, dirs_exist_ok=True)

