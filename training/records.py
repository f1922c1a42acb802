"""Run records: `runs/<name>/record.json` and the files beside it.

A finished run folder holds:
  record.json    the record below (written last: its presence means finished)
  history.csv    one row per epoch: epoch, phase, loss, accuracy, val_loss, val_accuracy, seconds, lr (the rate at the epoch's last step)
  model.keras    the trained tf-keras model (load with training.models.load_model)
  checkpoint/     TensorFlow checkpoint (model + optimizer) after the last completed epoch
  curves.png     accuracy / loss per epoch

record.json (schema 1):
  name, schema, created_at, status ("finished")
  config          TrainConfig.to_dict(): every CLI option
  data            spec, source, class_names, num_classes, image_size [h, w],
                  splits {train, val, test}, train_class_counts {class: n}, skipped [file names that would not decode], seed
  model           backbone, strategy, weights, input_shape [h, w, 3], input_dtype "float32",
                  input_range [0, 255], input_size (resize inside the model), interpolation,
                  layers, depth, total_params, trainable_params, non_trainable_params,
                  trainable_layers, frozen_layers, size_bytes
  history         [{epoch, phase, loss, accuracy, val_loss, val_accuracy, seconds, lr}]
  epochs, avg_epoch_time_sec, total_time_sec, target, epochs_to_target (int | null)
  test            {loss, accuracy, per_class_accuracy {class: acc}, confusion_matrix [[int]],
                   per_class {class: {precision, recall, f1, support}}, macro_f1, weighted_f1}
                  (training.metrics.summary of the confusion matrix: a class never predicted has
                  precision 0; macro = unweighted mean over every class. Records written before
                  these fields existed lack them; readers treat them as missing, not as 0.)
  calibration     {temperature, layer, fitted_on "val", val_images, val_nll_before, val_nll_after,
                  val_ece_before, val_ece_after, test_ece_before, test_ece_after, test_nll_before,
                  test_nll_after, test_top1_agreement}; or {temperature: null, skipped: reason}
                  (test is of the calibrated model when calibration ran: accuracy is unchanged, loss is its NLL)
  training        {class_weights {class: weight} | null, feature_cache, caches, ...}
  environment     {machine {...}, versions {...}, devices [..], precision, distribution}
  data_check      null (--data-check off) | {mode (fast: hashes | full: + embeddings), thresholds {phash_distance,
                  cosine}, embeddings (what was used, or why not), pairs {"train-test": {exact, near}, ...}
                  (cross-split pairs), leaks {"test-in-train": {images, of, percent}, ...}, label_conflicts (pairs
                  whose labels differ), dropped (null, or with --drop-leaks {count, train_before, files [train
                  ids removed]}), seconds}; the splits above are after the drop
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving import storage
from serving.errors import UserError

SCHEMA = 1
RECORD = "record.json"
HISTORY = "history.csv"
MODEL = "model.keras"
CURVES = "curves.png"
HISTORY_FIELDS = ("epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds", "lr")
# Seed 001's CSV columns, then ours.
TABLE_FIELDS = ("model", "epochs", "avg_epoch_time_sec", "total_time_sec", "test_accuracy",
                "trainable_params", "non_trainable_params", "epochs_to_target", "macro_f1")


@dataclass(frozen=True)
class Run:
    path: Path
    record: dict[str, Any]

    @property
    def name(self) -> str:
        return self.record["name"]

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
        from serving.errors import nearest  # noqa: PLC0415
        raise UserError(f"no run named '{name_or_path}' in {storage.runs_dir(runs_dir)}{nearest(name_or_path, known)}")
    if not (path / RECORD).is_file():
        raise UserError(f"run '{name_or_path}' did not finish (no {RECORD} in {path})")
    return Run(path, storage.read_json(path / RECORD))


def list_runs(runs_dir: Path | None = None) -> list[Run]:
    root = storage.runs_dir(runs_dir)
    if not root.is_dir():
        return []
    runs = []
    for child in sorted(root.iterdir()):
        if child.name.startswith(".") or not (child / RECORD).is_file():
            continue
        try:
            runs.append(Run(child, storage.read_json(child / RECORD)))
        except (OSError, ValueError):
            continue
    return sorted(runs, key=lambda r: r.record.get("created_at", ""))


def table_row(record: dict[str, Any]) -> dict[str, Any]:
    """Seed 001's columns (plus epochs_to_target and macro F1), derived from a record; macro F1 is
    None for records older than it."""
    return {
        "model": record["name"],
        "epochs": record["epochs"],
        "avg_epoch_time_sec": record["avg_epoch_time_sec"],
        "total_time_sec": record["total_time_sec"],
        "test_accuracy": record["test"]["accuracy"],
        "trainable_params": record["model"]["trainable_params"],
        "non_trainable_params": record["model"]["non_trainable_params"],
        "epochs_to_target": record["epochs_to_target"],
        "macro_f1": record["test"].get("macro_f1"),
    }


def table_csv(records: list[dict[str, Any]]) -> str:
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
