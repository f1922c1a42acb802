"""The Keras callbacks a run trains with. Their classes are made on first use, because Keras loads
only when TensorFlow does (`tlserve --help` must stay instant)."""
from __future__ import annotations

import functools
import time
from typing import Any, Callable

from training.fit.checkpoints import Checkpoints
from training.env import keras

Log = Callable[[str], None]


@functools.cache
def _early_stopping_class():
    K = keras()

    class ResumableEarlyStopping(K.callbacks.EarlyStopping):
        def __init__(self, patience: int, snapshot: dict[str, Any] | None, ckpts: Checkpoints):
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

    return ResumableEarlyStopping


def early_stopping(patience: int, snapshot: dict[str, Any] | None, ckpts: Checkpoints):
    """Keras's EarlyStopping on val_loss with best-weight restoring, whose progress survives a resume:
    the counter, the best loss and the best epoch's weights (a file) go into the run's state."""
    return _early_stopping_class()(patience, snapshot, ckpts)


@functools.cache
def _epoch_log_class():
    K = keras()

    class EpochLog(K.callbacks.Callback):
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

    return EpochLog


def epoch_log(phase: str, history: list[dict[str, Any]], log: Log | None, on_epoch: Callable[[dict[str, Any]], None]):
    """Per-epoch seconds and metrics into the history, then `on_epoch` (the checkpoint); a line when `log` is given."""
    return _epoch_log_class()(phase, history, log, on_epoch)


def counted(advance: Callable[[int], None]):
    """Advances a progress step by each predicted batch's size."""
    return keras().callbacks.LambdaCallback(on_predict_batch_end=lambda batch, logs: advance(len(logs["outputs"])))
