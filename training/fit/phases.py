"""A run's phases and the one function every phase trains through.

Strategies differ only in their phases: scratch and full train everything once (`train`), frozen
trains the head (`head`), finetune trains the head and then the top of the backbone (`head`,
`finetune`), and --from-run trains a moved model's last layers (`transfer`). `fit_phase` does for
each what the run's config asks: feature caching, early stopping, the epoch checkpoint (or
TensorFlow's backup on a cluster), and continuing where an interrupted phase stopped.
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base.errors import UserError
from training.fit import callbacks, distill, feature_cache, optim
from training.model import build as models, strategies
from training.record import records, tensorboard_logs
from training.fit.accel import Accel
from training.fit.checkpoints import BACKUP_DIR, Checkpoints, backed_up_epochs, cluster_backup, restore_backup
from training.fit.cluster import Cluster
from training.config import TrainConfig
from training.data.sources import Dataset, epoch_batches, pipeline
from training.fit.run_state import RunState

Log = Callable[[str], None]
MULTIWORKER_NO_CACHE = ("multi-worker training: TensorFlow's backup covers the model being fit, and every worker "
                        "would extract the whole cache itself")


@dataclasses.dataclass
class Phase:
    name: str
    epochs: int
    lr: float
    before: Callable[[], None] | None = None  # run before the phase, even a finished one (finetune's unfreezing)


def plan(cfg: TrainConfig, dataset: Dataset, source: records.Run | None) -> tuple[models.BuiltModel, list[Phase]]:
    """The model (built, or moved from `source`) and the phases that train it."""
    num_classes = len(dataset.class_names)
    if source is not None:
        src_model = models.load_model(source.model_path)
        expected = tuple(src_model.input_shape[1:3])
        if expected != tuple(dataset.image_size):
            raise UserError(f"--from-run {source.name} takes {expected[0]}x{expected[1]} images; this data is "
                            f"{dataset.image_size[0]}x{dataset.image_size[1]} (set --image-size)")
        model = strategies.transfer_from(src_model, num_classes, cfg.train_last)
        built = models.BuiltModel(model, None, int(source.record.model.input_size), None)
        return built, [Phase("transfer", cfg.epochs, cfg.lr)]
    built = models.build(cfg, dataset.image_size, num_classes)
    if cfg.strategy in ("frozen", "finetune"):
        strategies.check_unfreeze(built.backbone, cfg)
        strategies.freeze_backbone(built.backbone)
    if cfg.strategy == "frozen":
        return built, [Phase("head", cfg.epochs, cfg.lr)]
    if cfg.strategy == "finetune":
        return built, [Phase("head", cfg.epochs, cfg.lr),
                       Phase("finetune", cfg.finetune_epochs, cfg.finetune_lr,
                             before=lambda: strategies.unfreeze_top(built.backbone, cfg))]
    return built, [Phase("train", cfg.epochs, cfg.lr)]


@dataclasses.dataclass
class Run:
    """What every phase of one run shares; `fit_phase` adds to the state, caches and extract time."""
    cfg: TrainConfig
    acc: Accel
    built: models.BuiltModel
    dataset: Dataset
    state: RunState
    ckpts: Checkpoints
    staging: Path                       # where this process writes
    shared: Path                        # where a restart reads from (a cluster non-chief: the chief's folder)
    cluster: Cluster | None
    log: Log
    interactive: bool
    class_weights: dict[int, float] | None
    use_cache: bool
    batch: int                          # the global batch
    pipes: dict[str, Any]               # "val" (None without a validation split) and "test" in order
    cache_facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    carried: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # a later phase's (plan, cache)
    extract_seconds: float = 0.0
    train_targets: Any = None           # --teacher: packed targets (training.fit.distill) in place of the labels
    train_views: Any = None             # --augment-views: (n * K, h, w, 3) views in place of the training images
    views: int = 1                      # K: rows per training image in train_views and the targets

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.dataset.train) / self.batch)

    @property
    def splits(self) -> dict[str, Any]:
        return {"train": self.dataset.train, "val": self.dataset.val, "test": self.dataset.test}


def fit_phase(run: Run, phase: Phase, *, phase1_of_two: bool) -> None:
    """Train one phase to its end (or continue it), leaving its weights in a checkpoint and the
    phase in the state's phases_done. `phase1_of_two`: finetune's head phase, whose test accuracy
    the record keeps."""
    cfg, state, model = run.cfg, run.state, run.built.model
    if phase.before is not None:
        phase.before()  # a finished phase's unfreezing too: the record counts trainable params
    if phase.name in state.phases_done:
        return
    backup = run.shared / BACKUP_DIR / phase.name
    done_in_phase = _epochs_done(run, phase, backup)
    stopping = state.stopping if (state.stopping or {}).get("phase") == phase.name else None
    trained_out = phase.epochs == 0 or done_in_phase >= phase.epochs or bool(stopping and stopping["stopped"])
    evaluate_phase = phase1_of_two and phase.epochs > 0
    plan_, cache = _phase_cache(run, phase, trained_out, evaluate_phase)
    with run.acc.strategy.scope():
        # The phase trains the cached model's layers; its early-stopping weights are of that model too.
        fit_model = plan_.trainable if plan_ is not None else model
        optimizer = optim.optimizer(cfg, phase.lr, phase.epochs * run.steps_per_epoch)
        fit_model.compile(optimizer=optimizer, **distill.compile_args(cfg, len(run.dataset.class_names)),
                          jit_compile=run.acc.jit)
    early = None
    if cfg.patience and run.pipes["val"] is not None:
        early = callbacks.early_stopping(cfg.patience, stopping, run.ckpts)
    if run.cluster is not None and trained_out and done_in_phase:
        # The phase's last epoch is backed up but the phase was not marked done: its weights are there.
        restore_backup(backup, model)
    if not trained_out:
        if done_in_phase and run.cluster is None:
            # Mid-phase: the optimizer's moments and step count (the schedule) come back too.
            with run.acc.strategy.scope():
                optimizer.build(fit_model.trainable_variables)
            run.ckpts.read(state.checkpoint, model=model, optimizer=optimizer)
        _fit(run, phase, fit_model, optimizer, early, cache, done_in_phase, backup)
    if early is not None:
        early.restore_best(fit_model)
    if evaluate_phase:
        test_data = feature_cache.cached_pipeline(cache, "test", run.dataset.test.y, run.batch) \
            if cache is not None else run.pipes["test"]
        state.phase1_accuracy = float(fit_model.evaluate(test_data, verbose=0)[1])
    if cache is not None and not run.carried:
        shutil.rmtree(run.staging / "cache", ignore_errors=True)  # memory-mapped arrays, if any
    del cache
    state.phases_done.append(phase.name)
    state.stopping = None
    state.checkpoint = run.ckpts.write(f"phase-{phase.name}", model=model)
    state.save(run.staging)
    run.ckpts.prune(keep=(state.checkpoint,))


def _epochs_done(run: Run, phase: Phase, backup: Path) -> int:
    """Epochs of the phase already trained. On a cluster TensorFlow's backup, not the state file, says
    how far the phase got: epochs the state recorded after the backup's last one are trained again
    (and leave the history), so each is in the history once."""
    history = run.state.history
    done = run.state.epochs_in(phase.name)
    if run.cluster is None:
        return done
    before_phase = len(history) - done
    done = max(0, min(done, backed_up_epochs(backup) - before_phase))
    del history[before_phase + done:]
    if run.state.restarted:
        run.log(f"{run.cluster.task}: phase {phase.name} continues after epoch {len(history)}")
    return done


def _phase_cache(run: Run, phase: Phase, trained_out: bool, evaluate_phase: bool):
    """(feature_cache.Plan, Cache) the phase trains on, or Nones to train on pixels. Finetune's head
    phase extracts phase 2's cache in the same pass and carries it over."""
    cfg, built = run.cfg, run.built
    plan_, cache = run.carried.pop(phase.name, (None, None))
    if plan_ is None and run.cluster is not None:
        run.cache_facts[phase.name] = {"used": False, "reason": MULTIWORKER_NO_CACHE}
    elif plan_ is None:
        plan_ = feature_cache.phase_plan(cfg, built, phase.name, run.use_cache, run.log, run.cache_facts)
    if plan_ is None or cache is not None or (trained_out and not evaluate_phase):
        return plan_, cache
    later = None
    if phase.name == "head" and cfg.strategy == "finetune" and not trained_out:
        later = feature_cache.phase_plan(cfg, built, "finetune", run.use_cache, run.log, run.cache_facts)
    extractor = plan_.extractor if later is None else \
        feature_cache.shared_extractor(built.model, built.backbone, plan_, later)
    t0 = time.perf_counter()
    with run.acc.strategy.scope():
        cache = feature_cache.extract(extractor, run.splits, pipeline, run.staging / "cache" / phase.name)
    cache.seconds = time.perf_counter() - t0
    run.extract_seconds += cache.seconds
    run.log(f"cache: {plan_.where}" + (f" and {later.where}" if later else "") +
            f", computed once over {sum(len(s) for s in run.splits.values())} images in {cache.seconds:.1f}s "
            f"({cache.nbytes / 1e6:,.0f} MB {'on disk' if cache.storage == 'disk' else 'in memory'})")
    if later is not None:
        cache, phase2 = feature_cache.split_cache(cache, 1)
        run.carried["finetune"] = (later, phase2)
        run.cache_facts["finetune"].update(bytes=phase2.nbytes, storage=phase2.storage, shapes=phase2.shapes,
                                           seconds=0.0, shared_with="head")
    run.cache_facts[phase.name].update(bytes=cache.nbytes, storage=cache.storage, shapes=cache.shapes,
                                       seconds=round(cache.seconds, 4))
    return plan_, cache


def _fit(run: Run, phase: Phase, fit_model, optimizer, early, cache, done_in_phase: int, backup: Path) -> None:
    """Keras's fit over the phase's remaining epochs, saving the state after each."""
    state, dataset, history, model = run.state, run.dataset, run.state.history, run.built.model
    if cache is not None:
        train_x = cache.splits["train"]
        val_data = feature_cache.cached_pipeline(cache, "val", dataset.val.y, run.batch)
    else:
        train_x = dataset.train.x if run.train_views is None else run.train_views
        val_data = run.pipes["val"]
    run.log(f"phase {phase.name}: {phase.epochs} epoch(s) at lr {phase.lr:g}; trainable params "
            f"{models.facts(model)['trainable_params']:,}" + (" (on cached activations)" if cache else ""))
    first = len(history)
    remaining = phase.epochs - done_in_phase
    labels = np.repeat(dataset.train.y, run.views) if run.train_targets is None else run.train_targets
    train_data = epoch_batches(train_x, labels, run.batch, seed=run.cfg.seed,
                               epochs=range(first, first + remaining), views=run.views)
    elapsed_before = state.elapsed
    phase_started = time.perf_counter()

    def save_state(_row: dict[str, Any]) -> None:
        # Checkpoint first, then the state that points to it: a kill between the two leaves
        # the state naming the previous checkpoint, which is still there. On a cluster the
        # epoch's checkpoint is TensorFlow's backup, made after this (see cluster_backup).
        if run.cluster is None:
            state.checkpoint = run.ckpts.write(f"epoch-{len(history)}", model=model, optimizer=optimizer)
        state.stopping = early.snapshot(phase.name) if early is not None else None
        state.elapsed = elapsed_before + time.perf_counter() - phase_started
        state.save(run.staging)
        run.ckpts.prune(keep=(state.checkpoint, (state.stopping or {}).get("best_weights")))

    # The early-stopping decision comes first, so the state saved after the epoch includes it.
    # TensorBoard after the state: an epoch's events are written once its state is saved, so a resumed
    # run (which starts at that epoch) never writes an epoch twice. On a cluster the backup comes last:
    # a kill between the state and the backup trains that epoch again.
    epoch_log = callbacks.epoch_log(phase.name, history, None if run.interactive else run.log, save_state)
    board = tensorboard_logs.callback(tensorboard_logs.phase_dir(run.staging, phase.name))
    backup_cb = cluster_backup(backup, run.staging / BACKUP_DIR / phase.name) if run.cluster else None
    fit_model.fit(train_data, steps_per_epoch=run.steps_per_epoch, validation_data=val_data, initial_epoch=first,
                  epochs=first + remaining, callbacks=[c for c in (early, epoch_log, board, backup_cb) if c is not None],
                  verbose=1 if run.interactive else 0, class_weight=run.class_weights)
    state.elapsed = elapsed_before + time.perf_counter() - phase_started
