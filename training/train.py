"""The training loop: config in, finished run folder out.

A run is built in `runs/.<name>.partial/` and renamed into place only once
record.json is written, so a half-finished run is never mistaken for a
finished one. The partial folder holds the resolved config, the history so far
and a checkpoint (model + optimizer) after every epoch: an interrupted run
resumes from there (`tlserve train --resume NAME`).

On a TF_CONFIG cluster (MultiWorkerMirroredStrategy) only the chief builds that
folder; the epoch checkpoint is Keras's BackupAndRestore, which a restarted
cluster continues from (`_train_in_cluster`, docs/distributed.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving import storage
from serving.errors import UserError
from training import accel as accelerators, calibration, class_weights, cluster as clusters, data as datasets, \
    datacheck, feature_cache, metrics, models, progress, records, strategies, tensorboard_logs
from training.config import TrainConfig
from training.env import keras, tf
from training.errors import ClusterLost, Interrupted
from training.validation import resolve

Log = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CONFIG = "config.json"
STATE = "state.json"
CHECKPOINT_DIR = "checkpoint"
BACKUP_DIR = "backup"  # multi-worker: Keras's BackupAndRestore, one folder per phase
MULTIWORKER_NO_CACHE = ("multi-worker training: TensorFlow's backup covers the model being fit, and every worker "
                        "would extract the whole cache itself")


def default_name(cfg: TrainConfig) -> str:
    scheme, _, arg = cfg.data.spec.partition(":")
    data = re.sub(r"[^A-Za-z0-9]+", "-", Path(arg).name if arg else scheme).strip("-") or scheme
    return f"{cfg.backbone}-{cfg.strategy}-{data}-{datetime.now():%Y%m%d-%H%M%S}"


def partial_dir(name: str, runs_dir: Path | None = None) -> Path:
    return storage.runs_dir(runs_dir) / f".{name}.partial"


def train(cfg: TrainConfig, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    cfg = resolve(cfg)
    cluster = clusters.from_env(cfg.distribute, os.environ.get("TF_CONFIG"))
    if cluster is not None and not cfg.name:
        # A default name carries the start time, which two processes never share.
        raise UserError("a multi-worker run (TF_CONFIG) needs --name, the same on every worker")
    cfg.name = cfg.name or default_name(cfg)
    if not _NAME.match(cfg.name):
        raise UserError(f"--name '{cfg.name}': use letters, digits, '.', '_' and '-' (starting with a letter or digit)")
    final = storage.runs_dir(runs_dir) / cfg.name
    if final.exists() and not cfg.overwrite:
        raise UserError(f"run '{cfg.name}' already exists in {final.parent}; pick another --name or pass --overwrite")
    if cluster is not None:
        return _train_in_cluster(cfg, runs_dir, cluster, log, progress)
    staging = partial_dir(cfg.name, runs_dir)
    if staging.exists() and not (staging / CONFIG).is_file():
        shutil.rmtree(staging, ignore_errors=True)  # killed before it wrote its config: nothing to resume
    if staging.exists():
        if not cfg.overwrite:
            raise UserError(f"an interrupted run '{cfg.name}' exists; continue it with `tlserve train --resume {cfg.name}` "
                            "or start over with --overwrite")
        shutil.rmtree(staging)
    if cfg.from_run:
        records.load_run(cfg.from_run, runs_dir)  # fail now, not after loading data
    # The folder appears with its config already in it, so a partial folder is always resumable.
    with storage.staged_dir(staging, overwrite=False) as fresh:
        storage.write_json(fresh / CONFIG, cfg.to_dict())
    return _run(cfg, runs_dir, staging, _fresh_state(), log, progress)


def _fresh_state() -> dict[str, Any]:
    return {"history": [], "phases_done": [], "elapsed": 0.0}


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    ignore = ("overwrite",)  # how the run was started, not what it trains
    return {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}


def _train_in_cluster(cfg: TrainConfig, runs_dir: Path | None, cluster: clusters.Cluster, log: Log,
                      progress: bool | None) -> records.Run:
    """One worker's part of a multi-worker run. The chief builds `runs/.<name>.partial/` as a single
    process does; the others write their copies (checkpoints, model, record) to a temporary folder
    that is removed at the end. A worker started again with the same command and TF_CONFIG (a
    restarted pod) continues the run from TensorFlow's backup, which every worker reads from the
    chief's folder: that folder must be on storage all workers share (docs/distributed.md)."""
    shared = partial_dir(cfg.name, runs_dir)
    config_file = shared / CONFIG
    restarted = config_file.is_file()
    if restarted and not _same_config(storage.read_json(config_file), cfg.to_dict()):
        if not (cluster.is_chief and cfg.overwrite):
            raise UserError(f"an interrupted run '{cfg.name}' with another configuration exists in {shared.parent}; "
                            "restart the workers with its command, or start over with another --name or --overwrite")
        shutil.rmtree(shared)
        restarted = False
    state = storage.read_json(shared / STATE) if restarted and (shared / STATE).is_file() else _fresh_state()
    state["cluster"] = True  # --resume refuses it: its epochs are in TensorFlow's backup, not in tlserve's checkpoints
    if cluster.is_chief:
        if shared.exists() and not restarted:
            shutil.rmtree(shared, ignore_errors=True)  # killed before it wrote its config: nothing to continue
        if not restarted:
            with storage.staged_dir(shared, overwrite=False) as fresh:
                storage.write_json(fresh / CONFIG, cfg.to_dict())
        staging = shared
    else:
        staging = _worker_folder(cfg.name, cluster, runs_dir)
    if restarted and (shared / STATE).is_file():
        # (A config alone is the chief's fresh start seen by a quicker worker, or a run killed before epoch 1.)
        state["restarted"] = True
        log(f"{cluster.task}: continuing '{cfg.name}' from the backup in {shared}")
    try:
        return _run(cfg, runs_dir, staging, state, log, progress, cluster=cluster, shared=shared)
    finally:
        if not cluster.is_chief:
            shutil.rmtree(staging, ignore_errors=True)


def _worker_folder(name: str, cluster: clusters.Cluster, runs_dir: Path | None) -> Path:
    """A non-chief's temporary folder, named for the run and the task, so a worker started again after a
    kill (which could not clean up) removes what its predecessor left."""
    where = hashlib.sha1(str(storage.runs_dir(runs_dir).resolve()).encode()).hexdigest()[:8]
    folder = Path(tempfile.gettempdir()) / f"tlserve-{name}-{cluster.task_type}{cluster.task_index}-{where}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def interrupted(runs_dir: Path | None = None) -> list[tuple[str, int]]:
    """(name, epochs done) of every run that can be resumed."""
    found = []
    for path in sorted(storage.runs_dir(runs_dir).glob(".*.partial")):
        if (path / CONFIG).is_file():
            state = storage.read_json(path / STATE) if (path / STATE).is_file() else {"history": []}
            found.append((path.name[1:-len(".partial")], len(state.get("history", []))))
    return found


def resume(name: str, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    staging = partial_dir(name, runs_dir)
    if not (staging / CONFIG).is_file():
        done = (storage.runs_dir(runs_dir) / name / records.RECORD).is_file()
        raise UserError(f"run '{name}' already finished; nothing to resume" if done else
                        f"no interrupted run named '{name}' in {storage.runs_dir(runs_dir)}")
    cfg = TrainConfig.from_dict(storage.read_json(staging / CONFIG))
    if clusters.from_env(cfg.distribute, os.environ.get("TF_CONFIG")) is not None:
        raise UserError(f"a multi-worker run continues when its workers are started again with the run's own command "
                        f"(--name {name}) and TF_CONFIG; --resume is for single-process runs")
    state = storage.read_json(staging / STATE) if (staging / STATE).is_file() else _fresh_state()
    if state.get("cluster"):
        raise UserError(f"run '{name}' trains on a TF_CONFIG cluster: start every worker again with its command "
                        f"(--name {name}) and TF_CONFIG to continue it")
    state["resumed"] = True
    log(f"resuming '{name}' after epoch {len(state['history'])}")
    return _run(cfg, runs_dir, staging, state, log, progress)


@dataclasses.dataclass
class _Phase:
    name: str
    epochs: int
    lr: float
    before: Callable[[], None] | None = None


def _run(cfg: TrainConfig, runs_dir: Path | None, staging: Path, state: dict[str, Any], log: Log,
         progress: bool | None, *, cluster: clusters.Cluster | None = None, shared: Path | None = None) -> records.Run:
    history: list[dict[str, Any]] = state["history"]
    policy = keras().mixed_precision.global_policy()
    generator_rng = keras().backend.experimental.is_tf_random_generator_enabled()
    try:
        return _train_in(cfg, runs_dir, staging, state, log, progress, cluster, shared or staging)
    except KeyboardInterrupt:
        if cluster is not None:
            raise Interrupted("interrupted; the run continues when every worker is started again with the same "
                              "command and TF_CONFIG") from None
        if history:
            raise Interrupted(f"interrupted after epoch {len(history)}; resume with: tlserve train --resume {cfg.name}"
                              + (f" --runs-dir {runs_dir}" if runs_dir else "")) from None
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException as exc:
        # A run with finished epochs stays resumable; one that never trained leaves nothing behind.
        if not history:
            shutil.rmtree(staging, ignore_errors=True)
        peer = _lost_peer(exc) if cluster is not None else None
        if peer is not None:
            raise ClusterLost(f"{cluster.task} lost {peer}; TensorFlow cannot continue a collective without it. "
                              f"Start every worker again with the same command and TF_CONFIG: the run continues "
                              f"after its last backed-up epoch") from None
        raise
    finally:
        # The run's precision is a global Keras policy; later work in this process (export,
        # another run) must not inherit it.
        keras().mixed_precision.set_global_policy(policy)
        if not generator_rng:
            keras().backend.experimental.disable_tf_random_generator()


def _train_in(cfg, runs_dir, staging: Path, state: dict[str, Any], log: Log, progress: bool | None,
              cluster: clusters.Cluster | None, shared: Path) -> records.Run:
    """Train in `staging`. `shared` is where a restart reads from: the staging folder itself, except on a
    multi-worker run's non-chief, which writes to its own temporary folder and reads the chief's."""
    K = keras()
    history: list[dict[str, Any]] = state["history"]
    acc = accelerators.setup(cfg.precision, cfg.jit, cfg.distribute)
    if cluster is not None:
        log(f"{cluster.task} of {cluster.workers} workers ({'chief: writes the run' if cluster.is_chief else 'not chief'}); "
            f"{acc.replicas} replicas in sync")
    if acc.note:
        log(f"warning: {acc.note}")
    if cfg.strategy in ("frozen", "finetune") and cfg.weights == "none":
        log(f"warning: --weights none with -s {cfg.strategy}: the frozen backbone keeps its random weights, so the "
            "head learns from random features (expect little above chance); give --weights imagenet or PATH.h5")
    # Dropout and augmentation draw from tf.random.Generator objects, whose state the run's checkpoints
    # keep: a run resumed mid-phase draws the masks the uninterrupted run would have drawn.
    K.backend.experimental.enable_tf_random_generator()
    K.utils.set_random_seed(cfg.seed)
    dataset = datasets.load_dataset(cfg.data)
    for name in dataset.skipped:
        log(f"skipped (not a readable image): {name}")
    log(f"data: {dataset.source}: {len(dataset.class_names)} classes, train {len(dataset.train)} / "
        f"val {len(dataset.val)} / test {len(dataset.test)} at {dataset.image_size[0]}x{dataset.image_size[1]}")
    dataset, data_check = datacheck.guard(dataset, cfg, log)
    if len(dataset.train) == 0 or len(dataset.test) == 0:
        raise UserError("the data has an empty train or test split; raise --limit or add images")
    imbalance = class_weights.imbalance_warning(dataset.summary()["train_class_counts"])
    if imbalance:
        log(imbalance)
    weights = class_weights.resolve(cfg.class_weight, dataset.train.y, dataset.class_names)
    if weights is not None:
        log("class weights: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                          class_weights.by_name(weights, dataset.class_names).items()))
    source = records.load_run(cfg.from_run, runs_dir) if cfg.from_run else None

    with acc.strategy.scope():
        built, phases = _prepare(cfg, dataset, source)
    model = built.model
    use_cache, cache_reason = feature_cache.decide(cfg, built.backbone is not None)
    if cluster is not None and use_cache:
        use_cache, cache_reason = False, MULTIWORKER_NO_CACHE
    if cfg.strategy in ("frozen", "finetune") and not use_cache:
        log(f"feature cache off: {cache_reason}")
    batch = cfg.batch_size * acc.replicas
    interactive = sys.stdout.isatty() if progress is None else progress
    splits = {"train": dataset.train, "val": dataset.val, "test": dataset.test}
    steps_per_epoch = math.ceil(len(dataset.train) / batch)
    pipes = {"val": _pipeline(dataset.val, batch) if len(dataset.val) else None,
             "test": _pipeline(dataset.test, batch)}

    extract_seconds = 0.0
    cache_facts: dict[str, Any] = {}
    carried: dict[str, tuple[Any, Any]] = {}  # a later phase's (plan, cache), made ahead
    ckpts = _Checkpoints(staging, _random_generators(model), read_from=shared)
    if state.get("checkpoint"):
        # Every finished epoch or phase left the weights it ended with; a resumed run starts from
        # exactly those, whatever is left to do (even nothing but the test and the save).
        ckpts.read(state["checkpoint"], model=model)
    if state.get("resumed") and tensorboard_logs.backfill(staging, history):
        log("tensorboard: wrote the epochs a killed run had saved but not yet logged")
    for phase in phases:
        if phase.before is not None:
            phase.before()  # a finished phase's unfreezing too: the record counts trainable params
        if phase.name in state["phases_done"]:
            continue
        done_in_phase = sum(1 for row in history if row["phase"] == phase.name)
        backup = shared / BACKUP_DIR / phase.name
        if cluster is not None:
            # TensorFlow's backup, not the state file, says how far the phase got: epochs the state
            # recorded after the backup's last one are trained again, so each is in the history once.
            done_in_phase = max(0, min(done_in_phase, _backed_up_epochs(backup) - (len(history) - done_in_phase)))
            del history[len(history) - sum(1 for row in history if row["phase"] == phase.name) + done_in_phase:]
            if state.get("restarted"):
                log(f"{cluster.task}: phase {phase.name} continues after epoch {len(history)}")
        stopping = state.get("stopping") if (state.get("stopping") or {}).get("phase") == phase.name else None
        trained_out = phase.epochs == 0 or done_in_phase >= phase.epochs or bool(stopping and stopping["stopped"])
        evaluate_phase = phase.name == "head" and len(phases) > 1 and phase.epochs > 0
        plan, cache = carried.pop(phase.name, (None, None))  # phase 2's cache, made in phase 1's pass
        if plan is None and cluster is not None:
            cache_facts[phase.name] = {"used": False, "reason": MULTIWORKER_NO_CACHE}
        elif plan is None:
            plan = _cache_plan(cfg, built, model, phase.name, use_cache, log, cache_facts)
        if plan is not None and cache is None and (not trained_out or evaluate_phase):
            later = None
            if phase.name == "head" and cfg.strategy == "finetune" and not trained_out:
                later = _cache_plan(cfg, built, model, "finetune", use_cache, log, cache_facts)
            extractor = plan.extractor if later is None else \
                feature_cache.shared_extractor(model, built.backbone, plan, later)
            t0 = time.perf_counter()
            with acc.strategy.scope():
                cache = feature_cache.extract(extractor, splits, _pipeline, staging / "cache" / phase.name)
            cache.seconds = time.perf_counter() - t0
            extract_seconds += cache.seconds
            log(f"cache: {plan.where}" + (f" and {later.where}" if later else "") +
                f", computed once over {sum(len(s) for s in splits.values())} images in {cache.seconds:.1f}s "
                f"({cache.nbytes / 1e6:,.0f} MB {'on disk' if cache.storage == 'disk' else 'in memory'})")
            if later is not None:
                cache, phase2 = feature_cache.split_cache(cache, 1)
                carried["finetune"] = (later, phase2)
                cache_facts["finetune"].update(bytes=phase2.nbytes, storage=phase2.storage, shapes=phase2.shapes,
                                               seconds=0.0, shared_with="head")
            cache_facts[phase.name].update(bytes=cache.nbytes, storage=cache.storage, shapes=cache.shapes,
                                           seconds=round(cache.seconds, 4))
        with acc.strategy.scope():
            # The phase trains the cached model's layers; its early-stopping weights are of that model too.
            fit_model = plan.trainable if plan is not None else model
            optimizer = _optimizer(cfg, phase.lr, phase.epochs * steps_per_epoch)
            fit_model.compile(optimizer=optimizer, loss=_loss(cfg.label_smoothing), metrics=["accuracy"],
                              jit_compile=acc.jit)
        early = None
        if cfg.patience and pipes["val"] is not None:
            early = _EarlyStopping(cfg.patience, stopping, ckpts)
        if cluster is not None and trained_out and done_in_phase:
            # The phase's last epoch is backed up but the phase was not marked done: its weights are there.
            _restore_backup(backup, model)
        if not trained_out:
            if done_in_phase and cluster is None:
                # Mid-phase: the optimizer's moments and step count (the schedule) come back too.
                with acc.strategy.scope():
                    optimizer.build(fit_model.trainable_variables)
                ckpts.read(state["checkpoint"], model=model, optimizer=optimizer)
            if cache is not None:
                train_x, val_data = cache.splits["train"], _cached_pipeline(cache, "val", dataset.val.y, batch)
            else:
                train_x, val_data = dataset.train.x, pipes["val"]
            log(f"phase {phase.name}: {phase.epochs} epoch(s) at lr {phase.lr:g}; trainable params "
                f"{models.facts(model)['trainable_params']:,}" + (" (on cached activations)" if cache else ""))
            first = len(history)
            remaining = phase.epochs - done_in_phase
            train_data = epoch_batches(train_x, dataset.train.y, batch, seed=cfg.seed,
                                       epochs=range(first, first + remaining))
            elapsed_before = state["elapsed"]
            phase_started = time.perf_counter()

            def save_state(_row: dict[str, Any]) -> None:
                # Checkpoint first, then the state that points to it: a kill between the two leaves
                # the state naming the previous checkpoint, which is still there. On a cluster the
                # epoch's checkpoint is TensorFlow's backup, made after this (see _cluster_backup).
                if cluster is None:
                    state["checkpoint"] = ckpts.write(f"epoch-{len(history)}", model=model, optimizer=optimizer)
                state["stopping"] = early.snapshot(phase.name) if early is not None else None
                state["elapsed"] = elapsed_before + time.perf_counter() - phase_started
                storage.write_json(staging / STATE, state)
                ckpts.prune(keep=(state.get("checkpoint"), (state["stopping"] or {}).get("best_weights")))

            # The early-stopping decision comes first, so the state saved after the epoch includes it.
            # TensorBoard after the state: an epoch's events are written once its state is saved, so a resumed
            # run (which starts at that epoch) never writes an epoch twice. On a cluster the backup comes last:
            # a kill between the state and the backup trains that epoch again.
            callbacks = [c for c in (early, _EpochLog(phase.name, history, None if interactive else log, save_state),
                                     tensorboard_logs.callback(tensorboard_logs.phase_dir(staging, phase.name)),
                                     _cluster_backup(backup, staging / BACKUP_DIR / phase.name) if cluster else None)
                         if c is not None]
            fit_model.fit(train_data, steps_per_epoch=steps_per_epoch, validation_data=val_data, initial_epoch=first,
                          epochs=first + remaining, callbacks=callbacks, verbose=1 if interactive else 0,
                          class_weight=weights)
            state["elapsed"] = elapsed_before + time.perf_counter() - phase_started
        if early is not None:
            early.restore_best(fit_model)
        if evaluate_phase:
            test_data = _cached_pipeline(cache, "test", dataset.test.y, batch) if cache is not None else pipes["test"]
            state["phase1_accuracy"] = float(fit_model.evaluate(test_data, verbose=0)[1])
        if cache is not None and not carried:
            shutil.rmtree(staging / "cache", ignore_errors=True)  # memory-mapped arrays, if any
        del cache
        state["phases_done"].append(phase.name)
        state["stopping"] = None
        state["checkpoint"] = ckpts.write(f"phase-{phase.name}", model=model)
        storage.write_json(staging / STATE, state)
        ckpts.prune(keep=(state["checkpoint"],))
    phase1_accuracy = state.get("phase1_accuracy")

    total_time = state["elapsed"] + extract_seconds
    # After the last phase and before the save: a resumed run restores the last phase's checkpoint (the
    # weights before calibration) and calibrates them the same way, so it ends as an uninterrupted run.
    calibrated = calibration.calibrate(model, cfg.calibrate, pipes["val"], dataset.val.y, pipes["test"], log)
    test = _evaluate(model, pipes["test"], dataset, cfg.label_smoothing)
    calibrated.finish(test.pop("probabilities"), dataset.test.y)
    if phase1_accuracy is not None:
        test["phase1_accuracy"] = phase1_accuracy
    # Every worker saves (the non-chief to its temporary folder), as TensorFlow asks of multi-worker saves.
    model.save(str(staging / records.MODEL))
    storage.write_text(staging / records.HISTORY, records.history_csv(history))
    if cluster is None or cluster.is_chief:
        from training.plots import curves  # noqa: PLC0415 (matplotlib only once a run has finished)

        curves([{"name": cfg.name, "history": history}], staging / records.CURVES)
    shutil.rmtree(staging / "cache", ignore_errors=True)
    shutil.rmtree(staging / BACKUP_DIR, ignore_errors=True)
    training_facts = {"class_weights": class_weights.by_name(weights, dataset.class_names),
                      "feature_cache": use_cache, "feature_cache_reason": cache_reason, "caches": cache_facts,
                      "peak_rss_bytes": feature_cache.peak_rss_bytes(),
                      "extract_seconds": round(extract_seconds, 4), "global_batch_size": batch,
                      "per_replica_batch_size": cfg.batch_size, "resumed": bool(state.get("resumed"))}
    if cluster is not None:
        training_facts["cluster"] = {
            **cluster.facts(), "replicas": acc.replicas, "global_batch_size": batch,
            "per_replica_batch_size": cfg.batch_size, "restarted": bool(state.get("restarted")),
            "fault_tolerance": "tf.keras.callbacks.BackupAndRestore after every epoch, in the chief's staging folder",
            "exact_resume": False,
            "exact_resume_reason": "a restarted cluster continues from TensorFlow's last epoch backup; tlserve's "
                                   "own mid-epoch state is single-process"}
    record = records.build(cfg, dataset, model=model, input_size=built.input_size, history=history, total_time=total_time,
                           test=test, folder=staging, accel=acc, training=training_facts,
                           calibration=calibrated.facts, data_check=data_check)
    storage.write_json(staging / records.RECORD, record.to_dict())
    if cluster is not None and not cluster.is_chief:
        log(f"{cluster.task}: done; the chief writes runs/{cfg.name}")
        return records.Run(staging, record)  # the caller removes the temporary folder
    final = storage.runs_dir(runs_dir) / cfg.name
    # The rename is the moment the run is finished; until then config.json keeps it resumable.
    storage.promote(staging, final, overwrite=cfg.overwrite)
    for leftover in (CONFIG, STATE):
        (final / leftover).unlink(missing_ok=True)
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
        built = models.BuiltModel(model, None, int(source.record.model.input_size), None)
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


def epoch_batches(x, y: np.ndarray, batch_size: int, *, seed: int, epochs: range, shuffle: bool = True):
    """Batches for the given epochs, one iterator over all of them; x is an array or a list of them
    (a model with several inputs), in memory or memory-mapped.

    Epoch e's order depends on (seed, e) alone, so a run resumed at epoch e sees the very batches
    the uninterrupted run saw there. One iterator for the whole fit, read `steps_per_epoch` batches
    an epoch (each epoch still ends with its partial batch): Keras otherwise makes a new iterator
    every epoch, and on full CIFAR-10 the switch measured 11-40 s per epoch here."""
    T = tf()
    n = len(y)
    orders = np.stack([np.random.default_rng((seed, e)).permutation(n) if shuffle else np.arange(n)
                       for e in epochs]) if len(epochs) else np.zeros((0, n), np.int64)
    arrays = list(x) if isinstance(x, (list, tuple)) else [x]
    take = [_gatherer(a) for a in arrays]
    labels = T.convert_to_tensor(y)

    def batch_of(idx):
        xs = tuple(T.cast(t(idx), T.float32) for t in take)
        return (xs if len(xs) > 1 else xs[0]), T.gather(labels, idx)

    ds = T.data.Dataset.from_tensor_slices(orders).flat_map(
        lambda order: T.data.Dataset.from_tensor_slices(order).batch(batch_size))
    # Under MultiWorkerMirroredStrategy every worker builds this same pipeline and keeps its share of
    # each global batch: DATA sharding, since in-memory arrays have no files for FILE sharding to split
    # (AUTO would try FILE first and fall back with a warning).
    options = T.data.Options()
    options.experimental_distribute.auto_shard_policy = T.data.experimental.AutoShardPolicy.DATA
    return ds.map(batch_of, num_parallel_calls=T.data.AUTOTUNE).prefetch(T.data.AUTOTUNE).with_options(options)


LARGE_ARRAY_BYTES = 256 * 2**20


def _gatherer(array: np.ndarray):
    """idx -> array[idx] inside tf.data: from a tensor, or, for a memory-mapped or large cache, read
    from the array batch by batch (a tensor would read a whole file into memory, and would copy a
    large in-memory cache: seed 000's 1.9 GB phase-2 cache twice in memory)."""
    T = tf()
    if isinstance(array, np.memmap) or array.nbytes > LARGE_ARRAY_BYTES:
        shape = array.shape[1:]

        def read(idx):
            return np.asarray(array[idx], dtype=np.float32)

        def gather(idx):
            out = T.numpy_function(read, [idx], T.float32, stateful=False)
            out.set_shape((None, *shape))
            return out

        return gather
    tensor = T.convert_to_tensor(array)
    return lambda idx: T.gather(tensor, idx)


def _cached_pipeline(cache, split: str, y: np.ndarray, batch_size: int):
    """A split's cached activations in order (validation and test)."""
    return _pipeline(datasets.Split(cache.splits[split], y), batch_size) if len(y) else None


def _cache_plan(cfg: TrainConfig, built, model, phase: str, use_cache: bool, log: Log, facts: dict[str, Any]):
    """The phase's feature_cache.Plan, or None (with the reason logged and recorded)."""
    if phase == "head" and use_cache:
        plan = feature_cache.head_plan(model, built.backbone, built.features)
    elif phase == "finetune":
        start = strategies.unfreeze_start(built.backbone, cfg)
        ok, why = feature_cache.decide_finetune(cfg, built.backbone, start)
        if not ok:
            if phase not in facts:
                log(f"phase {phase} cache off: {why}")
            facts[phase] = {"used": False, "reason": why}
            return None
        plan = feature_cache.finetune_plan(model, built.backbone, built.backbone_training, start)
    else:
        return None
    facts[phase] = {"used": True, "what": plan.where}
    return plan


class _Checkpoints:
    """The run's TensorFlow checkpoints and best-epoch weights, named by what they hold.

    A name is recorded in state.json only after its files are complete, and the files of the
    names state.json holds are never removed, so the state always points at a whole checkpoint."""

    def __init__(self, staging: Path, generators: list[Any], read_from: Path | None = None):
        self.staging = staging
        self.folder = staging / CHECKPOINT_DIR
        self.generators = generators  # Keras leaves random state out of model checkpoints
        self.read_from = read_from or staging  # a multi-worker non-chief reads what the chief wrote

    def write(self, name: str, **objects) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        tf().train.Checkpoint(random=self.generators, **objects).write(str(self.folder / name))
        return f"{CHECKPOINT_DIR}/{name}"

    def read(self, ref: str, **objects) -> None:
        tf().train.Checkpoint(random=self.generators, **objects).read(str(self.read_from / ref)).expect_partial()

    def write_arrays(self, name: str, arrays: list[np.ndarray]) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, *arrays)
        tmp.replace(self.folder / name)
        return f"{CHECKPOINT_DIR}/{name}"

    def read_arrays(self, ref: str) -> list[np.ndarray]:
        with np.load(self.read_from / ref) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def prune(self, keep: tuple[str | None, ...]) -> None:
        kept = {Path(ref).name for ref in keep if ref}
        for path in self.folder.glob("*"):
            stem = path.name.split(".index")[0].split(".data-")[0]
            if stem not in kept and path.name != "checkpoint":
                path.unlink(missing_ok=True)


def _backed_up_epochs(backup: Path) -> int:
    """Epochs (counted from the run's first) that the chief's BackupAndRestore folder holds; 0 without one.
    Read before fit, so the data pipeline starts at the epoch Keras will continue from."""
    T = tf()
    latest = T.train.latest_checkpoint(str(backup / "chief"))
    if latest is None:
        return 0
    saved = int(T.train.load_checkpoint(latest).get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    return saved + 1  # the epoch index it saved after (0-based)


def _restore_backup(backup: Path, model) -> None:
    T = tf()
    T.train.Checkpoint(model=model).read(T.train.latest_checkpoint(str(backup / "chief"))).expect_partial()


def _cluster_backup(shared: Path, own: Path):
    """Keras's BackupAndRestore for one phase. The chief writes it in the run's staging folder
    (`shared`); another worker writes its copy (TensorFlow has every worker save) to its own
    temporary folder instead of the chief's, and reads the chief's backup to restore."""
    K, T = keras(), tf()

    class ClusterBackup(K.callbacks.BackupAndRestore):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            if own != shared:
                training_state = self._training_state
                checkpoint = training_state.write_checkpoint_manager._checkpoint
                training_state.read_checkpoint_manager = T.train.CheckpointManager(
                    checkpoint, directory=str(shared / "chief"), max_to_keep=1)
                training_state.restore()

    # Kept after fit: a restart after the phase's last epoch still finds its weights there.
    return ClusterBackup(backup_dir=str(own), save_freq="epoch", delete_checkpoint=False)


_PEER = re.compile(r"/job:(\w+)(?:/replica:\d+)?/task:(\d+)")


def _lost_peer(exc: BaseException) -> str | None:
    """'worker:1' (or 'a peer') when exc is TensorFlow aborting a collective because a worker went away."""
    T = tf()
    lost = (T.errors.UnavailableError, T.errors.AbortedError, T.errors.CancelledError, T.errors.DeadlineExceededError)
    if not isinstance(exc, T.errors.OpError) or not (isinstance(exc, lost) or "ollective" in str(exc)):
        return None
    message = str(exc)
    after = message.split("Error reported from", 1)[-1]
    found = _PEER.search(after) or _PEER.search(message)
    return f"{found.group(1)}:{found.group(2)}" if found else "a peer"


def _random_generators(model) -> list[Any]:
    """The tf.random.Generator of every random layer (dropout, augmentation), in layer order."""
    found = []
    for layer in models.leaf_layers(model):
        rng = getattr(layer, "_random_generator", None)
        if rng is not None:
            rng._maybe_init()
            if getattr(rng, "_generator", None) is not None:
                found.append(rng._generator)
    return found


_early_stopping_cls = None


def _EarlyStopping(patience: int, snapshot: dict[str, Any] | None, ckpts: _Checkpoints):  # noqa: N802
    """Keras's EarlyStopping on val_loss with best-weight restoring, whose progress survives a resume:
    the counter, the best loss and the best epoch's weights (a file) go into the run's state."""
    global _early_stopping_cls
    if _early_stopping_cls is None:
        K = keras()

        class ResumableEarlyStopping(K.callbacks.EarlyStopping):
            def __init__(self, patience: int, snapshot: dict[str, Any] | None, ckpts: _Checkpoints):
                super().__init__(monitor="val_loss", patience=patience, restore_best_weights=True)
                self.ckpts, self.best_ref = ckpts, None
                super().on_train_begin()
                if snapshot is not None:
                    self.wait, self.best, self.best_epoch = snapshot["wait"], snapshot["best"], snapshot["best_epoch"]
                    self.stopped_epoch, self.best_ref = snapshot["stopped"], snapshot["best_weights"]
                    self.best_weights = ckpts.read_arrays(self.best_ref) if self.best_ref else None

            def on_train_begin(self, logs=None):
                pass  # set up once, in __init__, from the saved state: fit must not reset it

            def on_epoch_end(self, epoch, logs=None):
                before = self.best_weights
                super().on_epoch_end(epoch, logs)
                if self.best_weights is not before:
                    self.best_ref = self.ckpts.write_arrays(f"best-epoch-{epoch + 1}.npz", self.best_weights)

            def on_train_end(self, logs=None):
                pass  # restore_best, called by the loop, also runs when a resumed phase has no epoch left

            def restore_best(self, model) -> None:
                if self.best_weights is not None:
                    model.set_weights(self.best_weights)

            def snapshot(self, phase: str) -> dict[str, Any]:
                return {"phase": phase, "wait": self.wait, "best": float(self.best), "best_epoch": self.best_epoch,
                        "stopped": self.stopped_epoch, "best_weights": self.best_ref}

        _early_stopping_cls = ResumableEarlyStopping
    return _early_stopping_cls(patience, snapshot, ckpts)


def _pipeline(split, batch_size: int):
    """A split's batches in order (validation, test, feature extraction): pixels stay uint8 until a
    batch is formed (a quarter of float32's memory); the model itself takes float32 0..255."""
    return epoch_batches(split.x, split.y, batch_size, seed=0, epochs=range(1), shuffle=False)


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


def _Counted(advance):  # noqa: N802 (a Keras callback made after TensorFlow loads)
    """Advances a progress step by each predicted batch's size."""
    K = keras()
    return K.callbacks.LambdaCallback(on_predict_batch_end=lambda batch, logs: advance(len(logs["outputs"])))


def _evaluate(model, test_ds, dataset, label_smoothing: float) -> dict[str, Any]:
    """Test loss (as Keras's evaluate reports it: the training loss, label smoothing included, plus
    regularization, so it compares with val_loss), accuracy, per-class accuracy, precision/recall/F1
    and confusion matrix, from a single pass over the test split."""
    y = dataset.test.y
    with progress.step("test evaluation", len(y)) as advance:
        probs = model.predict(test_ds, verbose=0, callbacks=[_Counted(advance)])
    per_image = keras().losses.get(_loss(label_smoothing))(y, probs)  # the very loss the run trained on
    regularization = float(sum(float(v) for v in model.losses)) if model.losses else 0.0
    loss = float(np.mean(per_image)) + regularization
    pred = probs.argmax(axis=1)
    accuracy = float(np.mean(pred == y))
    matrix = metrics.confusion(y, pred, len(dataset.class_names))
    per_class = {name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
                 for i, name in enumerate(dataset.class_names)}
    scores = metrics.summary(matrix, dataset.class_names)
    return {"loss": float(loss), "accuracy": float(accuracy), "per_class_accuracy": per_class,
            "confusion_matrix": matrix.tolist(), "per_class": scores["per_class"],
            "macro_f1": scores["macro_f1"], "weighted_f1": scores["weighted_f1"], "probabilities": probs}
