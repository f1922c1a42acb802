"""How far a run has got: the typed form of the staging folder's state.json.

The file keeps the keys the untyped dict had (older interrupted runs still resume): flags that were
only ever written when set (`resumed`, `restarted`, `cluster`, `phase1_accuracy`) are optional() facts
of serving.base.contract, absent until they are. Its schema version is RunState.SCHEMA; the file does not
carry it (its keys are fixed by the runs already paused on disk).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.base.contract import Contract, optional

STATE = "state.json"


@dataclass
class RunState(Contract):
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    phases_done: list[str] = field(default_factory=list)
    elapsed: float = 0.0                  # training seconds so far, over every process that worked on the run
    checkpoint: str | None = None         # the Checkpoints ref the run continues from
    stopping: dict[str, Any] | None = None  # the early-stopping snapshot of the phase in progress
    phase1_accuracy: float | None = optional()  # finetune: test accuracy after the head phase
    resumed: bool = optional(False)       # continued with `train --resume`
    restarted: bool = optional(False)     # a cluster started again, continuing from TensorFlow's backup
    cluster: bool = optional(False)       # trains on a TF_CONFIG cluster (--resume refuses it)

    FILE = STATE
    KIND = "run state"

    @classmethod
    def load(cls, folder: Path) -> "RunState":
        """The state in `folder`, or a fresh one when none was written yet."""
        path = folder / STATE
        return cls.read(path) if path.is_file() else cls()

    def save(self, folder: Path) -> None:
        self.write(folder / STATE)

    def epochs_in(self, phase: str) -> int:
        return sum(1 for row in self.history if row["phase"] == phase)
