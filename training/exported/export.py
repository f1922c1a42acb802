"""`tlserve export`: a finished run → models/<name>/ with SavedModel, ONNX (fp32, optional fp16 and
int8), a manifest, and the same files registered in the BentoML model store.

Parity is measured, not assumed: one check batch of real images goes through Keras, the SavedModel
and every ONNX file, and the export fails when fp32 disagrees.
"""
from __future__ import annotations

import re
import secrets
import shutil
import time
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
from training.exported import int8 as quant
from training.exported.options import ExportOptions
from training.exported import ood as ood_scores

FORMATS = table.EXPORT_FORMATS  # savedmodel, onnx
# Parity compares log-probabilities, i.e. the logits up to each row's own constant, relative to the size of
# that row's Keras logits: a temperature baked into the model scales the logits and their rounding errors
# alike, so the bound holds for any temperature (a fixed bound on probabilities refused a right ResNet50V2
# with T = 0.232, issue 29). float32 rounds each layer's sums to a few EPS of their size;
# PARITY_ULPS_PER_LAYER per weighted layer leaves room for runtimes summing in other orders.
FLOAT32_EPS = float(np.finfo(np.float32).eps)
PARITY_ULPS_PER_LAYER = 256  # 64 refused a right ResNet50V2 @96 on an EPYC Zen 4 (5.3e-4 against 4.1e-4)
# Probabilities below exp(-80) sit near float32's underflow (denormals, then 0), where their logarithm
# says little: an entry is compared where either runtime gives it more.
LOG_VISIBLE = -80.0
PARITY_COMPARED = ("log-probabilities (logits up to a per-row constant) of the check batch where either side "
                   "exceeds exp(-80), relative to the row's largest |Keras logit|; and top-1 answers")
Log = Callable[[str], None]


@dataclass
class _Check:
    images: np.ndarray
    keras_probs: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    calib_x: np.ndarray
    class_names: list[str] = field(default_factory=list)
    check_y: np.ndarray | None = None
    calib_y: np.ndarray | None = None
    seed: int = 0
    parity_tolerance: float = 0.0
    logit_scale: np.ndarray | None = None  # per check image: its largest |Keras logit| (see logit_scale)
    fp32_scores: dict[str, Any] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, Artifact] = field(default_factory=dict)  # variants the accuracy gate did not keep
    data: Any = None  # the run's dataset (training.data.sources), for the OOD reference
    ood: ood_scores.Fitted | None = None

    def __post_init__(self) -> None:
        if self.logit_scale is None:
            self.logit_scale = _spread(np.asarray(self.keras_probs))

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
    if opts.int8_budget.tries < 1 or not opts.int8_budget.seconds > 0:
        raise UserError("--int8-tries must be at least 1 and --int8-seconds above 0")
    if opts.ood:
        ood_scores.check_options(opts.ood_accept, opts.ood_images)
    name = bento_name(opts.name or run.name)
    if opts.name and name != opts.name:
        # A name the user typed is used as typed or refused: `../x` or `a/b` must not land elsewhere.
        raise UserError(f"--name '{opts.name}': a model name is lowercase letters, digits, '.', '_' and '-' "
                        f"(starting and ending with a letter or digit), at most 60 characters; e.g. '{name}'")
    if not opts.name and name != run.name:  # a --name is used as typed (or refused above): nothing was changed
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
    """The check batch (test split) and the int8 calibration set (training split), each a stratified,
    seeded sample (training.data.sources.balanced_sample): folder data comes class-sorted, so the first
    N images would all be one class."""
    from training.data.sources import balanced_sample, load_dataset  # noqa: PLC0415

    data = load_dataset(DataConfig(**run.record.config["data"]))
    class_names = list(run.record.data.class_names)
    seed = int(run.record.config.get("seed", 0) or 0)
    check_at = balanced_sample(data.test.y, max(opts.check_images, len(class_names)), seed)
    images = data.test.x[check_at].astype(np.float32)
    keras_probs = model.predict(images, verbose=0)
    scale = logit_scale(model, images, keras_probs)
    calib_at = balanced_sample(data.train.y, calibration_size(opts, len(class_names)), seed)
    return _Check(images, keras_probs, data.test.x, data.test.y, data.train.x[calib_at].astype(np.float32),
                  class_names, check_y=data.test.y[check_at], calib_y=data.train.y[calib_at], seed=seed, logit_scale=scale,
                  parity_tolerance=parity_tolerance(weighted_layers(model)), data=data)


def calibration_size(opts: ExportOptions, classes: int) -> int:
    """opts.calibration_per_class images of every class, and at least opts.calibration_images in all."""
    return max(opts.calibration_images, opts.calibration_per_class * classes)


def class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {name: int(np.sum(labels == i)) for i, name in enumerate(class_names)}


def _fit_ood(model, run: records.Run, check: _Check, opts: ExportOptions, log: Log):
    """(the OOD reference, the model with its score as a second output) — the model every file is written from."""
    data = check.data
    fitted, scored = ood_scores.fit_for_export(
        model, (data.train.x, data.train.y), (data.val.x, data.val.y), check.images, check.class_names,
        accept=opts.ood_accept, images=opts.ood_images, seed=int(run.record.config.get("seed", 0)),
        tap=_ood_layer(run))
    e = fitted.entry
    log(f"OOD score: {e.method} on {e.feature_layer} ({e.dims} features) of {e.train_images} training images "
        f"(shrinkage {e.shrinkage:.3f}); threshold {e.threshold:.4g} accepts {e.val_accepted:.1%} of {e.val_images} validation images")
    return fitted, scored


def _ood_layer(run: records.Run) -> str | None:
    """The backbone's mid-level layer for the OOD score (None: an unknown or CNN backbone)."""
    from training.model import backbones  # noqa: PLC0415

    spec = backbones.REGISTRY.get(str(run.record.config.get("backbone", "")))
    return spec.ood_layer if spec is not None else None


def _compare(probs: np.ndarray, check: _Check) -> dict[str, Any]:
    """How far a runtime's answers are from Keras's on the check batch (see PARITY_COMPARED)."""
    probs = probs.astype(np.float64)
    diff = float(np.max(np.abs(probs - check.keras_probs))) if probs.size else 0.0
    keras_lp, lp = _log_probs(check.keras_probs), _log_probs(probs)
    visible = np.maximum(keras_lp, lp) > LOG_VISIBLE
    scale = check.logit_scale[:, None]
    rel = float(np.max(np.where(visible, np.abs(lp - keras_lp) / scale, 0.0))) if probs.size else 0.0
    agree = probs.argmax(1) == check.keras_probs.argmax(1)
    # A row whose two best classes Keras itself tells apart by less than the bound may flip legitimately.
    top2 = np.sort(keras_lp, axis=1)[:, -2:] if keras_lp.shape[1] > 1 else np.zeros((len(probs), 2))
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * check.parity_tolerance * scale[:, 0]
    return {"max_abs_diff": diff, "top1_agreement": float(np.mean(agree)) if len(agree) else 1.0,
            "max_logit_rel_diff": rel, "top1_disagree_untied": int(np.sum(~agree & ~tie))}


def _stored(parity: dict[str, Any]) -> dict[str, Any]:
    """The parity figures an artifact keeps in the manifest."""
    return {k: parity[k] for k in ("max_abs_diff", "top1_agreement", "max_logit_rel_diff")}


def _spread(probs: np.ndarray) -> np.ndarray:
    lp = _log_probs(probs)
    return np.maximum(lp.max(1) - np.maximum(lp.min(1), LOG_VISIBLE), 1.0)


def _log_probs(probs: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(probs.astype(np.float64), np.finfo(np.float64).tiny))


def logit_scale(model, images: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per check image, the largest |logit| Keras computes (the classifier's pre-softmax outputs, in
    float64 from its inputs): the size float32's rounding errors grow with. A model without tlserve's
    Dense classifier falls back to the spread of its log-probabilities."""
    from training.fit.calibration import classifier_layer  # noqa: PLC0415

    K = env.keras()
    try:
        layer = classifier_layer(model)
        features = K.Model(model.inputs, layer.input).predict(images, verbose=0).astype(np.float64)
    except (RuntimeError, ValueError, AttributeError):
        return _spread(probs)
    kernel, bias = (w.astype(np.float64) for w in layer.get_weights()[:2])
    return np.maximum(np.abs(features @ kernel + bias).max(1), 1.0)


def parity_tolerance(depth: int) -> float:
    """The bound on max_logit_rel_diff for a model with `depth` weighted layers (see PARITY_ULPS_PER_LAYER)."""
    return FLOAT32_EPS * PARITY_ULPS_PER_LAYER * max(depth, 1)


def weighted_layers(model) -> int:
    """Kernels in the model, nested backbones included: the sums float32 rounds along the way."""
    return sum(1 for w in model.weights if w.name.split("/")[-1].split(":")[0] in ("kernel", "depthwise_kernel"))


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
    _require_parity("SavedModel", parity, check.parity_tolerance)
    ood_parity = ood_scores.score_parity(scores, check.ood)
    log(f"saved_model: max |Keras - SavedModel| {parity['max_abs_diff']:.2e}, top-1 agreement "
        f"{parity['top1_agreement']:.0%}{ood_scores.parity_note(ood_parity)}")
    return Artifact(digest, tree_bytes(path), **_stored(parity), **ood_parity)


def _require_parity(what: str, parity: dict[str, Any], tolerance: float) -> None:
    if parity["max_logit_rel_diff"] > tolerance or parity["top1_disagree_untied"]:
        raise UserError(f"{what} disagrees with Keras: log-probabilities differ by up to "
                        f"{parity['max_logit_rel_diff']:.2e} of the row's largest |Keras logit| (bound {tolerance:.1e}), top-1 "
                        f"agreement {parity['top1_agreement']:.1%} (max |probability diff| {parity['max_abs_diff']:.2e}); "
                        "export refused, nothing written")


def _export_onnx(model, staging: Path, check: _Check, opts: ExportOptions, log: Log) -> dict[str, Artifact]:
    """model.onnx, then each variant asked for (one function per variant in VARIANTS), each measured
    against fp32 and kept only if the accuracy gate passes it."""
    fp32_path = staging / table.BY_VARIANT["fp32"].file
    out = {fp32_path.name: _export_fp32(model, fp32_path, check, opts, log)}
    for variant, make in VARIANTS.items():
        if not getattr(opts, variant):
            continue
        path = staging / table.BY_VARIANT[variant].file
        entry = make(fp32_path, path, check, opts, log)
        if kept(entry, path, check, log):
            out[path.name] = entry
    return out


def _export_fp32(model, path: Path, check: _Check, opts: ExportOptions, log: Log) -> Artifact:
    import onnx  # noqa: PLC0415
    import tf2onnx  # noqa: PLC0415

    T = env.tf()
    h, w = model.input_shape[1:3]
    with progress.step("converting to ONNX", None), env._quiet_stderr_fd():  # tf2onnx logs every rewrite at INFO
        tf2onnx.convert.from_keras(model, input_signature=(T.TensorSpec((None, h, w, 3), T.float32, name="image"),),
                                   opset=opts.opset, output_path=str(path))
    proto = onnx.load(str(path))
    expected = ["probabilities"] + ([ood_scores.OUTPUT] if check.ood is not None else [])
    if [o.name for o in proto.graph.output] != expected:
        raise RuntimeError(f"unexpected ONNX outputs {[o.name for o in proto.graph.output]}, not {expected}")
    onnx.checker.check_model(proto)
    entry, check.fp32_scores = measure("ONNX", path, _onnx_runner, check, opts, None, log)
    return entry


def _export_fp16(fp32_path: Path, path: Path, check: _Check, opts: ExportOptions, log: Log) -> Artifact:
    _to_fp16(fp32_path, path)
    entry, _ = measure("ONNX", path, _onnx_runner, check, opts, check.fp32_scores, log)
    return entry


def _export_int8(fp32_path: Path, path: Path, check: _Check, opts: ExportOptions, log: Log) -> Artifact:
    """The int8 recipe (training.exported.int8) with its fallback: while the gate refuses the file, quantize
    again keeping more of the first convolutions float, within opts.int8_budget; then time the chosen
    file against fp32 at batch 1 and 32 so the table shows whether it still pays."""
    from serving.sessions import make_session  # noqa: PLC0415

    convs = len(quant.conv_nodes(fp32_path))

    def attempt(float_convs: int) -> quant.Attempt:
        started = time.monotonic()
        target = path.with_name(f"{path.stem}.try{float_convs}.onnx")
        kept_float = quant.quantize_int8(fp32_path, target, check.calib_x, float_convs=float_convs)
        entry, _ = measure("ONNX", target, _onnx_runner, check, opts, check.fp32_scores, log,
                           label=f"{path.name} ({_float_label(float_convs, convs)})")
        entry.calibration_images = int(len(check.calib_x))
        entry.calibration_set = _calibration_set(check)
        entry.quantization = quant.describe(float_convs, convs)
        entry.weight_bits = quant.WEIGHT_BITS
        entry.kept_float = {"convolutions": float_convs, "of_convolutions": convs, "nodes": kept_float}
        return quant.Attempt(float_convs, target, bool(entry.gate["passed"]), entry, time.monotonic() - started)

    tries = quant.search(attempt, convs, opts.int8_budget, log)
    best = quant.chosen(tries)
    for t in tries:
        if t is best:
            t.path.replace(path)
        else:
            t.path.unlink(missing_ok=True)
    entry = best.facts
    entry.sha256 = artifact_digest(path)  # the same bytes, under the file's final name
    entry.int8_tries = [{"float_convolutions": t.float_convs, "passed": t.passed, "seconds": round(t.seconds, 1),
                         "accuracy_drop_points": t.facts.gate["accuracy_drop_points"],
                         "worst_class": t.facts.gate["worst_class"],
                         "worst_class_drop_points": t.facts.gate["worst_class_drop_points"]} for t in tries]
    sessions = {"fp32": make_session(fp32_path, device="cpu")[0], "int8": make_session(path, device="cpu")[0]}
    with progress.step("timing int8 against fp32", None):
        timed = quant.speed(sessions, check.images)
    entry.speed = {batch: {**ms, "speedup": ms["fp32"] / ms["int8"]} for batch, ms in timed.items()}
    log(f"{path.name}: {_float_label(best.float_convs, convs)}; " + ", ".join(
        f"{b.replace('_', ' ')} {v['int8']:.2f} ms vs fp32 {v['fp32']:.2f} ms ({v['speedup']:.2f}x)"
        for b, v in entry.speed.items()))
    return entry


def _float_label(float_convs: int, convs: int) -> str:
    return f"first {float_convs} of {convs} convolutions float" if float_convs else "every convolution int8"


def _calibration_set(check: _Check) -> dict[str, Any]:
    return {"images": int(len(check.calib_x)), "method": f"{quant.CALIBRATION_METHOD} over the training split",
            "sampling": f"stratified, seeded (training.data.sources.balanced_sample, seed {check.seed})",
            "class_counts": class_counts(check.calib_y, check.class_names)}


VARIANTS: dict[str, Callable[[Path, Path, _Check, ExportOptions, Log], Artifact]] = {
    "fp16": _export_fp16, "int8": _export_int8}


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
            fp32: dict[str, Any] | None, log: Log, *, label: str | None = None) -> tuple[Artifact, dict[str, Any]]:
    """(one written file's manifest entry, its test-split scores), for every format (ONNX, TFLite): hashed
    first, then opened; its parity with Keras on the check batch (an fp32 file must agree), the OOD
    score's parity, its test-split accuracy, recall and ECE, and for a variant (fp32 given) the gate
    against fp32's scores."""
    digest = artifact_digest(path)
    run = open_file(path)
    probs, scores = run(check.images)
    parity = _compare(probs, check)
    if fp32 is None:
        _require_parity(what, parity, check.parity_tolerance)
    ood_parity = ood_scores.score_parity(scores, check.ood)
    label = label or path.name
    result = _test_scores(lambda x: run(x)[0], check, label)
    entry = Artifact(digest, path.stat().st_size, **_stored(parity), **ood_parity, test_accuracy=result["accuracy"],
                     test_ece=result["ece"], test_per_class_recall=result["recall"])
    if fp32 is not None:
        entry.accuracy_delta = result["accuracy"] - fp32["accuracy"]
        entry.gate = gate(fp32, result, opts.max_accuracy_drop, opts.max_class_drop)
    delta = f", accuracy delta {entry.accuracy_delta:+.4f}" if entry.accuracy_delta is not None else ""
    log(f"{label}: {entry.bytes / 1e6:.2f} MB, max |Keras - {what}| {parity['max_abs_diff']:.2e}, "
        f"top-1 agreement {parity['top1_agreement']:.0%}, test accuracy {result['accuracy']:.4f}{delta}, "
        f"ECE {result['ece']:.4f}{ood_scores.parity_note(ood_parity)}")
    return entry, result


def kept(entry: Artifact, path: Path, check: _Check, log: Log) -> bool:
    """Whether the gate kept a variant. Not kept: the file leaves the model folder, its figures stay in
    the manifest to say why."""
    if entry.gate is None or entry.gate["passed"]:
        return True
    path.unlink(missing_ok=True)
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


def _manifest(run: records.Run, name: str, version: str, opts: ExportOptions, artifacts: dict[str, Artifact],
              check: _Check) -> Manifest:
    r = run.record
    h, w = r.data.image_size
    class_names = r.data.class_names
    return Manifest(
        schema=Manifest.SCHEMA,
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
            check_batch=int(len(check.images)), check_classes=class_counts(check.check_y, check.class_names),
            parity_tolerance=check.parity_tolerance, parity_compared=PARITY_COMPARED, isa=machine.int8_isa(),
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

