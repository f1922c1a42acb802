"""What lets an interrupted run continue: tlserve's own checkpoints (single process) and Keras's
BackupAndRestore (a TF_CONFIG cluster), plus telling a lost peer from any other TensorFlow error."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from training.model import build as models
from training.env import keras, tf

CHECKPOINT_DIR = "checkpoint"
BACKUP_DIR = "backup"  # multi-worker: Keras's BackupAndRestore, one folder per phase


class Checkpoints:
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


def random_generators(model) -> list[Any]:
    """The tf.random.Generator of every random layer (dropout, augmentation), in layer order."""
    found = []
    for layer in models.leaf_layers(model):
        rng = getattr(layer, "_random_generator", None)
        if rng is not None:
            rng._maybe_init()
            if getattr(rng, "_generator", None) is not None:
                found.append(rng._generator)
    return found


def backed_up_epochs(backup: Path) -> int:
    """Epochs (counted from the run's first) that the chief's BackupAndRestore folder holds; 0 without one.
    Read before fit, so the data pipeline starts at the epoch Keras will continue from."""
    T = tf()
    latest = T.train.latest_checkpoint(str(backup / "chief"))
    if latest is None:
        return 0
    saved = int(T.train.load_checkpoint(latest).get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    return saved + 1  # the epoch index it saved after (0-based)


def restore_backup(backup: Path, model) -> None:
    T = tf()
    T.train.Checkpoint(model=model).read(T.train.latest_checkpoint(str(backup / "chief"))).expect_partial()


def cluster_backup(shared: Path, own: Path):
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


def lost_peer(exc: BaseException) -> str | None:
    """'worker:1' (or 'a peer') when exc is TensorFlow aborting a collective because a worker went away."""
    T = tf()
    lost = (T.errors.UnavailableError, T.errors.AbortedError, T.errors.CancelledError, T.errors.DeadlineExceededError)
    if not isinstance(exc, T.errors.OpError) or not (isinstance(exc, lost) or "ollective" in str(exc)):
        return None
    message = str(exc)
    after = message.split("Error reported from", 1)[-1]
    found = _PEER.search(after) or _PEER.search(message)
    return f"{found.group(1)}:{found.group(2)}" if found else "a peer"
