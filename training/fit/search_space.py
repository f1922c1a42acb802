"""The search space of `tlserve tune`: one parser for `--space` and a recipe's `space:` key.

    lr=1e-4..1e-2:log,dropout=0..0.5,head=gap|gap-dense,epochs=5..40

Each item is a TrainConfig field (dashes or underscores) with a range `LOW..HIGH` (`:log` for a
log-uniform draw; integer fields draw integers) or choices `A|B|C`. Values hold no ',' or '|'.
Every end of a range and every choice goes through `tlserve train`'s own checks before a study
starts, so a bad space is one line and nothing written.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from serving.base.errors import UserError, nearest
from training.config import TrainConfig

# The hyperparameters a study may search, with the type each draws (one list: the parser's and the docs').
TUNABLE: dict[str, type] = {
    "lr": float, "weight_decay": float, "dropout": float, "label_smoothing": float, "head": str,
    "head_units": int, "epochs": int, "class_weight": str, "unfreeze": int, "finetune_lr": float,
    "finetune_epochs": int, "optimizer": str, "schedule": str, "momentum": float, "batch_size": int,
}
_ITEM = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(.+?)\s*$")


@dataclass(frozen=True)
class Param:
    name: str                               # the TrainConfig field
    kind: type                              # float | int | str
    low: float | None = None                # a range ...
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None  # ... or choices

    def suggest(self, trial) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind is int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def corners(self) -> list[Any]:
        """The values that bound what a trial can draw: each choice, or both ends of the range."""
        if self.choices is not None:
            return list(self.choices)
        return [self.kind(self.low), self.kind(self.high)]

    def text(self) -> str:
        if self.choices is not None:
            return f"{self.name}={'|'.join(str(c) for c in self.choices)}"
        low, high = (int(self.low), int(self.high)) if self.kind is int else (self.low, self.high)
        return f"{self.name}={low:g}..{high:g}" + (":log" if self.log else "")


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    def text(self) -> str:
        """The space in its canonical written form (what a study stores and compares on resume)."""
        return ",".join(p.text() for p in self.params)

    def suggest(self, trial) -> dict[str, Any]:
        return {p.name: p.suggest(trial) for p in self.params}

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]


def parse(text: str | None) -> Space:
    """`--space` text as a Space, or one UserError line naming what is wrong."""
    if not text or not text.strip():
        raise UserError("--space is empty; give e.g. --space lr=1e-4..1e-2:log,dropout=0..0.5 (or space: in --config)")
    params: dict[str, Param] = {}
    for item in text.split(","):
        param = _parse_item(item)
        if param.name in params:
            raise UserError(f"--space names '{param.name}' twice")
        params[param.name] = param
    return Space(tuple(params.values()))


def _parse_item(item: str) -> Param:
    match = _ITEM.match(item)
    if not match:
        raise UserError(f"--space '{item.strip()}': expected NAME=LOW..HIGH[:log] or NAME=A|B|C")
    raw_name, expr = match.groups()
    name = raw_name.replace("-", "_")
    if name not in TUNABLE:
        shown = sorted(n.replace("_", "-") for n in TUNABLE)
        raise UserError(f"--space: unknown parameter '{raw_name}'{nearest(name.replace('_', '-'), shown)}; "
                        f"tunable: {', '.join(shown)}")
    kind = TUNABLE[name]
    if ".." in expr:
        return _parse_range(name, kind, expr, item.strip())
    choices = [c.strip() for c in expr.split("|")]
    if any(not c for c in choices):
        raise UserError(f"--space '{item.strip()}': an empty choice")
    if len(set(choices)) != len(choices):
        raise UserError(f"--space '{item.strip()}': a choice is given twice")
    return Param(name, kind, choices=tuple(_value(name, kind, c, item.strip()) for c in choices))


def _parse_range(name: str, kind: type, expr: str, item: str) -> Param:
    if kind is str:
        raise UserError(f"--space '{item}': {name} takes choices (A|B), not a range")
    log = expr.endswith(":log")
    ends = (expr[:-4] if log else expr).split("..")
    if len(ends) != 2:
        raise UserError(f"--space '{item}': expected LOW..HIGH[:log]")
    low, high = (_value(name, kind, end.strip(), item) for end in ends)
    if not low < high:
        raise UserError(f"--space '{item}': empty range (LOW must be below HIGH)")
    if log and low <= 0:
        raise UserError(f"--space '{item}': a :log range must start above 0")
    return Param(name, kind, low=float(low), high=float(high), log=log)


def _value(name: str, kind: type, text: str, item: str) -> Any:
    if kind is str:
        return text
    try:
        value = float(text)
        if kind is int and value != int(value):
            raise ValueError
        return kind(value)
    except ValueError:
        raise UserError(f"--space '{item}': {text!r} is not {'an integer' if kind is int else 'a number'}") from None


def check(space: Space, base: TrainConfig) -> None:
    """Every value a trial can draw passes `tlserve train`'s checks on the base config."""
    from training.fit.validation import resolve  # noqa: PLC0415

    for param in space.params:
        for value in param.corners():
            try:
                resolve(dataclasses.replace(base, **{param.name: value}))
            except UserError as exc:
                raise UserError(f"--space {param.text()}: at {param.name}={value}: {exc}") from None


def apply(base: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """The base configuration with a trial's values."""
    return dataclasses.replace(base, **values)
