"""Exported model folders: the typed manifest, where a folder keeps its files, finding folders, and
checking every file is the one exported.

No TensorFlow here: the service imports this.
"""
from __future__ import annotations

import hashlib
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Union

from serving.base import storage
from serving.base.errors import UserError, nearest

MANIFEST = "manifest.json"
SCHEMA = 1


# ---- the manifest's contract ------------------------------------------------------------------
# Every class reads its own JSON object: a missing required key or a value of the wrong type is one
# UserError naming the file and the key; keys this version does not know are kept in `extra` and
# written back, so an older tlserve re-saving a newer manifest loses nothing.

@dataclass
class InputSpec:
    name: str
    shape: list              # [None, height, width, 3]
    dtype: str = "float32"
    range: list = field(default_factory=lambda: [0, 255])
    layout: str = "NHWC"
    interpolation: str = "bilinear"  # manifests before interpolation was recorded were bilinear
    extra: dict = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.shape[1])

    @property
    def width(self) -> int:
        return int(self.shape[2])

    @property
    def hw(self) -> tuple[int, int]:
        return self.height, self.width

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)


@dataclass
class Artifact:
    """One exported file (or the SavedModel folder) with its digest and what the export measured on it.

    Optional figures are absent (None) where they do not apply: the SavedModel has no test accuracy,
    fp32 has no accuracy delta or gate."""
    sha256: Optional[str]    # None only for a variant the gate did not keep (its file is gone)
    bytes: int
    max_abs_diff: Optional[float] = None
    top1_agreement: Optional[float] = None
    test_accuracy: Optional[float] = None
    test_ece: Optional[float] = None
    test_per_class_recall: Optional[dict] = None
    accuracy_delta: Optional[float] = None
    gate: Optional[dict] = None
    calibration_images: Optional[int] = None
    quantization: Optional[str] = None
    kept: Optional[bool] = None
    # The OOD score against Keras's on the check batch: max |diff| / threshold, same in/out verdicts.
    ood_max_rel_diff: Optional[float] = None
    ood_verdict_agreement: Optional[float] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Gate:
    """The accuracy gate fp16/int8 passed through: its limits and the variants it did not keep."""
    max_accuracy_drop: float
    max_class_drop: float
    test_images: int
    rejected: dict[str, Artifact] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class OodReference:
    """The out-of-distribution score the exported files give as their second output (training.exported.ood):
    how it is computed, its threshold (scores above it are out of distribution) and the validation
    distribution /metrics compares served images with. Absent in models exported before it existed."""
    method: str              # mahalanobis: squared distance to the nearest class mean / dims
    output: str              # the model output that carries it (ood_score)
    feature_layer: str
    dims: int
    threshold: float
    accept: float            # the share of validation images the threshold was set to accept
    val_accepted: float      # the share it does accept
    train_images: int        # the stratified training sample the class means and covariance came from
    val_images: int
    shrinkage: float         # Ledoit-Wolf's weight on the identity in the shared covariance
    rank: Optional[int] = None  # covariance directions kept apart; the others share one variance
    val_score_percentiles: dict = field(default_factory=dict)
    score_bins: list = field(default_factory=list)       # inner bin edges for the score's PSI
    score_reference: list = field(default_factory=list)  # validation share per bin
    class_reference: dict = field(default_factory=dict)  # validation share of each predicted class
    file: Optional[str] = None    # the reference (means, whitening) beside the manifest
    sha256: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What /metadata shows: everything but the drift reference's bins."""
        out = _dump(self)
        return {k: v for k, v in out.items() if k not in ("score_bins", "score_reference")}


@dataclass
class ExportFacts:
    opset: Optional[int] = field(default=None, metadata={"keep_none": True})  # None without onnx
    formats: list = field(default_factory=list)
    check_batch: Optional[int] = None
    parity_tolerance: Optional[float] = None
    check_informative: bool = True  # False: every check image gave the same output, so parity says little
    check_output_spread: Optional[float] = None
    versions: Optional[dict] = None
    gate: Optional[Gate] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """models/<name>/manifest.json: what the service, predict, bench, eval and compare know of a model."""
    name: str
    version: str
    run: str
    class_names: list
    input: InputSpec
    backbone: str
    strategy: str
    test_accuracy: float
    artifacts: dict[str, Artifact]
    schema: int = SCHEMA
    created_at: str = ""
    run_path: Optional[str] = None
    output: Optional[dict] = None
    tta: str = "none"  # flip: every image is run twice (it and its mirror)
    params: Optional[int] = None
    export: Optional[ExportFacts] = None
    # The temperature baked into the model at training (training.fit.calibration), or None.
    calibration: Optional[dict] = field(default=None, metadata={"keep_none": True})
    bentoml_tag: Optional[str] = field(default=None, metadata={"keep_none": True})  # None: --no-register
    # The OOD score's reference and threshold; None in a model exported before it (no score output).
    ood: Optional[OodReference] = None
    extra: dict = field(default_factory=dict)

    # JSON key order as export has always written it
    ORDER = ("schema", "name", "version", "created_at", "run", "run_path", "class_names", "input", "output",
             "backbone", "strategy", "tta", "test_accuracy", "params", "export", "calibration", "ood",
             "artifacts", "bentoml_tag")

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> "Manifest":
        return _build(cls, data, source, "")

    def to_dict(self) -> dict[str, Any]:
        out = _dump(self)
        return {**{k: out[k] for k in self.ORDER if k in out}, **{k: v for k, v in out.items() if k not in self.ORDER}}

    @classmethod
    def load(cls, model_dir: Path) -> "Manifest":
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"{model_dir} is not an exported model (no {MANIFEST}); run `tlserve export RUN` first")
        try:
            data = storage.read_json(path)
        except ValueError:
            raise UserError(f"{path} is not valid JSON") from None
        return cls.from_dict(data, str(path))

    def save(self, model_dir: Path) -> Path:
        path = Path(model_dir) / MANIFEST
        storage.write_json(path, self.to_dict())
        return path

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def temperature(self) -> float | None:
        return (self.calibration or {}).get("temperature")

    @property
    def rejected(self) -> dict[str, Artifact]:
        """Variants the accuracy gate did not keep (their figures stay to say why)."""
        gate = self.export.gate if self.export else None
        return gate.rejected if gate else {}

    @property
    def keras_path(self) -> Path | None:
        """The run's model.keras, which export compared every file against (not itself an artifact)."""
        return Path(self.run_path) / "model.keras" if self.run_path else None


def _is_optional(f) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    names = []
    for a in args:
        origin = typing.get_origin(a) or a
        names.append("an object" if origin is dict or is_dataclass(origin) else
                     "a list" if origin is list else "a number" if origin in (int, float) else
                     "true or false" if origin is bool else "a string" if origin is str else str(origin))
    return " or ".join(dict.fromkeys(names)) + (" or null" if _is_union(hint) and type(None) in typing.get_args(hint) else "")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _fits(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if is_dataclass(origin):
        return isinstance(value, dict)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _convert(value: Any, hint: Any, source: str, where: str) -> Any:
    if _is_union(hint):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None) and _fits(value, a))
    origin = typing.get_origin(hint) or hint
    if is_dataclass(origin):
        return _build(origin, value, source, where + ".")
    args = typing.get_args(hint)
    if origin is dict and len(args) == 2 and is_dataclass(args[1]):
        return {k: _build(args[1], v, source, f"{where}.{k}.") if _fits(v, args[1])
                else _wrong(source, f"{where}.{k}", v, args[1]) for k, v in value.items()}
    return value


def _wrong(source: str, key: str, value: Any, hint: Any):
    raise UserError(f"{source}: key '{key}' should be {_describe(hint)}, not {type(value).__name__}")


def _build(cls, data: Any, source: str, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{source}: {'key ' + repr(prefix.rstrip('.')) if prefix else 'the manifest'} should be "
                        f"an object, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "extra":
            continue
        key = prefix + f.name
        if f.name not in data:
            if not _is_optional(f):
                raise UserError(f"{source}: missing key '{key}'")
            continue
        value = data[f.name]
        if not _fits(value, hints[f.name]):
            _wrong(source, key, value, hints[f.name])
        kwargs[f.name] = _convert(value, hints[f.name], source, key)
    known = {f.name for f in fields(cls)}
    return cls(**kwargs, extra={k: v for k, v in data.items() if k not in known})


def _dump(obj: Any) -> Any:
    """A dataclass back to the JSON object it came from: optional figures that are None are left out
    (they did not apply), unless None itself is the stored fact (keep_none)."""
    if is_dataclass(obj):
        out = {}
        for f in fields(obj):
            if f.name == "extra":
                continue
            value = getattr(obj, f.name)
            if value is None and _is_optional(f) and not f.metadata.get("keep_none"):
                continue
            out[f.name] = _dump(value)
        return {**out, **obj.extra}
    if isinstance(obj, dict):
        return {k: _dump(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_dump(v) for v in obj]
    return obj


# ---- a model folder's layout ----------------------------------------------------------------

@dataclass(frozen=True)
class ModelFolder:
    """Where an exported model keeps its files: the manifest, the artifacts, and the results that
    `tlserve bench` (bench/) and `tlserve eval` (eval/<timestamp>/) store beside them."""
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def bench_dir(self) -> Path:
        return self.path / "bench"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    def is_export(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> Manifest:
        return Manifest.load(self.path)

    def bench_results(self, kind: str = "inprocess") -> list[Path]:
        """Stored `tlserve bench` results of one kind (inprocess | http), oldest first."""
        return sorted(self.bench_dir.glob(f"{kind}-*.json")) if self.bench_dir.is_dir() else []

    def eval_results(self) -> list[Path]:
        """Every stored `tlserve eval`'s metrics.json."""
        return sorted(self.eval_dir.glob("*/metrics.json")) if self.eval_dir.is_dir() else []


# ---- checking files against the manifest -------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(root: Path) -> str:
    """One digest over a folder: sorted relative paths and contents (a SavedModel is a folder)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def artifact_digest(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def verify_artifacts(model_dir: Path, manifest: Manifest, files: list[str] | None = None) -> None:
    """Refuse a model folder whose files differ from what export wrote, naming the file."""
    for name in files or list(manifest.artifacts):
        artifact = manifest.artifacts.get(name)
        path = Path(model_dir) / name
        if artifact is None or artifact.sha256 is None:
            raise UserError(f"{name} is not part of the export in {model_dir}")
        if not path.exists():
            raise UserError(f"{path} is missing")
        if artifact_digest(path) != artifact.sha256:
            raise UserError(f"{path} does not match its sha256 in {MANIFEST}; refusing to load a modified model")


# ---- finding model folders -----------------------------------------------------------------

def resolve_model(ref: str, models_dir: Path | None = None) -> Path:
    """A model folder from a path, a name under models/, or a BentoML model tag (name:version)."""
    candidate = Path(ref)
    if (candidate / MANIFEST).is_file():
        return candidate
    local = storage.models_dir(models_dir) / ref
    if (local / MANIFEST).is_file():
        return local
    if ":" in ref or os.environ.get("TLSERVE_MODEL_STORE", "1") != "0":
        path = _from_bento_store(ref)
        if path is not None:
            return path
    known = list_local(models_dir)
    raise UserError(f"no exported model '{ref}' (looked in {storage.models_dir(models_dir)} and the BentoML model store)"
                    f"{nearest(ref, known)}")


def local_folders(models_dir: Path | None = None) -> list[ModelFolder]:
    root = storage.models_dir(models_dir)
    if not root.is_dir():
        return []
    # dot-folders are exports being staged (serving.base.storage.staged_dir)
    return [f for f in (ModelFolder(d) for d in sorted(root.iterdir(), key=lambda d: d.name))
            if not f.path.name.startswith(".") and f.is_export()]


def list_local(models_dir: Path | None = None) -> list[str]:
    return [f.path.name for f in local_folders(models_dir)]


def _from_bento_store(ref: str) -> Path | None:
    try:
        import bentoml  # noqa: PLC0415
        from bentoml.exceptions import BentoMLException, NotFound  # noqa: PLC0415
    except ImportError:
        return None
    try:
        model = bentoml.models.get(ref)
    except (NotFound, BentoMLException, ValueError):
        return None
    path = Path(model.path)
    return path if (path / MANIFEST).is_file() else None
