"""The training loop: config in, finished run folder out.

A run is built in `runs/.<name>.partial/` and renamed into place only once
record.json is written, so a half-finished run is never mistaken for a
finished one. The partial folder holds the resolved config, the run's state
(`run_state.RunState`) and a checkpoint (model + optimizer) after every epoch:
an interrupted run resumes from there (`tlserve train --resume NAME`).

The run reads as config -> data -> model and phases (`phases.plan`) -> each
phase through `phases.fit_phase` -> test -> record. On a TF_CONFIG cluster
(MultiWorkerMirroredStrategy) only the chief builds that folder; the epoch
checkpoint is Keras's BackupAndRestore, which a restarted cluster continues
from (`_train_in_cluster`, docs/distributed.md).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import storage
from serving.base.errors import UserError
from training.fit import accel as accelerators, calibration, callbacks, class_weights, cluster as clusters, distill, feature_cache, optim, phases
from training.data import sources as datasets, views
from training.audit import guard as data_guard
from training.record import metrics, records, tensorboard_logs
from training import progress
from training.fit.checkpoints import BACKUP_DIR, Checkpoints, lost_peer, random_generators
from training.config import DataSpec, TrainConfig
from training.env import keras
from training.errors import ClusterLost, Interrupted
from training.fit.run_state import STATE, RunState
from training.fit.validation import resolve

Log = Callable[[str], None]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CONFIG = TrainConfig.FILE  # the resolved config in the staging folder


def default_name(cfg: TrainConfig) -> str:
    spec = DataSpec.parse(cfg.data.spec)
    data = re.sub(r"[^A-Za-z0-9]+", "-", Path(spec.path).name if spec.path else spec.scheme).strip("-") or spec.scheme
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
    if cfg.teacher:
        distill.check_teacher(cfg, runs_dir)
    # The folder appears with its config already in it, so a partial folder is always resumable.
    with storage.staged_dir(staging, overwrite=False) as fresh:
        storage.write_json(fresh / CONFIG, cfg.to_dict())
    return _run(cfg, runs_dir, staging, RunState(), log, progress)


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
    if restarted and not _same_config(TrainConfig.read(config_file).to_dict(), cfg.to_dict()):
        if not (cluster.is_chief and cfg.overwrite):
            raise UserError(f"an interrupted run '{cfg.name}' with another configuration exists in {shared.parent}; "
                            "restart the workers with its command, or start over with another --name or --overwrite")
        shutil.rmtree(shared)
        restarted = False
    state = RunState.load(shared) if restarted else RunState()
    state.cluster = True  # --resume refuses it: its epochs are in TensorFlow's backup, not in tlserve's checkpoints
    if cluster.is_chief:
        if shared.exists() and not restarted:
            shutil.rmtree(shared, ignore_errors=True)  # killed before it wrote its config: nothing to continue
        if not restarted:
            with storage.staged_dir(shared, overwrite=False) as fresh:
                storage.write_json(fresh / CONFIG, cfg.to_dict())
        staging = shared
    else:
        staging = clusters.worker_folder(cfg.name, cluster, storage.runs_dir(runs_dir))
    if restarted and (shared / STATE).is_file():
        # (A config alone is the chief's fresh start seen by a quicker worker, or a run killed before epoch 1.)
        state.restarted = True
        log(f"{cluster.task}: continuing '{cfg.name}' from the backup in {shared}")
    try:
        return _run(cfg, runs_dir, staging, state, log, progress, cluster=cluster, shared=shared)
    finally:
        if not cluster.is_chief:
            shutil.rmtree(staging, ignore_errors=True)


def interrupted(runs_dir: Path | None = None) -> list[tuple[str, int]]:
    """(name, epochs done) of every run that can be resumed."""
    return [(path.name[1:-len(".partial")], len(RunState.load(path).history))
            for path in sorted(storage.runs_dir(runs_dir).glob(".*.partial")) if (path / CONFIG).is_file()]


def resume(name: str, runs_dir: Path | None = None, *, log: Log = print, progress: bool | None = None) -> records.Run:
    staging = partial_dir(name, runs_dir)
    if not (staging / CONFIG).is_file():
        done = (storage.runs_dir(runs_dir) / name / records.RECORD).is_file()
        raise UserError(f"run '{name}' already finished; nothing to resume" if done else
                        f"no interrupted run named '{name}' in {storage.runs_dir(runs_dir)}")
    cfg = TrainConfig.read(staging / CONFIG)
    if clusters.from_env(cfg.distribute, os.environ.get("TF_CONFIG")) is not None:
        raise UserError(f"a multi-worker run continues when its workers are started again with the run's own command "
                        f"(--name {name}) and TF_CONFIG; --resume is for single-process runs")
    state = RunState.load(staging)
    if state.cluster:
        raise UserError(f"run '{name}' trains on a TF_CONFIG cluster: start every worker again with its command "
                        f"(--name {name}) and TF_CONFIG to continue it")
    state.resumed = True
    log(f"resuming '{name}' after epoch {len(state.history)}")
    return _run(cfg, runs_dir, staging, state, log, progress)


def _run(cfg: TrainConfig, runs_dir: Path | None, staging: Path, state: RunState, log: Log,
         progress: bool | None, *, cluster: clusters.Cluster | None = None, shared: Path | None = None) -> records.Run:
    history = state.history
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
        peer = lost_peer(exc) if cluster is not None else None
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


@dataclass
class Loaded:
    """A run's data as it trains: after --exclude and the data check."""
    dataset: Any
    data_check: dict[str, Any] | None        # the record's data_check (None: --data-check off)
    copies: data_guard.HeldCopies | None     # held-out images that copy what the model learns from
    excluded: dict[str, Any] | None          # the record's excluded (None: no --exclude)
    weights: dict[int, float] | None         # class weights


def load_data(cfg: TrainConfig, log: Log) -> Loaded:
    """The dataset after --exclude and the data check, with what they found and the class weights, logged."""
    dataset = datasets.load_dataset(cfg.data)
    for name, why in dataset.skipped.items():
        log(f"skipped {name}: {why}")
    log(f"data: {dataset.source}: {len(dataset.class_names)} classes, train {len(dataset.train)} / "
        f"val {len(dataset.val)} / test {len(dataset.test)} at {dataset.image_size[0]}x{dataset.image_size[1]}")
    dataset, excluded = data_guard.exclude(dataset, cfg.exclude, log)
    dataset, data_check, copies = data_guard.guard(dataset, cfg, log)
    if len(dataset.train) == 0 or len(dataset.test) == 0:
        raise UserError("the data has an empty train or test split; raise --limit or add images")
    imbalance = class_weights.imbalance_warning(dataset.summary()["train_class_counts"])
    if imbalance:
        log(imbalance)
    weights = class_weights.resolve(cfg.class_weight, dataset.train.y, dataset.class_names)
    if weights is not None:
        log("class weights: " + ", ".join(f"{k} {v:.3g}" for k, v in
                                          class_weights.by_name(weights, dataset.class_names).items()))
    return Loaded(dataset, data_check, copies, excluded, weights)


def _train_in(cfg, runs_dir, staging: Path, state: RunState, log: Log, progress: bool | None,
              cluster: clusters.Cluster | None, shared: Path) -> records.Run:
    """Train in `staging`. `shared` is where a restart reads from: the staging folder itself, except on a
    multi-worker run's non-chief, which writes to its own temporary folder and reads the chief's."""
    acc = _start(cfg, cluster, log)
    data = load_data(cfg, log)
    dataset = data.dataset
    source = records.load_run(cfg.from_run, runs_dir) if cfg.from_run else None
    augmented = augmented_views(cfg, dataset, log) if cfg.augment_views else None
    distilled = distill.targets(cfg, dataset, distill.check_teacher(cfg, runs_dir), data.weights, runs_dir, log,
                                augmented) if cfg.teacher else None  # the class weights go into its targets
    with acc.strategy.scope():
        built, plan = phases.plan(cfg, dataset, source)
    run, cache_reason = _phases_run(cfg, acc, built, dataset, state, staging, shared, cluster, log, progress,
                                    data.weights, distilled, augmented)
    if state.checkpoint:
        # Every finished epoch or phase left the weights it ended with; a resumed run starts from
        # exactly those, whatever is left to do (even nothing but the test and the save).
        run.ckpts.read(state.checkpoint, model=built.model)
    if state.resumed and tensorboard_logs.backfill(staging, state.history):
        log("tensorboard: wrote the epochs a killed run had saved but not yet logged")
    for phase in plan:
        phases.fit_phase(run, phase, phase1_of_two=phase.name == "head" and len(plan) > 1)
    record = _finish(run, cache_reason, data, distilled, augmented)
    if cluster is not None and not cluster.is_chief:
        log(f"{cluster.task}: done; the chief writes runs/{cfg.name}")
        return records.Run(staging, record)  # the caller removes the temporary folder
    final = storage.runs_dir(runs_dir) / cfg.name
    # The rename is the moment the run is finished; until then config.json keeps it resumable.
    storage.promote(staging, final, overwrite=cfg.overwrite)
    for leftover in (CONFIG, STATE):
        (final / leftover).unlink(missing_ok=True)
    return records.Run(final, record)


@dataclass
class Augmented:
    """--augment-views: the K views of every training image, rendered at the data's size."""
    params: np.ndarray       # (n, K, 5 or 8): training.data.views.draw
    x: np.ndarray            # (n * K, h, w, 3) uint8, image i's view k at row i * K + k
    facts: dict[str, Any]    # the record's training.augment_views
    soft: np.ndarray | None = None  # a mixing policy's labels, (n * K, classes): views.mixed_labels


def augmented_views(cfg: TrainConfig, dataset, log: Log) -> Augmented:
    _views_fit_in_memory(cfg.augment_views, dataset.train.x)
    t0 = time.perf_counter()
    params = views.draw(cfg.augment_policy, len(dataset.train), cfg.augment_views, cfg.seed)
    x = views.render_all(dataset.train.x, params)
    seconds = time.perf_counter() - t0
    log(f"augmented views: {cfg.augment_views} per training image ({cfg.augment_policy}), {len(x)} rendered in "
        f"{seconds:.1f}s; one per image each epoch")
    soft = (views.mixed_labels(dataset.train.y, params, len(dataset.class_names))
            if distill.mixing(cfg) else None)
    return Augmented(params, x, {"views": cfg.augment_views, "policy": cfg.augment_policy, "recipe_version": views.VERSION,
                                 "recipe": views.recipe_key(cfg.augment_policy, params), "images": int(len(x)),
                                 "seconds": round(seconds, 4)}, soft)


def _views_fit_in_memory(k: int, x: np.ndarray) -> None:
    """Refuse, before rendering, K views that would take more than half the memory free now: the
    training batches, the model and the teacher's renders need the rest."""
    import psutil  # noqa: PLC0415 (only --augment-views needs it)
    need, free = k * x.nbytes, psutil.virtual_memory().available  # render_all's array: K rows per image, x's dtype
    if need > free / 2:
        size = lambda b: f"{b / 2**30:.1f} GB" if b >= 2**30 else f"{b / 2**20:.1f} MB"  # noqa: E731
        raise UserError(f"--augment-views {k}: {k} views of {len(x)} training images at {x.shape[1]}x{x.shape[2]} "
                        f"take {size(need)}, more than half the {size(free)} free; "
                        f"use fewer views, a smaller --image-size or --limit")


def _start(cfg: TrainConfig, cluster: clusters.Cluster | None, log: Log) -> accelerators.Accel:
    """The devices, precision and distribution of the run, logged, and its random generators seeded."""
    K = keras()
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
    return acc


def _phases_run(cfg: TrainConfig, acc, built, dataset, state: RunState, staging: Path, shared: Path,
                cluster: clusters.Cluster | None, log: Log, progress: bool | None,
                weights, distilled, augmented: Augmented | None = None) -> tuple[phases.Run, str]:
    """What every phase shares (batches, pipelines, checkpoints, the feature cache decision), and why
    the cache is used or not."""
    use_cache, cache_reason = feature_cache.decide(cfg, built.backbone is not None)
    if cluster is not None and use_cache:
        use_cache, cache_reason = False, phases.MULTIWORKER_NO_CACHE
    if cfg.strategy in ("frozen", "finetune") and not use_cache:
        log(f"feature cache off: {cache_reason}")
    batch = cfg.batch_size * acc.replicas
    # Mixed views carry mixed labels: packed targets (with the class weights in them), even without a teacher.
    mixed = None if distilled or augmented is None or augmented.soft is None else distill.label_targets(augmented.soft, weights)
    pipes = {"val": datasets.pipeline(dataset.val, batch) if len(dataset.val) else None,
             "test": datasets.pipeline(dataset.test, batch)}
    ckpts = Checkpoints(staging, random_generators(built.model), read_from=shared)
    run = phases.Run(cfg=cfg, acc=acc, built=built, dataset=dataset, state=state, ckpts=ckpts, staging=staging,
                     shared=shared, cluster=cluster, log=log, interactive=sys.stdout.isatty() if progress is None else progress,
                     class_weights=None if distilled or mixed is not None else weights, use_cache=use_cache,
                     batch=batch, pipes=pipes, train_targets=distilled.targets if distilled else mixed,
                     train_views=augmented.x if augmented else None, views=cfg.augment_views or 1)
    return run, cache_reason


def _finish(run: phases.Run, cache_reason: str, data: Loaded, distilled,
            augmented: Augmented | None = None) -> records.RunRecord:
    """After the last phase: calibrate (on validation images that copy no training image), test (also on the
    test images that copy none), save the model and its files, and write the record."""
    cfg, model, dataset, state, staging = run.cfg, run.built.model, run.dataset, run.state, run.staging
    copies = data.copies
    total_time = state.elapsed + run.extract_seconds
    # After the last phase and before the save: a resumed run restores the last phase's checkpoint (the
    # weights before calibration) and calibrates them the same way, so it ends as an uninterrupted run.
    calibrated = calibration.calibrate(model, cfg.calibrate, run.pipes["val"], dataset.val.y, run.pipes["test"], run.log,
                                       val_copies=None if copies is None else copies.val)
    test = evaluate(model, run.pipes["test"], dataset, cfg.label_smoothing, None if copies is None else copies.test)
    calibrated.finish(test.pop("probabilities"), dataset.test.y, run.log)
    if state.phase1_accuracy is not None:
        test["phase1_accuracy"] = state.phase1_accuracy
    # Every worker saves (the non-chief to its temporary folder), as TensorFlow asks of multi-worker saves.
    model.save(str(staging / records.MODEL))
    storage.write_text(staging / records.HISTORY, records.history_csv(state.history))
    if run.cluster is None or run.cluster.is_chief:
        from training.record.plots import curves  # noqa: PLC0415 (matplotlib only once a run has finished)

        curves([{"name": cfg.name, "history": state.history}], staging / records.CURVES)
    shutil.rmtree(staging / "cache", ignore_errors=True)
    shutil.rmtree(staging / BACKUP_DIR, ignore_errors=True)
    record = records.build(cfg, dataset, model=model, input_size=run.built.input_size, history=state.history,
                           total_time=total_time, test=test, folder=staging, accel=run.acc,
                           training=_training_facts(run, cache_reason, augmented), calibration=calibrated.facts,
                           data_check=data.data_check, excluded=data.excluded,
                           distillation=distilled.facts if distilled else None)
    storage.write_json(staging / records.RECORD, record.to_dict())
    return record


def _training_facts(run: phases.Run, cache_reason: str, augmented: Augmented | None = None) -> dict[str, Any]:
    """The record's `training` section: batches, caches, class weights and, on a cluster, the cluster."""
    cfg, acc, cluster = run.cfg, run.acc, run.cluster
    facts = {"class_weights": class_weights.by_name(run.class_weights, run.dataset.class_names),
             "feature_cache": run.use_cache, "feature_cache_reason": cache_reason, "caches": run.cache_facts,
             "peak_rss_bytes": feature_cache.peak_rss_bytes(),
             "extract_seconds": round(run.extract_seconds, 4), "global_batch_size": run.batch,
             "per_replica_batch_size": cfg.batch_size, "resumed": run.state.resumed,
             "augment_views": augmented.facts if augmented else None}
    if cluster is not None:
        facts["cluster"] = {
            **cluster.facts(), "replicas": acc.replicas, "global_batch_size": run.batch,
            "per_replica_batch_size": cfg.batch_size, "restarted": run.state.restarted,
            "fault_tolerance": "tf.keras.callbacks.BackupAndRestore after every epoch, in the chief's staging folder",
            "exact_resume": False,
            "exact_resume_reason": "a restarted cluster continues from TensorFlow's last epoch backup; tlserve's "
                                   "own mid-epoch state is single-process"}
    return facts


def evaluate(model, test_ds, dataset, label_smoothing: float, copies: np.ndarray | None = None) -> dict[str, Any]:
    """Test loss (as Keras's evaluate reports it: the training loss, label smoothing included, plus
    regularization, so it compares with val_loss), accuracy, per-class accuracy, precision/recall/F1
    and confusion matrix, from a single pass over the test split; and the accuracy on the test images
    that are not `copies` (the data check's; None when it did not run)."""
    y = dataset.test.y
    with progress.step("test evaluation", len(y)) as advance:
        probs = model.predict(test_ds, verbose=0, callbacks=[callbacks.counted(advance)])
    per_image = keras().losses.get(optim.loss(label_smoothing))(y, probs)  # the very loss the run trained on
    regularization = float(sum(float(v) for v in model.losses)) if model.losses else 0.0
    loss = float(np.mean(per_image)) + regularization
    pred = probs.argmax(axis=1)
    accuracy = float(np.mean(pred == y))
    matrix = metrics.confusion(y, pred, len(dataset.class_names))
    per_class = {name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
                 for i, name in enumerate(dataset.class_names)}
    scores = metrics.summary(matrix, dataset.class_names)
    clean = np.ones(len(y), bool)
    if copies is not None:
        clean[copies] = False
    return {"loss": float(loss), "accuracy": float(accuracy), "per_class_accuracy": per_class,
            "confusion_matrix": matrix.tolist(), "per_class": scores["per_class"],
            "macro_f1": scores["macro_f1"], "weighted_f1": scores["weighted_f1"],
            "leak_free_accuracy": float(np.mean(pred[clean] == y[clean])) if copies is not None and clean.any() else None,
            "leak_free_images": None if copies is None else int(clean.sum()), "probabilities": probs}
