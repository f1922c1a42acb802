"""TensorBoard event files for every run: Keras's own callback, one folder per phase.

`runs/<name>/tensorboard/<phase>/train` and `.../validation` hold the per-epoch scalars Keras's
TensorBoard callback writes (`epoch_loss`, `epoch_accuracy`, and `epoch_learning_rate` in train),
at step = epoch - 1 (Keras counts epochs from 0; the history from 1). The step is the run's epoch
count, not the phase's, so a fine-tune's second phase continues where the first one stopped.

Resume: the callback is given the epoch the resumed fit starts at, so epochs are never written
twice; it writes an epoch only after the state that names it is saved, and flushes it at once, so
a killed run lost at most the epoch the kill interrupted, which the resumed run writes again.
The few milliseconds between the state and the flush are covered by `backfill` from the history.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from training.env import keras, tf

FOLDER = "tensorboard"
METRICS = ("loss", "accuracy")

_callback_cls = None


def callback(log_dir: Path):
    """Keras's TensorBoard callback, cheap (no graph, histograms or profiling), writing the rate the
    history records every epoch (Keras writes it for a schedule only) and flushing after each epoch."""
    global _callback_cls
    if _callback_cls is None:
        K = keras()

        class EpochTensorBoard(K.callbacks.TensorBoard):
            def _collect_learning_rate(self, logs):
                # The same value the run's history holds: the rate of the epoch's last step.
                logs["learning_rate"] = float(K.backend.get_value(self.model.optimizer.learning_rate))
                return logs

            def on_epoch_end(self, epoch, logs=None):
                super().on_epoch_end(epoch, logs)
                for writer in self._writers.values():
                    writer.flush()  # a killed run keeps every epoch it finished

        _callback_cls = EpochTensorBoard
    return _callback_cls(log_dir=str(log_dir), histogram_freq=0, write_graph=False, write_images=False,
                         write_steps_per_second=False, update_freq="epoch", profile_batch=0)


def phase_dir(root: Path, phase: str) -> Path:
    return root / FOLDER / phase


def written_steps(folder: Path, tag: str = "epoch_loss") -> list[int]:
    """The steps at which `tag` was written in the event files of one folder (train or validation)."""
    steps = []
    for path in sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else ():
        for event in tf().compat.v1.train.summary_iterator(str(path)):
            if any(value.tag == tag for value in event.summary.value):
                steps.append(int(event.step))
    return steps


def backfill(root: Path, history: list[dict[str, Any]]) -> int:
    """Write the epochs of the history that no event file holds (a run killed between saving an
    epoch's state and flushing its events); how many epochs were written."""
    T = tf()
    written = 0
    for phase in dict.fromkeys(row["phase"] for row in history):
        base = phase_dir(root, phase)
        have = set(written_steps(base / "train"))
        missing = [row for row in history if row["phase"] == phase and row["epoch"] - 1 not in have]
        if not missing:
            continue
        train_writer = T.summary.create_file_writer(str(base / "train"))
        val_writer = T.summary.create_file_writer(str(base / "validation"))
        for row in missing:
            step = row["epoch"] - 1
            with train_writer.as_default():
                for key in METRICS:
                    T.summary.scalar(f"epoch_{key}", row[key], step=step)
                T.summary.scalar("epoch_learning_rate", row["lr"], step=step)
            if row.get("val_loss") is not None:
                with val_writer.as_default():
                    for key in METRICS:
                        T.summary.scalar(f"epoch_{key}", row[f"val_{key}"], step=step)
            written += 1
        train_writer.close()
        val_writer.close()
    return written


def command(runs: list[tuple[str, Path]]) -> str:
    """The command that shows the runs side by side, each under its own name."""
    spec = ",".join(f"{name}:{path / FOLDER}" for name, path in runs if (path / FOLDER).is_dir())
    return f"tensorboard --logdir_spec {shlex.quote(spec)}" if spec else ""
