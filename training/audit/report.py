"""report.json of `tlserve data check`, typed.

SCHEMA 1 is the untyped report before this module (no "schema" key, no "label_issues"); SCHEMA 2 adds
both. Older files load (missing sections read as None or empty), a newer schema or a wrong shape is
one line. The dict<->dataclass conversion is kept small and local (_dump/_load) so that it can move
onto the project's one JSON-contract mechanism without changing a field.

Fields marked IN_MEMORY (an image's row in the check) are never written: they let the page find the
thumbnail of an entry without keying anything by id().
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.base import storage
from serving.base.errors import UserError

SCHEMA = 2
IN_MEMORY = {"json": False}


def _row() -> Any:
    return field(default=None, compare=False, repr=False, metadata=IN_MEMORY)


@dataclass
class Entry:
    """One image of a pair, or a class's typical image."""
    split: str
    file: str
    label: str
    row: int | None = _row()


@dataclass
class PairItem:
    a: Entry
    b: Entry
    kind: str                   # exact | near
    how: str                    # pixels | phash | phash-mirror | embedding | crop | rotation
    hamming: int
    cosine: float | None
    pixel_correlation: float    # crop | rotation: of the band-passed grey thumbnails once aligned


@dataclass
class Leak:
    images: int                 # held-out images with a copy in the earlier split
    of: int
    percent: float


@dataclass
class Balance:
    counts: dict[str, int]
    largest_smallest_ratio: float | None
    missing: list[str]


@dataclass
class ImageFacts:
    sizes: dict[str, dict[str, int]]     # "WxH" -> {split: images}
    modes: dict[str, int]
    formats: dict[str, int]
    cameras: dict[str, int]
    kinds: dict[str, int]
    class_outliers: list[str]


@dataclass
class SearchFacts:
    requested: str
    used: str                   # exact | ann
    index: str | None
    why: str


@dataclass
class Suspect:
    """An image whose given label the out-of-fold classifier doubts (training.audit.labels)."""
    split: str
    file: str
    given: str
    suggested: str                        # the class the fold model found likeliest
    score: float                          # label quality (cleanlab self-confidence: p(given)); lower = more suspect
    probabilities: dict[str, float]       # the fold model's probability of each class
    row: int | None = _row()


@dataclass
class LabelIssues:
    status: str                           # done | skipped
    why: str                              # what ran, or why not
    method: str | None = None
    classifier: str | None = None
    folds: int | None = None
    images: int | None = None             # images ranked
    out_of_fold_accuracy: float | None = None
    caution: str | None = None            # why the list may be mostly the fold model's own confusions
    skipped_classes: list[str] = field(default_factory=list)
    suspects: list[Suspect] = field(default_factory=list)     # cleanlab's list, most suspect first
    typical: dict[str, Entry] = field(default_factory=dict)   # class -> its most confidently held image
    seconds: float | None = None


@dataclass
class DataCheckReport:
    source: str
    mode: str
    cross_split_only: bool
    class_names: list[str]
    splits: dict[str, int]
    thresholds: dict[str, float]
    embeddings: str
    pairs_found: int
    pairs_truncated: bool
    duplicates: dict[str, dict[str, int]]
    leaks: dict[str, Leak]
    label_conflicts: list[PairItem]
    pairs: list[PairItem]
    balance: dict[str, Balance]
    images: ImageFacts
    unreadable: list[dict[str, str]]
    not_images: list[str]
    seconds: dict[str, float]
    search: SearchFacts | None = None          # schema 1 files written before the faiss switch have none
    label_issues: LabelIssues | None = None    # None: schema 1, or a check that did not look (fast mode)
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return _dump(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DataCheckReport":
        if not isinstance(raw, dict):
            raise UserError("report.json: not a data-check report (expected a JSON object)")
        schema = raw.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise UserError(f"report.json: schema {schema!r} is newer than this tlserve reads ({SCHEMA}); upgrade tlserve")
        return _load(cls, {**raw, "schema": schema}, "report")

    @classmethod
    def load(cls, path: Path) -> "DataCheckReport":
        return cls.from_dict(storage.read_json(Path(path)))


def _dump(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _dump(getattr(value, f.name)) for f in dataclasses.fields(value) if f.metadata.get("json", True)}
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _load(tp: Any, raw: Any, where: str) -> Any:
    """raw JSON -> the annotated type: dataclasses by field, list[X], dict[str, X], X | None; leaves as they are."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if raw is None:
            return None
        return _load(next(a for a in args if a is not type(None)), raw, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(raw, dict):
            raise UserError(f"report.json: {where} should be an object, not {type(raw).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.metadata.get("json", True)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UserError(f"report.json: unknown key '{unknown[0]}' in {where}")
        try:
            return tp(**{k: _load(hints[k], v, f"{where}.{k}") for k, v in raw.items()})
        except TypeError as exc:  # a required key missing
            raise UserError(f"report.json: {where}: {exc}") from None
    if origin is list:
        return [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(_of(raw, list, where))]
    if origin is dict:
        return {k: _load(args[1], v, f"{where}.{k}") for k, v in _of(raw, dict, where).items()}
    return raw


def _of(raw: Any, kind: type, where: str) -> Any:
    if not isinstance(raw, kind):
        raise UserError(f"report.json: {where} should be a{'n object' if kind is dict else ' list'}, not {type(raw).__name__}")
    return raw
