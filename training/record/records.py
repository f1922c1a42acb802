"""Run records: `runs/<name>/record.json` and the files beside it.

A finished run folder holds:
  record.json    a RunRecord (below; written last: its presence means finished)
  history.csv    one row per epoch: epoch, phase, loss, accuracy, val_loss, val_accuracy, seconds, lr (the rate at the epoch's last step)
  model.keras    the trained tf-keras model (load with training.model.build.load_model)
  checkpoint/     TensorFlow checkpoint (model + optimizer) after the last completed epoch
  curves.png     accuracy / loss per epoch

record.json (schema 1) is `RunRecord.to_dict()`: the dataclasses below are its schema, one field per key,
built in one place (`build`), so the schema and the written record cannot drift apart (a key the classes do
not declare fails `build`; tests/test_records.py compares a real run's keys with the fields). Records written
by earlier versions load with `RunRecord.from_dict` (serving.base.contract): a field newer than some records
(e.g. test.macro_f1, calibration, data_check) defaults to None there, and readers treat it as missing, not as 0;
a key this version does not know is kept; a missing required key or a value of the wrong type is one line
naming the file and the key. Either way the dict written back is the dict read.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serving.base import storage
from serving.base.contract import Contract, optional
from serving.base.errors import UserError

SCHEMA = 1
RECORD = "record.json"
HISTORY = "history.csv"
MODEL = "model.keras"
CURVES = "curves.png"
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")
# Seed 001's CSV columns, then ours.
TABLE_FIELDS = ("model", "epochs", "avg_epoch_time_sec", "total_time_sec", "test_accuracy",
                "trainable_params", "non_trainable_params", "epochs_to_target", "macro_f1")


# ---- the schema ------------------------------------------------------------------------------
# serving.base.contract is the mechanism (type checks on load, unknown keys kept, absent keys left
# absent, None written as null except optional() facts); these classes are the record's shape.


class _Section(Contract):
    """One dict of the record as a dataclass (serving.base.contract.Contract: `extra` keeps keys this version
    does not declare and `absent` the declared keys the file lacked, so `from_dict(d).to_dict() == d`)."""
    FILE = RECORD
    KIND = "run record"


@dataclass(kw_only=True)
class DataFacts(_Section):
    source: str                          # where the images came from (a folder, cifar10's cache, "synthetic")
    class_names: list[str]               # index order: the model's output order
    num_classes: int
    image_size: list[int]                # [h, w] the images are resized to before the model
    interpolation: str | None = None     # Pillow's resize filter name (older records: bilinear)
    splits: dict[str, int]               # {train, val, test}: images per split, after any --drop-leaks
    train_class_counts: dict[str, int] | None = None  # {class: n} in the train split (class weights, the imbalance warning)
    skipped: list[str]                   # file names that would not decode
    spec: str                            # the --data spec
    seed: int                            # the split seed
    # --exclude FILE: {list, listed, count, train_before, files [train ids removed], held_out, not_found}
    excluded: dict[str, Any] | None = optional()


@dataclass(kw_only=True)
class ModelFacts(_Section):
    backbone: str
    strategy: str                        # scratch / frozen / finetune
    weights: str | None                  # the backbone's weights ("imagenet", a file, or None)
    from_run: str | None = None          # the run whose model this one continued
    input_shape: list[int]               # [h, w, 3]
    input_dtype: str                     # "float32"
    input_range: list[int]               # [0, 255]: scaling happens inside the model
    input_size: int                      # the backbone's own input side (resize inside the model)
    interpolation: str | None = None     # as data.interpolation
    # training.model.build.facts: Keras's own counts
    layers: int
    depth: int                           # leaf layers
    weighted_layers: int | None = None   # leaf layers with weights
    total_params: int
    trainable_params: int
    non_trainable_params: int
    trainable_layers: int
    frozen_layers: int
    size_bytes: int                      # model.keras on disk


@dataclass(kw_only=True)
class TestFacts(_Section):
    """training.record.metrics.summary of the confusion matrix: a class never predicted has precision 0; macro is
    the unweighted mean over every class. When calibration ran these are of the calibrated model (accuracy
    unchanged, loss its NLL)."""
    __test__ = False  # not a pytest test class
    loss: float
    accuracy: float
    per_class_accuracy: dict[str, float | None]   # {class: acc}; None for a class with no test image
    confusion_matrix: list[list[int]]             # [true][predicted]
    per_class: dict[str, dict[str, float]] | None = None  # {class: {precision, recall, f1, support}}
    macro_f1: float | None = None
    weighted_f1: float | None = None
    phase1_accuracy: float | None = optional()   # a two-phase run's test accuracy after its head phase
    # On the test images the data check found no copy of in train or val (None: --data-check off, older
    # records; accuracy None when every test image is a copy). Equal to accuracy when nothing leaked.
    leak_free_accuracy: float | None = None
    leak_free_images: int | None = None

    def leaked_images(self, total: int) -> int | None:
        """Test images left out of leak_free_accuracy, of `total`; None when not known."""
        return None if self.leak_free_images is None else total - self.leak_free_images


@dataclass(kw_only=True)
class TrainingFacts(_Section):
    class_weights: dict[str, float] | None = None  # {class: weight}, or None without --class-weight
    feature_cache: bool                     # whether frozen layers' activations were cached
    feature_cache_reason: str | None        # why (or why not)
    caches: dict[str, dict[str, Any]]       # {phase: {used, reason, bytes, storage, shapes, seconds, ...}}
    peak_rss_bytes: int | None
    extract_seconds: float                  # computing the caches (counted in total_time_sec)
    global_batch_size: int                  # per replica x replicas
    per_replica_batch_size: int | None = None
    resumed: bool                           # finished by `tlserve resume`
    cluster: dict[str, Any] | None = optional()  # multi-worker runs: the cluster, its batch and fault tolerance
    augment_views: dict[str, Any] | None = optional()  # --augment-views: views, policy, recipe key, images, seconds


@dataclass(kw_only=True)
class EnvironmentFacts(_Section):
    machine: dict[str, Any]         # training.env.machine_facts: cpu, cores, memory, gpus
    versions: dict[str, str]        # package versions
    # training.fit.accel.Accel.facts
    devices: list[str]
    precision: str                  # the Keras dtype policy
    jit: bool | None = None         # XLA
    distribution: str               # default / mirrored / multiworker
    replicas: int | None = None


@dataclass(kw_only=True)
class CalibrationFacts(_Section):
    """Temperature scaling (training.fit.calibration): fitted on val and baked into the model, or refused
    (`skipped` says why in one line; the val_* and cv_* facts it was judged on are kept either way)."""
    temperature: float | None                    # None: skipped
    skipped: str | None = optional()            # why not
    layer: str | None = optional()              # the Dense layer it was baked into
    fitted_on: str | None = optional()          # "val"
    val_images: int | None = optional()         # validation images it was judged on (copies of train left out)
    val_copies: int | None = optional()         # validation images left out as copies of train (None: not checked)
    val_errors: int | None = optional()         # of val_images, those the model gets wrong
    cv_nll_change: float | None = optional()    # cross-validated change of the held-out log-loss
    cv_t: float | None = optional()             # its t statistic (kept only at <= -2)
    fitted_temperature: float | None = optional()  # a temperature refused as out of range
    val_nll_before: float | None = optional()
    val_nll_after: float | None = optional()
    val_ece_before: float | None = optional()
    val_ece_after: float | None = optional()
    test_ece_before: float | None = optional()
    test_ece_after: float | None = optional()
    test_nll_before: float | None = optional()
    test_nll_after: float | None = optional()
    test_top1_agreement: float | None = optional()  # share of test images whose top class baking kept
    test_nll_rose: bool | None = optional()     # the kept temperature raised the test log-loss (warned)


@dataclass(kw_only=True)
class DataCheckFacts(_Section):
    """training.audit.guard.guard: cross-split copies found before training; the data splits are after any drop."""
    mode: str                        # fast: hashes | full: + embeddings
    thresholds: dict[str, float]     # {phash_distance, cosine}
    embeddings: Any                  # what was used, or why not
    search: str | None = None        # exact | ann: how embedding pairs were found (older records: None)
    pairs: dict[str, dict[str, int]]  # {"train-test": {exact, near}, ...}
    leaks: dict[str, dict[str, Any]]  # {"test-in-train": {images, of, percent}, ...}
    label_conflicts: int             # pairs of copies whose labels differ
    dropped: dict[str, Any] | None   # None, or with --drop-leaks {count, train_before, files [train ids removed]}
    seconds: float


@dataclass(kw_only=True)
class DistillationFacts(_Section):
    """training.fit.distill: the teacher a run learned from (--teacher), and how."""
    teacher: str                     # the teacher run's name
    teacher_backbone: str
    teacher_strategy: str
    teacher_test_accuracy: float     # from the teacher's record: the same test split as this run's
    teacher_params: int
    teacher_input_shape: list[int]   # [h, w, 3]: the images its probabilities were computed on
    temperature: float
    weight: float                    # share of the loss matching the teacher
    views: int = optional(0)         # --augment-views: the teacher's probabilities on K views of each image
    views_policy: str | None = optional()  # their recipe (--augment-policy) ...
    views_recipe: str | None = optional()  # ... and its key (training.data.views.recipe_key)
    train_label_agreement: float     # share of training images where the teacher's top class is the label
    cache: str                       # the file holding the teacher's probabilities
    cache_reused: bool               # read from it rather than computed
    seconds: float                   # computing (or reading) them


@dataclass(kw_only=True)
class RunRecord(_Section):
    schema: int
    name: str
    status: str                              # "finished"
    created_at: str                          # ISO 8601, UTC
    config: dict[str, Any]                   # TrainConfig.to_dict(): every CLI option
    data: DataFacts
    model: ModelFacts
    history: list[dict[str, Any]]            # [{epoch, phase, loss, accuracy, val_loss, val_accuracy, seconds, lr}]
    epochs: int                              # epochs trained, over all phases
    avg_epoch_time_sec: float | None
    total_time_sec: float                    # training plus feature extraction
    target: float                            # the val accuracy epochs_to_target counts to
    epochs_to_target: int | None
    test: TestFacts
    training: TrainingFacts | None = None
    environment: EnvironmentFacts | None = None
    calibration: CalibrationFacts | None = None
    data_check: DataCheckFacts | None = None  # None: --data-check off
    distillation: DistillationFacts | None = optional()  # None: no --teacher (or an older record)

    SCHEMA = SCHEMA

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        return cls.read(path)


def build(cfg, dataset, *, model, input_size: int, history: list[dict[str, Any]], total_time: float,
          test: dict[str, Any], folder: Path, accel, training: dict[str, Any], calibration: dict[str, Any],
          data_check: dict[str, Any] | None, excluded: dict[str, Any] | None = None,
          distillation: dict[str, Any] | None = None) -> RunRecord:
    """The record of a finished run whose model is saved in `folder`. Each part goes to its dataclass by
    keyword, so a key its producer adds without declaring a field here fails at once, not in a reader later."""
    from serving.base.machine import package_versions  # noqa: PLC0415
    from training.env import machine_facts  # noqa: PLC0415
    from training.model.build import facts  # noqa: PLC0415 (TensorFlow only when a run has trained)

    epochs = len(history)
    return RunRecord(
        schema=SCHEMA, name=cfg.name, status="finished",
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        config=cfg.to_dict(),
        data=DataFacts(**dataset.summary(), spec=cfg.data.spec, seed=cfg.data.seed, excluded=excluded),
        model=ModelFacts(backbone=cfg.backbone, strategy=cfg.strategy, weights=cfg.weights, from_run=cfg.from_run,
                         input_shape=[*dataset.image_size, 3], input_dtype="float32", input_range=[0, 255],
                         input_size=input_size, interpolation=dataset.interpolation, **facts(model),
                         size_bytes=(folder / MODEL).stat().st_size),
        history=history,
        epochs=epochs,
        avg_epoch_time_sec=round(sum(r["seconds"] for r in history) / epochs, 4) if epochs else None,
        total_time_sec=round(total_time, 4),
        target=cfg.target,
        epochs_to_target=epochs_to_target(history, cfg.target),
        test=TestFacts(**test),
        training=TrainingFacts(**training),
        environment=EnvironmentFacts(machine=machine_facts(), versions=package_versions(), **accel.facts()),
        calibration=CalibrationFacts(**calibration),
        data_check=None if data_check is None else DataCheckFacts(**data_check),
        distillation=None if distillation is None else DistillationFacts(**distillation),
    )


# ---- finished runs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    path: Path
    record: RunRecord

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def model_path(self) -> Path:
        return self.path / MODEL


def resolve_run_dir(name_or_path: str, runs_dir: Path | None = None) -> Path:
    candidate = Path(name_or_path)
    if (candidate / RECORD).is_file() or (candidate.is_dir() and candidate.parent != Path(".")):
        return candidate
    return storage.runs_dir(runs_dir) / name_or_path


def load_run(name_or_path: str, runs_dir: Path | None = None) -> Run:
    """A finished run, or a UserError that says why not."""
    path = resolve_run_dir(name_or_path, runs_dir)
    if not path.is_dir():
        known = [r.name for r in list_runs(runs_dir)]
        from serving.base.errors import nearest  # noqa: PLC0415
        raise UserError(f"no run named '{name_or_path}' in {storage.runs_dir(runs_dir)}{nearest(name_or_path, known)}")
    if not (path / RECORD).is_file():
        raise UserError(f"run '{name_or_path}' did not finish (no {RECORD} in {path})")
    return Run(path, RunRecord.load(path / RECORD))


def list_runs(runs_dir: Path | None = None) -> list[Run]:
    root = storage.runs_dir(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / RECORD).is_file():
            continue
        try:
            runs.append(Run(child, RunRecord.load(child / RECORD)))
        except (OSError, UserError):  # unreadable, or not a run record: not a finished run
            continue
    return sorted(runs, key=lambda r: r.record.created_at or "")


@dataclass(frozen=True)
class Leak:
    """A run's test images that copy images it learned from, found by its data check."""
    copies: int
    of: int
    free_accuracy: float | None  # on the other test images; None: the record is older than the figure

    def note(self) -> str:
        if self.free_accuracy is not None:
            free = f"leak-free accuracy {self.free_accuracy:.4f} on the other {self.of - self.copies:,}"
        else:
            free = "no test image is free of copies" if self.copies >= self.of else "leak-free accuracy not recorded (older run)"
        return f"{self.copies:,} of {self.of:,} test images copy train/val images; {free}"


def leak_of(record: RunRecord) -> Leak | None:
    """The run's leak, or None when its data check found none (or did not run). A record older than
    leak_free_accuracy counts its data check's test-in-train copies, unless --drop-leaks removed them."""
    t, total = record.test, record.data.splits["test"]
    copies = t.leaked_images(total)
    if copies is None:
        check = record.data_check
        found = (check.leaks or {}).get("test-in-train") if check is not None and check.dropped is None else None
        copies = found["images"] if found else 0
    return Leak(copies, total, t.leak_free_accuracy) if copies else None


def table_row(record: RunRecord) -> dict[str, Any]:
    """Seed 001's columns (plus epochs_to_target and macro F1), derived from a record; macro F1 is
    None for records older than it."""
    return {
        "model": record.name,
        "epochs": record.epochs,
        "avg_epoch_time_sec": record.avg_epoch_time_sec,
        "total_time_sec": record.total_time_sec,
        "test_accuracy": record.test.accuracy,
        "trainable_params": record.model.trainable_params,
        "non_trainable_params": record.model.non_trainable_params,
        "epochs_to_target": record.epochs_to_target,
        "macro_f1": record.test.macro_f1,
    }


def table_csv(records: list[RunRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TABLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(table_row(record))
    return buf.getvalue()


def history_csv(history: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return buf.getvalue()


def epochs_to_target(history: list[dict[str, Any]], target: float) -> int | None:
    """The first epoch (1-based, over all phases) whose val accuracy reaches target."""
    for row in history:
        val = row.get("val_accuracy")
        if val is not None and val >= target:
            return int(row["epoch"])
    return None


def format_cell(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` places, ints with thousands separators, missing as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
