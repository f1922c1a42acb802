"""The one way tlserve writes and reads a JSON contract: a dataclass <-> the JSON object of a file.

The manifest, the run record, the run state, the train config, eval metrics and bench results are each
a `Contract` subclass, and behave alike:

- Load (`from_dict`, `read`): every declared key is type-checked; a wrong type or a missing required key
  (a field without a default) is one UserError line naming the file and the key's dotted path.
- Round trip: keys this version does not declare are kept (`extra`), and declared keys the file lacked
  stay absent (`absent`) unless code has since given them a value, so `from_dict(d).to_dict() == d`
  for older and newer files alike.
- None (docs/decisions.md): a value is written as it is, None as null, except a field declared
  `optional()`, which is written only when it differs from its default: a fact that does not apply is
  left out rather than written as null (an fp32 model has no accuracy delta; a one-phase run has no
  phase1_accuracy; a run that was never resumed has no `resumed` flag).
- Version: `SCHEMA` on the class. A contract with a `schema` field writes it (its default is SCHEMA),
  and a file whose schema is newer than the one this version reads is refused in one line.

No TensorFlow and nothing heavy: the service ships this module. (timm's pretrained config is the model:
a dataclass and `asdict` with a filter; this adds the checks on load and the exact round trip.)
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import MISSING, field
from pathlib import Path
from typing import Any, ClassVar, Self, Union

from serving.base.errors import UserError


def optional(default: Any = None) -> Any:
    """A field written only when its value differs from `default` (a fact that does not always apply)."""
    return field(default=default, metadata={"optional": True})


class Contract:
    """Base of every JSON contract; subclasses are dataclasses whose fields are exactly the file's keys.

    The round trip's bookkeeping is kept beside the fields, not as fields (so `dataclasses.fields` of a
    contract lists its keys and nothing else): `extra`, the keys this version does not declare, and
    `absent`, the declared keys the file lacked. A contract made in code has neither;
    `dataclasses.replace` makes one, too."""

    SCHEMA: ClassVar[int] = 1           # the version of the file this class reads and writes
    KIND: ClassVar[str] = "file"        # what the file is, for "the manifest should be an object"
    FILE: ClassVar[str] = ""            # the file's usual name: the source errors name when none is given
    ORDER: ClassVar[tuple[str, ...]] = ()  # keys written first, in this order (then the other fields, then extra)

    @property
    def extra(self) -> dict[str, Any]:
        """Keys this version does not declare, as read; written back after the declared ones."""
        return self.__dict__.setdefault("_extra", {})

    @property
    def absent(self) -> frozenset[str]:
        """Declared keys the file lacked: left out on write-back while they keep their default."""
        return self.__dict__.get("_absent", frozenset())

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Self:
        return _build(cls, data, source or cls.FILE or cls.__name__, "")

    @classmethod
    def read(cls, path: Path) -> Self:
        """The contract in the JSON file at `path`; a file that is not JSON is one UserError line."""
        from serving.base import storage  # noqa: PLC0415

        try:
            data = storage.read_json(path)
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _keys(type(self)):
            value = getattr(self, f.name)
            left_out = f.metadata.get("optional") or f.name in self.absent
            if left_out and _unchanged(value, _default(f)):
                continue
            out[f.name] = _dump(value)
        out.update(_dump(self.extra))
        first = [k for k in self.ORDER if k in out]
        return {**{k: out[k] for k in first}, **{k: v for k, v in out.items() if k not in first}}

    def write(self, path: Path) -> Path:
        """Write atomically (serving.base.storage)."""
        from serving.base import storage  # noqa: PLC0415

        storage.write_json(path, self.to_dict())
        return Path(path)

    def undeclared(self, prefix: str = "") -> list[str]:
        """Dotted paths of the keys no field declares, in this contract and the ones inside it."""
        out = [prefix + k for k in self.extra]
        for f in _keys(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, Contract):
                out += value.undeclared(f"{prefix}{f.name}.")
        return out


# ---- building from JSON ------------------------------------------------------------------------

@functools.cache
def _keys(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def _unchanged(value: Any, default: Any) -> bool:
    # Same type first: a numpy value a producer left in would otherwise compare element-wise.
    return value is default or (type(value) is type(default) and value == default)


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        where = f"key '{prefix.rstrip('.')}'" if prefix else f"the {cls.KIND}"
        raise UserError(f"{source}: {where} should be an object, not {type(data).__name__}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    absent = set()
    for f in _keys(cls):
        key = prefix + f.name
        if f.name not in data:
            if _required(f):
                raise UserError(f"{source}: missing key '{key}'")
            absent.add(f.name)
            continue
        values[f.name] = _convert(data[f.name], hints[f.name], source, key)
    if "schema" in values and isinstance(values["schema"], int) and values["schema"] > cls.SCHEMA:
        raise UserError(f"{source}: schema {values['schema']} is newer than this tlserve reads "
                        f"({cls.SCHEMA}); upgrade tlserve to read it")
    known = {f.name for f in _keys(cls)}
    built = cls(**values)
    built.__dict__.update(_extra={k: v for k, v in data.items() if k not in known}, _absent=frozenset(absent))
    return built


def _convert(value: Any, hint: Any, source: str, key: str) -> Any:
    """`value` as `hint` says: nested contracts built, anything else checked and kept as it is."""
    if not _fits(value, hint):
        raise UserError(f"{source}: key '{key}' should be {_describe(hint)}, not {type(value).__name__}")
    if value is None:
        return None
    if _is_union(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None) and _fits(value, a))
    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if _is_contract(origin):
        return _build(origin, value, source, key + ".")
    if origin is dict and len(args) == 2 and _is_contract(args[1]):
        return {k: _convert(v, args[1], source, f"{key}.{k}") for k, v in value.items()}
    if origin is list and len(args) == 1 and _is_contract(args[0]):
        return [_convert(v, args[0], source, f"{key}.{i}") for i, v in enumerate(value)]
    return value


def _is_contract(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Contract)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value can be `hint` (containers are checked as containers, not item by item)."""
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if _is_contract(origin):
        return isinstance(value, dict)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    names = []
    for a in args:
        origin = typing.get_origin(a) or a
        names.append("an object" if origin is dict or _is_contract(origin) else
                     "a list" if origin is list else "a number" if origin in (int, float) else
                     "true or false" if origin is bool else "a string" if origin is str else str(origin))
    nullable = _is_union(hint) and type(None) in typing.get_args(hint)
    return " or ".join(dict.fromkeys(names)) + (" or null" if nullable else "")


# ---- writing JSON ------------------------------------------------------------------------------

def _dump(value: Any) -> Any:
    if isinstance(value, Contract):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value
