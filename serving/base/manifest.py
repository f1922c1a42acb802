"""Exported model folders: the typed manifest, where a folder keeps its files, finding folders, and
checking every file is the one exported.

No TensorFlow here: the service imports this.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from serving.base import storage
from serving.base.contract import Contract, optional
from serving.base.errors import UserError, nearest

MANIFEST = "manifest.json"
SCHEMA = 1


# ---- the manifest's contract ------------------------------------------------------------------
# serving.base.contract: a missing required key or a value of the wrong type is one UserError naming
# the file and the key; keys this version does not know are kept in `extra` and written back, so an
# older tlserve re-saving a newer manifest loses nothing. Figures that do not apply are optional():
# left out, not written as null.

@dataclass
class InputSpec(Contract):
    name: str
    shape: list              # [None, height, width, 3]
    dtype: str = "float32"
    range: list = field(default_factory=lambda: [0, 255])
    layout: str = "NHWC"
    interpolation: str = "bilinear"  # manifests before interpolation was recorded were bilinear

    @property
    def height(self) -> int:
        return int(self.shape[1])

    @property
    def width(self) -> int:
        return int(self.shape[2])

    @property
    def hw(self) -> tuple[int, int]:
        return self.height, self.width



@dataclass
class Artifact(Contract):
    """One exported file (or the SavedModel folder) with its digest and what the export measured on it.

    Optional figures are absent (None) where they do not apply: the SavedModel has no test accuracy,
    fp32 has no accuracy delta or gate."""
    sha256: Optional[str]    # None only for a variant the gate did not keep (its file is gone)
    bytes: int
    max_abs_diff: Optional[float] = optional()
    top1_agreement: Optional[float] = optional()
    # largest |log-probability difference| from Keras over the row's logit range (older exports: absent)
    max_logit_rel_diff: Optional[float] = optional()
    test_accuracy: Optional[float] = optional()
    test_ece: Optional[float] = optional()
    test_per_class_recall: Optional[dict] = optional()
    accuracy_delta: Optional[float] = optional()
    gate: Optional[dict] = optional()
    calibration_images: Optional[int] = optional()
    # int8: the calibration images' sampling, method and count per class
    calibration_set: Optional[dict] = optional()
    quantization: Optional[str] = optional()
    weight_bits: Optional[int] = optional()
    # int8: what stayed float32 ({"convolutions": k, "of_convolutions": n, "nodes": [...]})
    kept_float: Optional[dict] = optional()
    # int8: each quantization the accuracy fallback tried, in order, with the gate's figures
    int8_tries: Optional[list] = optional()
    # p50 ms against fp32 on the export machine: {"batch_1": {"fp32": ms, "int8": ms, "speedup": x}, ...}
    speed: Optional[dict] = optional()
    kept: Optional[bool] = optional()
    # The OOD score against Keras's on the check batch: max |diff| / threshold, same in/out verdicts.
    ood_max_rel_diff: Optional[float] = optional()
    ood_verdict_agreement: Optional[float] = optional()


@dataclass
class Gate(Contract):
    """The accuracy gate fp16/int8 passed through: its limits and the variants it did not keep."""
    max_accuracy_drop: float
    max_class_drop: float
    test_images: int
    rejected: dict[str, Artifact] = field(default_factory=dict)


@dataclass
class OodReference(Contract):
    """The out-of-distribution score the exported files give as their second output (training.exported.ood):
    how it is computed, its threshold (scores above it are out of distribution) and the validation
    distribution /metrics compares served images with. Absent in models exported before it existed."""
    method: str              # mahalanobis: squared distance to the nearest class mean / dims (a weighted sum
                             # of such terms when `terms` is given)
    output: str              # the model output that carries it (ood_score)
    feature_layer: str       # "+"-joined when the score sums terms on several layers
    dims: int
    threshold: float
    accept: float            # the share of validation images the threshold was set to accept
    val_accepted: float      # the share it does accept
    train_images: int        # the stratified training sample the class means and covariance came from
    val_images: int
    shrinkage: float         # Ledoit-Wolf's weight on the identity in the shared covariance
    normalized: Optional[bool] = optional()  # features scaled to unit length first (absent: exported before)
    rank: Optional[int] = optional()  # covariance directions kept apart; the others share one variance
    val_score_percentiles: dict = field(default_factory=dict)
    score_bins: list = field(default_factory=list)       # inner bin edges for the score's PSI
    score_reference: list = field(default_factory=list)  # validation share per bin
    class_reference: dict = field(default_factory=dict)  # validation share of each predicted class
    file: Optional[str] = optional()    # the reference (means, whitening) beside the manifest
    # Each term of a summed score: layer, dims, normalized, rank, shrinkage, weight (absent: one term, the
    # fields above; exported before 2026-12-05 or from a backbone without BackboneSpec.ood_layer).
    terms: Optional[list] = optional()
    sha256: Optional[str] = optional()

    def summary(self) -> dict[str, Any]:
        """What /metadata shows: everything but the drift reference's bins."""
        return {k: v for k, v in self.to_dict().items() if k not in ("score_bins", "score_reference")}


@dataclass
class ExportFacts(Contract):
    opset: Optional[int] = None  # None without onnx
    formats: list = field(default_factory=list)
    check_batch: Optional[int] = optional()
    check_classes: Optional[dict] = optional()   # test images per class in the check batch (older exports: absent)
    parity_tolerance: Optional[float] = optional()
    parity_compared: Optional[str] = optional()  # what parity_tolerance bounds (absent: max |probability diff|)
    # the export machine's CPU and whether it has int8 dot-product instructions (VNNI / AMX)
    isa: Optional[dict] = optional()
    check_informative: bool = True  # False: every check image gave the same output, so parity says little
    check_output_spread: Optional[float] = optional()
    versions: Optional[dict] = optional()
    gate: Optional[Gate] = optional()


@dataclass
class Manifest(Contract):
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
    run_path: Optional[str] = optional()
    output: Optional[dict] = optional()
    tta: str = "none"  # flip: every image is run twice (it and its mirror)
    params: Optional[int] = optional()
    export: Optional[ExportFacts] = optional()
    # The temperature baked into the model at training (training.fit.calibration), or None.
    calibration: Optional[dict] = None
    bentoml_tag: Optional[str] = None  # None: --no-register
    # The OOD score's reference and threshold; None in a model exported before it (no score output).
    ood: Optional[OodReference] = optional()

    SCHEMA = SCHEMA
    KIND = "manifest"
    FILE = MANIFEST
    # JSON key order as export has always written it
    ORDER = ("schema", "name", "version", "created_at", "run", "run_path", "class_names", "input", "output",
             "backbone", "strategy", "tta", "test_accuracy", "params", "export", "calibration", "ood",
             "artifacts", "bentoml_tag")

    @classmethod
    def load(cls, model_dir: Path) -> "Manifest":
        path = Path(model_dir) / MANIFEST
        if not path.is_file():
            raise UserError(f"{model_dir} is not an exported model (no {MANIFEST}); run `tlserve export RUN` first")
        return cls.read(path)

    def save(self, model_dir: Path) -> Path:
        return self.write(Path(model_dir) / MANIFEST)

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
