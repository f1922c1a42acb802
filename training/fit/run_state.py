"""How far a run has got: the typed form of the staging folder's state.json.

The file keeps the keys the untyped dict had (older interrupted runs still resume); flags that were
only ever written when set (`resumed`, `restarted`, `cluster`, `phase1_accuracy`) stay absent until they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from serving.base import storage

STATE = "state.json"
_ONLY_WHEN_SET = ("phase1_accuracy", "resumed", "restarted", "cluster")


@dataclass
class RunState:
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch
    phases_done: list[str] = field(default_factory=list)
    elapsed: float = 0.0                  # training seconds so far, over every process that worked on the run
    checkpoint: str | None = None         # the Checkpoints ref the run continues from
    stopping: dict[str, Any] | None = None  # the early-stopping snapshot of the phase in progress
    phase1_accuracy: float | None = None  # finetune: test accuracy after the head phase
    resumed: bool = False                 # continued with `train --resume`
    restarted: bool = False               # a cluster started again, continuing from TensorFlow's backup
    cluster: bool = False                 # trains on a TF_CONFIG cluster (--resume refuses it)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunState":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def load(cls, folder: Path) -> "RunState":
        """The state in `folder`, or a fresh one when none was written yet."""
        path = folder / STATE
        return cls.from_dict(storage.read_json(path)) if path.is_file() else cls()

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in out.items() if k not in _ONLY_WHEN_SET or v not in (None, False)}

    def save(self, folder: Path) -> None:
        storage.write_json(folder / STATE, self.to_dict())

    def epochs_in(self, phase: str) -> int:
        return sum(1 for row in self.history if row["phase"] == phase)
