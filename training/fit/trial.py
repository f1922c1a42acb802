"""One configuration after another on one data set: the trials of `tlserve tune`.

A trial trains what `tlserve train` would (the same model, phases, optimizer, loss, class weights,
early stopping, batches) and reports its validation accuracy after every epoch, but writes
nothing: no staging folder, no checkpoint, no test evaluation (the search sees validation only).
What a frozen part of the model computes is cached across trials, not just across epochs: the
backbone's output for the head phase, and for finetune's phase 2 the boundary below each unfreeze
point a trial asks for. The search space holds no option that changes those frozen weights
(backbone, weights, input size, truncation), so every trial reads the same numbers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base.errors import UserError
from training.config import TrainConfig
from training.data.sources import Dataset, Split, epoch_batches, pipeline
from training.env import keras
from training.fit import class_weights, feature_cache, optim, phases
from training.model import build as models, strategies

Report = Callable[[int, float], None]  # (epoch index over all phases, val accuracy); may raise to stop the trial


@dataclass
class TrialResult:
    val_accuracy: float
    epochs: int              # epochs trained, over all phases (early stopping can end a phase early)
    seconds: float


@dataclass
class Trainer:
    """Trains configurations on `dataset` (its train and val splits only), keeping frozen activations."""
    dataset: Dataset
    scratch: Path            # where a cache past feature_cache's in-memory limit is memory-mapped
    caches: dict[tuple[Any, ...], list[np.ndarray]] = field(default_factory=dict)  # key -> [train, val] arrays
    extract_seconds: float = 0.0

    def __post_init__(self) -> None:
        if len(self.dataset.val) == 0:
            raise UserError("tune measures every trial on the validation split, and this data has none; "
                            "set --val-split above 0")

    def fit(self, cfg: TrainConfig, report: Report) -> TrialResult:
        """Train `cfg` (resolved) from its seed and return its validation accuracy at the end, after
        early stopping restored its best weights, as `tlserve train` would keep them."""
        K = keras()
        t0 = time.perf_counter()
        K.backend.clear_session()  # each trial builds a model; without this the graph grows trial after trial
        K.backend.experimental.enable_tf_random_generator()
        K.utils.set_random_seed(cfg.seed)
        weights = class_weights.resolve(cfg.class_weight, self.dataset.train.y, self.dataset.class_names)
        if cfg.strategy == "frozen" and feature_cache.decide(cfg, True)[0]:
            # The head alone, on features extracted once for the whole study: no backbone is built.
            train_x, val_x = self._cached(("head", models.pooled_head(cfg)), lambda: self._head_extractor(cfg))
            model = models.head_model(cfg, train_x.shape[1:], len(self.dataset.class_names))
            val_data = pipeline(Split(val_x, self.dataset.val.y), cfg.batch_size)
            epochs = self._fit_phase(cfg, phases.Phase("head", cfg.epochs, cfg.lr), model, train_x, val_data,
                                     weights, 0, report)
            return TrialResult(float(model.evaluate(val_data, verbose=0)[1]), epochs, time.perf_counter() - t0)
        built, plan = phases.plan(cfg, self.dataset, None)
        use_cache, _ = feature_cache.decide(cfg, built.backbone is not None)
        epochs, fit_model, val_data = 0, built.model, None
        for phase in plan:
            if phase.before is not None:
                phase.before()
            if phase.epochs == 0:
                continue
            cached = feature_cache.phase_plan(cfg, built, phase.name, use_cache, lambda _line: None, {})
            if cached is not None:
                train_x, val_x = self._cached(self._key(cfg, built, phase.name, cached), lambda: cached.extractor)
                fit_model, val_data = cached.trainable, pipeline(Split(val_x, self.dataset.val.y), cfg.batch_size)
            else:
                train_x, fit_model, val_data = self.dataset.train.x, built.model, pipeline(self.dataset.val, cfg.batch_size)
            epochs += self._fit_phase(cfg, phase, fit_model, train_x, val_data, weights, epochs, report)
        return TrialResult(float(fit_model.evaluate(val_data, verbose=0)[1]), epochs, time.perf_counter() - t0)

    def _head_extractor(self, cfg: TrainConfig):
        """Pixels -> the backbone's output (its global average for a pooling head), from a model built once."""
        K = keras()
        built = models.build(cfg, self.dataset.image_size, len(self.dataset.class_names))
        features = built.features
        if models.pooled_head(cfg):
            features = K.layers.GlobalAveragePooling2D(name="cached_pool")(features)
        return K.Model(built.model.input, features, name="feature_extractor")

    def _fit_phase(self, cfg: TrainConfig, phase: phases.Phase, model, train_x, val_data,
                   weights: dict[int, float] | None, first: int, report: Report) -> int:
        """One phase as `phases.fit_phase` trains it; returns the epochs it ran."""
        K = keras()
        steps = math.ceil(len(self.dataset.train) / cfg.batch_size)
        model.compile(optimizer=optim.optimizer(cfg, phase.lr, phase.epochs * steps),
                      loss=optim.loss(cfg.label_smoothing), metrics=["accuracy"])
        reporter = K.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: report(epoch, float(logs["val_accuracy"])))
        early = K.callbacks.EarlyStopping(monitor="val_loss", patience=cfg.patience, restore_best_weights=True) \
            if cfg.patience else None
        train = epoch_batches(train_x, self.dataset.train.y, cfg.batch_size, seed=cfg.seed,
                              epochs=range(first, first + phase.epochs))
        history = model.fit(train, steps_per_epoch=steps, validation_data=val_data, initial_epoch=first,
                            epochs=first + phase.epochs, verbose=0, class_weight=weights,
                            callbacks=[c for c in (early, reporter) if c is not None])
        if early is not None and early.best_weights is not None:
            # Keras restores only when it stopped early; the run restores the best weights either way.
            model.set_weights(early.best_weights)
        return len(history.epoch)

    @staticmethod
    def _key(cfg: TrainConfig, built, phase: str, cached: feature_cache.Plan) -> tuple[Any, ...]:
        """What a cache depends on within a study: the head phase's pooling, phase 2's unfreeze point."""
        if phase == "finetune":
            return phase, strategies.unfreeze_start(built.backbone, cfg)
        return phase, cached.pooled

    def _cached(self, key: tuple[Any, ...], extractor: Callable[[], Any]) -> list[np.ndarray]:
        """The [train, val] activations under `key`, extracted (by `extractor()`) the first time only."""
        if key not in self.caches:
            t0 = time.perf_counter()
            splits = {"train": self.dataset.train, "val": self.dataset.val}
            cache = feature_cache.extract(extractor(), splits, pipeline, self.scratch / "-".join(map(str, key)))
            # One array per split, or a list of them where the unfreeze point cuts through a residual add.
            self.caches[key] = [arrays[0] if len(arrays) == 1 else arrays for arrays in cache.splits.values()]
            self.extract_seconds += time.perf_counter() - t0
        return self.caches[key]

