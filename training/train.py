"""The training loop: config in, finished run folder out.

A run is built in `runs/.<name>.partial/` and renamed into place only once
record.json is written, so a half-finished run is never mistaken for a
finished one. The partial folder holds the resolved config, the history so far
and a checkpoint (model + optimizer) after every epoch: an interrupted run
resumes from there (`tlserve train --resume NAME`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from training import accel as accelerators, data as datasets, env, feature_cache, models, records, storage, strategies
from training.config import TrainConfig
from training.env import keras, tf
from training.errors import Interrupted, UserError
from training.validation import resolve

Log = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CONFIG = "config.json"
STATE = "state.json"
CHECKPOINT_DIR = "checkpoint"


def default_name(cfg: TrainConfig) -> str:
    scheme, _, arg = cfg.data.spec.partition(":")
    data = re.sub(r"[^A-Za-z0-9]+", "-", Path(arg).name if arg else scheme).strip("-") or scheme
    return f"{cfg.backbone}-{cfg.strategy}-{data}-{datetime.now():%Y%m%d-%H%M%S}"


def partial_dir(name: str, runs_dir: Path | None = None) -> Path:
    return storage.runs_dir(runs_dir) / f".{name}.partial"


def train(cfg: TrainConfig, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    cfg = resolve(cfg)
    cfg.name = cfg.name or default_name(cfg)
    if not _NAME.match(cfg.name):
        raise UserError(f"--name '{cfg.name}': use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    final = storage.runs_dir(runs_dir) / cfg.name
    if final.exists() and not cfg.overwrite:
        raise UserError(f"run '{cfg.name}' already exists in {final.parent}; pick another --name or pass --overwrite")
    staging = partial_dir(cfg.name, runs_dir)
    if staging.exists():
        if not cfg.overwrite:
            raise UserError(f"an interrupted run '{cfg.name}' exists; continue it with `tlserve train --resume {cfg.name}` "
                            "or start over with --overwrite")
        shutil.rmtree(staging)
    if cfg.from_run:
        records.load_run(cfg.from_run, runs_dir)  # fail now, not after loading data
    staging.mkdir(parents=True)
    storage.write_json(staging / CONFIG, cfg.to_dict())
    return _run(cfg, runs_dir, staging, {"history": [], "phases_done": [], "elapsed": 0.0}, log, progress)


def resume(name: str, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    staging = partial_dir(name, runs_dir)
    if not (staging / CONFIG).is_file():
        done = (storage.runs_dir(runs_dir) / name / records.RECORD).is_file()
        raise UserError(f"run '{name}' already finished; nothing to resume" if done else
                        f"no interrupted run named '{name}' in {storage.runs_dir(runs_dir)}")
    cfg = TrainConfig.from_dict(storage.read_json(staging / CONFIG))
    state = storage.read_json(staging / STATE) if (staging / STATE).is_file() else \
        {"history": [], "phases_done": [], "elapsed": 0.0}
    state["resumed"] = True
    log(f"resuming '{name}' after epoch {len(state['history'])}")
    return _run(cfg, runs_dir, staging, state, log, progress)


@dataclasses.dataclass
class _Phase:
    name: str
    epochs: int
    lr: float
    before: Callable[[], None] | None = None
    cached: bool = False


def _run(cfg: TrainConfig, runs_dir: Path | None, staging: Path, state: dict[str, Any], log: Log,
         progress: bool | None) -> records.Run:
    history: list[dict[str, Any]] = state["history"]
    policy = keras().mixed_precision.global_policy()
    try:
        return _train_in(cfg, runs_dir, staging, state, log, progress)
    except KeyboardInterrupt:
        if history:
            raise Interrupted(f"interrupted after epoch {len(history)}; resume with: tlserve train --resume {cfg.name}"
                              + (f" --runs-dir {runs_dir}" if runs_dir else "")) from None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException:
        # A run with finished epochs stays resumable; one that never trained leaves nothing behind.
        if not history:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        # The run's precision is a global Keras policy; later work in this process (export,
        # another run) must not inherit it.
        keras().mixed_precision.set_global_policy(policy)


def _train_in(cfg, runs_dir, staging: Path, state: dict[str, Any], log: Log, progress: bool | None) -> records.Run:
    K, T = keras(), tf()
    history: list[dict[str, Any]] = state["history"]
    acc = accelerators.setup(cfg.precision, cfg.jit, cfg.distribute)
    if acc.note:
        log(f"warning: {acc.note}")
    K.utils.set_random_seed(cfg.seed)
    dataset = datasets.load_dataset(cfg.data)
    for name in dataset.skipped:
        log(f"skipped (not a readable image): {name}")
    log(f"data: {dataset.source}: {len(dataset.class_names)} classes, train {len(dataset.train)} / "
        f"val {len(dataset.val)} / test {len(dataset.test)} at {dataset.image_size[0]}x{dataset.image_size[1]}")
    if len(dataset.train) == 0 or len(dataset.test) == 0:
        raise UserError("the data has an empty train or test split; raise --limit or add images")
    source = records.load_run(cfg.from_run, runs_dir) if cfg.from_run else None

    with acc.strategy.scope():
        built, phases = _prepare(cfg, dataset, source)
    model = built.model
    use_cache, cache_reason = feature_cache.decide(cfg, built.backbone is not None)
    if cfg.strategy in ("frozen", "finetune") and not use_cache:
        log(f"feature cache off: {cache_reason}")
    batch = cfg.batch_size * acc.replicas
    interactive = sys.stdout.isatty() if progress is None else progress
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    steps_per_epoch = math.ceil(len(dataset.train) / batch)
    pipes = {"train": _pipeline(dataset.train, batch, shuffle=True, seed=cfg.seed, repeat=True),
             "val": _pipeline(dataset.val, batch) if len(dataset.val) else None,
             "test": _pipeline(dataset.test, batch)}

    started = time.perf_counter()
    extract_seconds = 0.0
    features: dict[str, np.ndarray] | None = None
    phase1_accuracy = state.get("phase1_accuracy")
    restored = not history  # nothing to restore on a fresh run
    for phase in phases:
        if phase.name in state["phases_done"]:
            continue
        if phase.before is not None:
            phase.before()
        done_in_phase = sum(1 for row in history if row["phase"] == phase.name)
        if phase.epochs == 0 or done_in_phase >= phase.epochs:
            state["phases_done"].append(phase.name)
            continue
        cached = phase.name == "head" and use_cache
        if cached and features is None:
            t0 = time.perf_counter()
            with acc.strategy.scope():
                features = feature_cache.extract(model, built.features, splits, _pipeline)
            extract_seconds = time.perf_counter() - t0
            log(f"features: backbone ran once over {sum(len(s) for s in splits.values())} images "
                f"in {extract_seconds:.1f}s; the head trains on them")
        with acc.strategy.scope():
            fit_model = feature_cache.head_model(model, built.backbone, built.features) if cached else model
            optimizer = _optimizer(cfg, phase.lr, phase.epochs * steps_per_epoch)
            fit_model.compile(optimizer=optimizer, loss=_loss(cfg.label_smoothing), metrics=["accuracy"],
                              jit_compile=acc.jit)
        checkpoint = T.train.Checkpoint(model=model, optimizer=optimizer)
        manager = T.train.CheckpointManager(checkpoint, str(staging / CHECKPOINT_DIR), max_to_keep=1)
        if not restored:
            # Mid-phase: model and optimizer state; at a phase boundary the optimizer is new.
            target = checkpoint if done_in_phase else T.train.Checkpoint(model=model)
            target.restore(manager.latest_checkpoint).expect_partial()
            restored = True
        train_data = _pipeline(datasets.Split(features["train"], dataset.train.y), batch, shuffle=True, seed=cfg.seed,
                               repeat=True) if cached else pipes["train"]
        val_data = None
        if pipes["val"] is not None:
            val_data = _pipeline(datasets.Split(features["val"], dataset.val.y), batch) if cached else pipes["val"]
        log(f"phase {phase.name}: {phase.epochs} epoch(s) at lr {phase.lr:g}; trainable params "
            f"{models.facts(model)['trainable_params']:,}" + (" (on cached features)" if cached else ""))
        elapsed_before = state["elapsed"]
        phase_started = time.perf_counter()

        def save_state(_row: dict[str, Any]) -> None:
            manager.save()
            state["elapsed"] = elapsed_before + time.perf_counter() - phase_started
            storage.write_json(staging / STATE, state)

        callbacks = [_EpochLog(phase.name, history, None if interactive else log, save_state)]
        if cfg.patience and val_data is not None:
            callbacks.append(K.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience,
                                                       restore_best_weights=True))
        first = len(history)
        fit_model.fit(train_data, steps_per_epoch=steps_per_epoch, validation_data=val_data, initial_epoch=first,
                      epochs=first + phase.epochs - done_in_phase, callbacks=callbacks,
                      verbose=1 if interactive else 0)
        if phase.name == "head" and len(phases) > 1:
            test_data = _pipeline(datasets.Split(features["test"], dataset.test.y), batch) if cached else pipes["test"]
            phase1_accuracy = state["phase1_accuracy"] = float(fit_model.evaluate(test_data, verbose=0)[1])
        state["phases_done"].append(phase.name)
        state["elapsed"] = elapsed_before + time.perf_counter() - phase_started
        storage.write_json(staging / STATE, state)

    total_time = state["elapsed"] + extract_seconds
    test = _evaluate(model, pipes["test"], dataset, cfg.label_smoothing)
    if phase1_accuracy is not None:
        test["phase1_accuracy"] = phase1_accuracy
    model.save(str(staging / records.MODEL))
    storage.write_text(staging / records.HISTORY, records.history_csv(history))
    from training.plots import curves  # noqa: PLC0415 (matplotlib only once a run has finished)

    curves([{"name": cfg.name, "history": history}], staging / records.CURVES)
    training_facts = {"feature_cache": use_cache, "feature_cache_reason": cache_reason,
                      "extract_seconds": round(extract_seconds, 4), "global_batch_size": batch,
                      "resumed": bool(state.get("resumed"))}
    record = _record(cfg, dataset, built, model, history, total_time, test, staging, acc, training_facts)
    storage.write_json(staging / records.RECORD, record)
    final = storage.runs_dir(runs_dir) / cfg.name
    for leftover in (CONFIG, STATE):
        (staging / leftover).unlink(missing_ok=True)
    storage.promote(staging, final, overwrite=cfg.overwrite)
    return records.Run(final, record)


def _prepare(cfg: TrainConfig, dataset, source: records.Run | None):
    num_classes = len(dataset.class_names)
    if source is not None:
        src_model = models.load_model(source.model_path)
        expected = tuple(src_model.input_shape[1:3])
        if expected != tuple(dataset.image_size):
            raise UserError(f"--from-run {source.name} takes {expected[0]}x{expected[1]} images; this data is "
                            f"{dataset.image_size[0]}x{dataset.image_size[1]} (set --image-size)")
        model = strategies.transfer_from(src_model, num_classes, cfg.train_last)
        built = models.BuiltModel(model, None, int(source.record["model"]["input_size"]), None)
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


def _pipeline(split, batch_size: int, *, shuffle: bool = False, seed: int = 0, repeat: bool = False):
    """tf.data over in-memory arrays: pixels stay uint8 until a batch is formed (a quarter of float32's
    memory); the model itself takes float32 0..255.

    repeat: one endless iterator for the whole fit, read `steps_per_epoch` batches an epoch (each
    epoch still ends with its partial batch: the repeat comes after batching). Keras otherwise makes
    a new iterator every epoch, and on full CIFAR-10 the switch measured 11-40 s per epoch here
    (resnet9-m: 42 s epochs with a 38 s pause between them; with one iterator, none)."""
    T = tf()
    ds = T.data.Dataset.from_tensor_slices((split.x, split.y))
    if shuffle:
        ds = ds.shuffle(len(split.y), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if split.x.dtype == np.uint8:
        ds = ds.map(lambda x, y: (T.cast(x, T.float32), y), num_parallel_calls=T.data.AUTOTUNE)
    if repeat:
        ds = ds.repeat()
    return ds.prefetch(T.data.AUTOTUNE)


def _loss(label_smoothing: float):
    """Cross-entropy on integer labels; with smoothing, on one-hot targets (Keras's sparse loss has no smoothing)."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    T, K = tf(), keras()

    def smoothed_crossentropy(y_true, y_pred):
        labels = T.cast(T.reshape(y_true, [-1]), T.int32)
        return K.losses.categorical_crossentropy(T.one_hot(labels, T.shape(y_pred)[-1]), y_pred,
                                                 label_smoothing=label_smoothing)

    return smoothed_crossentropy


def _optimizer(cfg: TrainConfig, lr: float, total_steps: int):
    """The optimizer with its learning-rate schedule over the phase's steps. The schedule is a
    function of the optimizer's step count, which the checkpoint holds, so a resumed run continues it."""
    K = keras()
    rate: Any = lr
    if cfg.schedule == "onecycle":
        # One-cycle (Smith; the fast CIFAR-10 records): linear warm-up from lr/25 over the first
        # 30% of steps, then a cosine down to 0, with Keras's own warm-up schedule.
        warmup = max(1, int(0.3 * total_steps))
        rate = K.optimizers.schedules.CosineDecay(lr / 25, max(1, total_steps - warmup),
                                                  warmup_target=lr, warmup_steps=warmup)
    elif cfg.schedule == "cosine":
        rate = K.optimizers.schedules.CosineDecay(lr, max(1, total_steps))
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        optimizer = K.optimizers.SGD(learning_rate=rate, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                     weight_decay=decay)
    elif cfg.optimizer == "rmsprop":
        optimizer = K.optimizers.RMSprop(learning_rate=rate, weight_decay=decay)
    else:
        optimizer = K.optimizers.Adam(learning_rate=rate, weight_decay=decay)
    if decay:
        # Decay the kernels only: shrinking BatchNorm scales and biases regularizes nothing useful.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


_epoch_log_cls = None


def _EpochLog(phase, history, log, on_epoch):  # noqa: N802 (a Keras class made after TensorFlow loads)
    global _epoch_log_cls
    if _epoch_log_cls is None:
        K = keras()

        class EpochLog(K.callbacks.Callback):
            """Per-epoch seconds and metrics into the history, then the checkpoint; a line when not on a terminal."""

            def __init__(self, phase: str, history: list[dict[str, Any]], log: Log | None, on_epoch):
                super().__init__()
                self.phase, self.history, self.log, self.on_epoch = phase, history, log, on_epoch
                self._t0 = 0.0

            def on_epoch_begin(self, epoch, logs=None):
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs or {}
                row = {"epoch": epoch + 1, "phase": self.phase, "seconds": round(time.perf_counter() - self._t0, 4)}
                for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                    row[key] = float(logs[key]) if key in logs else None
                # The rate of the epoch's last step: a schedule's shape shows in the history.
                row["lr"] = float(keras().backend.get_value(self.model.optimizer.learning_rate))
                self.history.append(row)
                self.on_epoch(row)
                if self.log:
                    val = f" val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f}" \
                        if row["val_loss"] is not None else ""
                    self.log(f"epoch {row['epoch']} ({self.phase}) {row['seconds']:.1f}s loss {row['loss']:.4f} "
                             f"acc {row['accuracy']:.4f}{val}")

        _epoch_log_cls = EpochLog
    return _epoch_log_cls(phase, history, log, on_epoch)


def _evaluate(model, test_ds, dataset, label_smoothing: float) -> dict[str, Any]:
    """Test loss (as Keras's evaluate reports it: the training loss, label smoothing included, plus
    regularization, so it compares with val_loss), accuracy, per-class accuracy and confusion matrix,
    from a single pass over the test split."""
    probs = model.predict(test_ds, verbose=0)
    y = dataset.test.y
    per_image = keras().losses.get(_loss(label_smoothing))(y, probs)  # the very loss the run trained on
    regularization = float(sum(float(v) for v in model.losses)) if model.losses else 0.0
    loss = float(np.mean(per_image)) + regularization
    pred = probs.argmax(axis=1)
    accuracy = float(np.mean(pred == y))
    n = len(dataset.class_names)
    matrix = np.zeros((n, n), dtype=np.int64)
    np.add.at(matrix, (dataset.test.y, pred), 1)
    per_class = {name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
                 for i, name in enumerate(dataset.class_names)}
    return {"loss": float(loss), "accuracy": float(accuracy), "per_class_accuracy": per_class,
            "confusion_matrix": matrix.tolist()}


def _record(cfg, dataset, built, model, history, total_time, test, staging: Path, acc, training_facts) -> dict[str, Any]:
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
        "training": training_facts,
        "environment": {"machine": env.machine_facts(), "versions": env.package_versions(), **acc.facts()},
    }
