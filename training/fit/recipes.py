"""Recipe files for `tlserve train --config FILE`: any `tlserve train` option as a key.

A recipe is a YAML or JSON mapping (`epochs: 30`, `batch-size: 256` or `batch_size: 256`); a run's
`record.json` is one too (its `config` section: the exact configuration it ran, data spec and seed
included). Options given on the command line win over the file, which wins over the defaults.
Paths in a recipe (data folders, weight files) are read like the command line's, from the
directory tlserve runs in; the files in `recipes/` are written for the repository root.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from serving.base.errors import UserError, nearest
from training.config import DataConfig, TrainConfig

# Options a recipe cannot set: the file itself, and --resume (a resumed run keeps its own options).
NOT_IN_RECIPES = ("config", "resume")
_DATA_KEYS = ("classes", "val_split", "limit", "image_size")


def read(path: Path) -> dict[str, Any]:
    """The file's options (keys as written), from a recipe or from a run record's config."""
    import yaml  # noqa: PLC0415

    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else (f" (line {exc.lineno})" if hasattr(exc, "lineno") else "")
        raise UserError(f"--config {path}: not a YAML or JSON file{at}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"--config {path}: a recipe is a mapping of option: value, not a {type(raw).__name__}")
    if isinstance(raw.get("config"), dict) and "schema" in raw:
        return record_options(raw["config"])
    return raw


def record_options(config: dict[str, Any]) -> dict[str, Any]:
    """A run record's `config` section as `tlserve train` options (the run's name is not reused)."""
    options = {k: v for k, v in config.items() if k not in ("data", "name", "overwrite")}
    data = config.get("data") or {}
    options["data"] = data.get("spec", "synthetic")
    options.update({key: data[key] for key in _DATA_KEYS if key in data})
    if options.get("patience") is None:
        options["patience"] = 0  # the record's "off"
    if options.get("from_run"):
        options.pop("strategy", None)  # "from-run": implied by from_run itself
    return options


def merge(ctx, path: Path) -> dict[str, Any]:
    """The command's options with the file's values wherever the command line did not give one.
    `ctx` is the click context of `tlserve train`; each value goes through its option's own type."""
    params = {p.name: p for p in ctx.command.params if p.name not in NOT_IN_RECIPES}
    keys: dict[str, str] = {}
    for p in params.values():
        keys[p.name] = p.name
        for opt in p.opts:
            if opt.startswith("--"):
                keys[opt[2:].replace("-", "_")] = p.name
    merged = dict(ctx.params)
    for key, value in read(path).items():
        name = keys.get(str(key).lstrip("-").replace("-", "_"))
        if name is None:
            shown = sorted(k.replace("_", "-") for k in keys)
            raise UserError(f"--config {path}: unknown option '{key}'{nearest(str(key).replace('_', '-'), shown)}")
        value = _convert(params[name], value, ctx, path, key)  # a bad value is an error even when overridden
        source = ctx.get_parameter_source(name)
        if source is None or source.name != "COMMANDLINE":
            merged[name] = value
    return merged


def _convert(param, value: Any, ctx, path: Path, key: str) -> Any:
    """The file's value through the option's own conversion (the one its command-line text goes through)."""
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        raise UserError(f"--config {path}: {key}: expected a single value, got {json.dumps(value)}")
    try:
        converted = param.process_value(ctx, value)
    except Exception as exc:  # click's BadParameter (typer vendors click, so its class is not importable portably)
        message = getattr(exc, "message", None) or str(exc)
        raise UserError(f"--config {path}: {key}: {json.dumps(value)}: {message}") from None
    if not isinstance(value, str) and isinstance(value, bool) is not isinstance(converted, bool):
        # YAML's true/false would otherwise pass as 1/0 for a number, and 3 as true for a flag.
        raise UserError(f"--config {path}: {key}: {json.dumps(value)} is not a valid value here")
    return converted


def train_config(o: dict[str, Any]) -> TrainConfig:
    """`tlserve train`'s (or `summary`'s) options by parameter name as a TrainConfig: every option whose
    name is a config field goes there, so a new option needs its field, its check and its CLI parameter only."""
    data_fields = {f.name for f in dataclasses.fields(DataConfig)} - {"spec"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"data"}
    data = DataConfig(spec=o.get("data", DataConfig.spec), **{k: o[k] for k in data_fields if k in o})
    values = {k: o[k] for k in fields if k in o}
    if "patience" in values:
        values["patience"] = values["patience"] or None  # the command line's 0 means off
    return TrainConfig(data=data, **values)
