"""The optimizer, learning-rate schedule and loss a run trains with, built from its config."""
from __future__ import annotations

from typing import Any

from training.config import TrainConfig
from training.env import keras, tf


def schedule(name: str, lr: float, total_steps: int) -> Any:
    """The learning rate as a function of the optimizer's step count (which the checkpoint holds,
    so a resumed run continues the schedule), or `lr` itself for a constant rate."""
    K = keras()
    if name == "onecycle":
        # One-cycle (Smith; the fast CIFAR-10 records): linear warm-up from lr/25 over the first
        # 30% of steps, then a cosine down to 0, with Keras's own warm-up schedule.
        warmup = max(1, int(0.3 * total_steps))
        return K.optimizers.schedules.CosineDecay(lr / 25, max(1, total_steps - warmup),
                                                  warmup_target=lr, warmup_steps=warmup)
    if name == "cosine":
        return K.optimizers.schedules.CosineDecay(lr, max(1, total_steps))
    return lr


def optimizer(cfg: TrainConfig, lr: float, total_steps: int):
    """The optimizer with its learning-rate schedule over the phase's steps."""
    K = keras()
    rate = schedule(cfg.schedule, lr, total_steps)
    decay = cfg.weight_decay or None
    if cfg.optimizer == "sgd":
        built = K.optimizers.SGD(learning_rate=rate, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=decay)
    elif cfg.optimizer == "rmsprop":
        built = K.optimizers.RMSprop(learning_rate=rate, weight_decay=decay)
    else:
        built = K.optimizers.Adam(learning_rate=rate, weight_decay=decay)
    if decay:
        # Decay the kernels only: shrinking BatchNorm scales and biases regularizes nothing useful.
        built.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return built


def loss(label_smoothing: float):
    """Cross-entropy on integer labels; with smoothing, on one-hot targets (Keras's sparse loss has no smoothing)."""
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    T, K = tf(), keras()

    def smoothed_crossentropy(y_true, y_pred):
        labels = T.cast(T.reshape(y_true, [-1]), T.int32)
        return K.losses.categorical_crossentropy(T.one_hot(labels, T.shape(y_pred)[-1]), y_pred,
                                                 label_smoothing=label_smoothing)

    return smoothed_crossentropy
