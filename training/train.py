"""The training loop: config in, finished run folder out.

The run is built in `runs/.<name>.partial/` and renamed into place only once
record.json is written, so a half-finished run is never mistaken for a finished one.
"""
from __future__ import annotations

import dataclasses
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training import backbones, data as datasets, env, models, records, storage, strategies
from training.config import TrainConfig
from training.validation import resolve
from training.env import keras, tf
from training.errors import UserError

Log = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def default_name(cfg: TrainConfig) -> str:
    data = re.sub(r"[^A-Za-z0-9]+", "-", cfg.data.spec.split(":", 1)[0] if ":" not in cfg.data.spec
                  else Path(cfg.data.spec.split(":", 1)[1]).name or cfg.data.spec.split(":", 1)[0]).strip("-")
    return f"{cfg.backbone}-{cfg.strategy}-{data}-{datetime.now():%Y%m%d-%H%M%S}"


def train(cfg: TrainConfig, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    cfg = resolve(cfg)
    cfg.name = cfg.name or default_name(cfg)
    if not _NAME.match(cfg.name):
        raise UserError(f"--name '{cfg.name}': use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    final = storage.runs_dir(runs_dir) / cfg.name
    if final.exists() and not cfg.overwrite:
        raise UserError(f"run '{cfg.name}' already exists in {final.parent}; pick another --name or pass --overwrite")
    source = records.load_run(cfg.from_run, runs_dir) if cfg.from_run else None

    K = keras()
    K.utils.set_random_seed(cfg.seed)
    dataset = datasets.load_dataset(cfg.data)
    for name in dataset.skipped:
        log(f"skipped (not a readable image): {name}")
    log(f"data: {dataset.source}: {len(dataset.class_names)} classes, "
        f"train {len(dataset.train.y)} / val {len(dataset.val.y)} / test {len(dataset.test.y)} at "
        f"{dataset.image_size[0]}x{dataset.image_size[1]}")
    if len(dataset.train.y) == 0 or len(dataset.test.y) == 0:
        raise UserError("the data has an empty train or test split; raise --limit or add images")

    built, phases = _prepare(cfg, dataset, source)
    model = built.model
    interactive = sys.stdout.isatty() if progress is None else progress
    train_ds = _pipeline(dataset.train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    val_ds = _pipeline(dataset.val, cfg.batch_size) if len(dataset.val.y) else None
    test_ds = _pipeline(dataset.test, cfg.batch_size)

    staging = final.with_name(f".{cfg.name}.partial")
    if staging.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    history: list[dict[str, Any]] = []
    phase1_accuracy = None
    try:
        started = time.perf_counter()
        done = 0
        for phase in phases:
            if phase.before is not None:
                phase.before()
            if phase.epochs == 0:
                continue
            model.compile(optimizer=_optimizer(cfg, phase.lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            log(f"phase {phase.name}: {phase.epochs} epoch(s) at lr {phase.lr:g}; "
                f"trainable params {models.facts(model)['trainable_params']:,}")
            callbacks = [_EpochLog(phase.name, history, None if interactive else log),
                         K.callbacks.ModelCheckpoint(str(staging / records.CHECKPOINT), save_weights_only=True)]
            if cfg.patience and val_ds is not None:
                callbacks.append(K.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                           restore_best_weights=True))
            model.fit(train_ds, validation_data=val_ds, initial_epoch=done, epochs=done + phase.epochs,
                      callbacks=callbacks, verbose=1 if interactive else 0)
            done = len(history)
            if phase.name == "head" and len(phases) > 1:
                phase1_accuracy = float(model.evaluate(test_ds, verbose=0)[1])
        total_time = time.perf_counter() - started

        test = _evaluate(model, test_ds, dataset)
        if phase1_accuracy is not None:
            test["phase1_accuracy"] = phase1_accuracy
        model.save(str(staging / records.MODEL))
        storage.write_text(staging / records.HISTORY, records.history_csv(history))
        record = _record(cfg, dataset, built, model, history, total_time, test, staging)
        storage.write_json(staging / records.RECORD, record)
        storage.promote(staging, final, overwrite=cfg.overwrite)
    except BaseException:
        import shutil  # noqa: PLC0415

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return records.Run(final, record)


@dataclasses.dataclass
class _Phase:
    name: str
    epochs: int
    lr: float
    before: Callable[[], None] | None = None


def _prepare(cfg: TrainConfig, dataset, source: records.Run | None):
    num_classes = len(dataset.class_names)
    if source is not None:
        src_model = models.load_model(source.model_path)
        expected = tuple(src_model.input_shape[1:3])
        if expected != tuple(dataset.image_size):
            raise UserError(f"--from-run {source.name} takes {expected[0]}x{expected[1]} images; this data is "
                            f"{dataset.image_size[0]}x{dataset.image_size[1]} (set --image-size)")
        model = strategies.transfer_from(src_model, num_classes, cfg.train_last)
        built = models.BuiltModel(model, None, int(src_model.input_shape[1]), None)
        return built, [_Phase("transfer", cfg.epochs, cfg.lr)]
    built = models.build(cfg, dataset.image_size, num_classes)
    if cfg.strategy in ("frozen", "finetune"):
        strategies.check_unfreeze(built.backbone, cfg)
        strategies.freeze_backbone(built.backbone)
    if cfg.strategy == "frozen":
        return built, [_Phase("head", cfg.epochs, cfg.lr)]
    if cfg.strategy == "finetune":
        return built, [_Phase("head", cfg.epochs, cfg.lr),
                       _Phase("finetune", cfg.finetune_epochs, cfg.finetune_lr,
                              before=lambda: strategies.unfreeze_top(built.backbone, cfg))]
    return built, [_Phase("train", cfg.epochs, cfg.lr)]


def _pipeline(split, batch_size: int, *, shuffle: bool = False, seed: int = 0):
    """uint8 pixels stay uint8 until the batch is formed; the model takes float32 0..255."""
    T = tf()
    ds = T.data.Dataset.from_tensor_slices((split.x, split.y))
    if shuffle:
        ds = ds.shuffle(len(split.y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (T.cast(x, T.float32), y), num_parallel_calls=T.data.AUTOTUNE)
    return ds.prefetch(T.data.AUTOTUNE)


def _optimizer(cfg: TrainConfig, lr: float):
    K = keras()
    if cfg.optimizer == "sgd":
        return K.optimizers.SGD(learning_rate=lr, momentum=cfg.momentum)
    if cfg.optimizer == "rmsprop":
        return K.optimizers.RMSprop(learning_rate=lr)
    return K.optimizers.Adam(learning_rate=lr)


def _make_epoch_log():
    K = keras()

    class EpochLog(K.callbacks.Callback):
        """Per-epoch seconds and metrics into the history; one summary line when not on a terminal."""

        def __init__(self, phase: str, history: list[dict[str, Any]], log: Log | None):
            super().__init__()
            self.phase, self.history, self.log = phase, history, log
            self._t0 = 0.0

        def on_epoch_begin(self, epoch, logs=None):
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            row = {"epoch": epoch + 1, "phase": self.phase, "seconds": round(time.perf_counter() - self._t0, 4)}
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                row[key] = float(logs[key]) if key in logs else None
            self.history.append(row)
            if self.log:
                val = f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}" if row["val_loss"] is not None else ""
                self.log(f"epoch {row['epoch']} ({self.phase}) {row['seconds']:.1f}s loss {row['loss']:.4f} "
                         f"acc {row['accuracy']:.4f}{val}")

    return EpochLog


def _EpochLog(phase, history, log):  # noqa: N802 (a class made on first use, after TensorFlow loads)
    return _make_epoch_log()(phase, history, log)


def _evaluate(model, test_ds, dataset) -> dict[str, Any]:
    loss, accuracy = model.evaluate(test_ds, verbose=0)
    probs = model.predict(test_ds, verbose=0)
    pred = probs.argmax(axis=1)
    n = len(dataset.class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (dataset.test.y, pred), 1)
    per_class = {name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
                 for i, name in enumerate(dataset.class_names)}
    return {"loss": float(loss), "accuracy": float(accuracy), "per_class_accuracy": per_class,
            "confusion_matrix": matrix.tolist()}


def _record(cfg, dataset, built, model, history, total_time, test, staging: Path) -> dict[str, Any]:
    T = tf()
    facts = models.facts(model)
    epochs = len(history)
    return {
        "schema": records.SCHEMA,
        "name": cfg.name,
        "status": "finished",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "data": {**dataset.summary(), "spec": cfg.data.spec, "seed": cfg.data.seed},
        "model": {
            "backbone": cfg.backbone,
            "strategy": cfg.strategy,
            "weights": cfg.weights,
            "from_run": cfg.from_run,
            "input_shape": [*dataset.image_size, 3],
            "input_dtype": "float32",
            "input_range": [0, 255],
            "input_size": built.input_size,
            "interpolation": dataset.interpolation,
            **facts,
            "size_bytes": (staging / records.MODEL).stat().st_size,
        },
        "history": history,
        "epochs": epochs,
        "avg_epoch_time_sec": round(sum(r["seconds"] for r in history) / epochs, 4) if epochs else None,
        "total_time_sec": round(total_time, 4),
        "target": cfg.target,
        "epochs_to_target": records.epochs_to_target(history, cfg.target),
        "test": test,
        "environment": {
            "machine": env.machine_facts(),
            "versions": env.package_versions(),
            "devices": [d.name for d in T.config.list_logical_devices()],
            "precision": keras().mixed_precision.global_policy().name,
            "distribution": "default",
        },
    }
