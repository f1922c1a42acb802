"""The one JSON-contract mechanism (serving.base.contract) and the contracts newly typed with it: eval
metrics and bench results. The manifest, the run record and the run state keep their own tests
(test_manifest.py, test_records.py, test_run_state.py); these are the rules every contract shares."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from serving.base.contract import Contract, optional
from serving.base.errors import UserError

pytestmark = pytest.mark.fast


@dataclasses.dataclass(kw_only=True)
class Row(Contract):
    name: str
    score: float | None                 # None is a fact: written as null
    note: str | None = optional()       # written only when set


@dataclasses.dataclass(kw_only=True)
class Doc(Contract):
    schema: int = 2
    rows: list[Row]
    by_name: dict[str, Row] = dataclasses.field(default_factory=dict)
    flag: bool = optional(False)
    size: int = 3

    SCHEMA = 2
    KIND = "test file"


DOC = {"schema": 2, "rows": [{"name": "a", "score": None}, {"name": "b", "score": 1, "note": "x"}],
       "by_name": {"a": {"name": "a", "score": 0.5}}, "size": 4}


def test_round_trip_none_policy_and_the_fields_are_the_keys():
    doc = Doc.from_dict(copy.deepcopy(DOC))
    assert doc.rows[0].score is None and doc.rows[1].note == "x" and doc.by_name["a"].score == 0.5
    assert doc.to_dict() == DOC and list(doc.to_dict()) == list(DOC)
    assert [f.name for f in dataclasses.fields(Doc)] == ["schema", "rows", "by_name", "flag", "size"]
    made = Doc(rows=[Row(name="c", score=None)])
    assert made.to_dict() == {"schema": 2, "rows": [{"name": "c", "score": None}], "by_name": {}, "size": 3}
    made.flag = True
    assert made.to_dict()["flag"] is True


def test_unknown_keys_are_kept_and_absent_keys_stay_absent_until_set():
    newer = {**copy.deepcopy(DOC), "later": [1]}
    newer["rows"][0]["unit"] = "ms"
    del newer["size"], newer["by_name"]
    doc = Doc.from_dict(newer)
    assert doc.extra == {"later": [1]} and doc.rows[0].extra == {"unit": "ms"} and doc.absent == {"size", "by_name", "flag"}
    assert doc.size == 3 and doc.to_dict() == newer and doc.undeclared() == ["later"]
    doc.size = 5
    assert doc.to_dict()["size"] == 5  # given a value since: written


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("rows"), "missing key 'rows'"),
    (lambda d: d["rows"][1].update(score="high"), "key 'rows.1.score' should be a number or null, not str"),
    (lambda d: d["by_name"].update(a=[1]), "key 'by_name.a' should be an object, not list"),
    (lambda d: d.update(size=True), "key 'size' should be a number, not bool"),
    (lambda d: d.update(schema=3), "schema 3 is newer than this tlserve reads (2); upgrade tlserve to read it"),
])
def test_a_bad_file_is_one_line_naming_the_file_and_the_key(tmp_path, change, message):
    data = copy.deepcopy(DOC)
    change(data)
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as caught:
        Doc.read(path)
    assert str(caught.value) == f"{path}: {message}"


def test_files_that_are_not_objects_or_not_json(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="list.json: the test file should be an object, not list"):
        Doc.read(tmp_path / "list.json")
    with pytest.raises(UserError, match="bad.json is not valid JSON"):
        Doc.read(tmp_path / "bad.json")


def test_bench_results_round_trip_with_their_schema():
    from serving import timing

    inprocess = {"schema": timing.SCHEMA, "kind": "inprocess", "model": "cnn", "version": "v1",
                 "created_at": "2026-12-04T00:00:00+00:00", "machine": {"cpu": "x"}, "versions": {"onnxruntime": "1"},
                 "results": [{"runtime": "onnx", "batch_size": 1, "iterations": 5, "p50_ms": 0.1, "p90_ms": 0.2,
                              "p99_ms": 0.3, "max_ms": 0.4, "mean_ms": 0.15, "images_per_sec": 6000.0,
                              "provider": "CPUExecutionProvider", "threads": None}],
                 "skipped": {"keras": "no run"}}
    assert timing.InprocessBench.from_dict(copy.deepcopy(inprocess)).to_dict() == inprocess
    row = {"concurrency": 1, "requests": 2, "errors": 2, "p50_ms": None, "p90_ms": None, "p99_ms": None,
           "max_ms": None, "mean_ms": None, "requests_per_sec": None}
    http = {"schema": 1, "kind": "http", "created_at": "t", "machine": {}, "url": "http://127.0.0.1:3000",
            "server": {"name": "cnn"}, "inprocess_onnx_p50_ms": None, "results": [row]}
    assert timing.HttpBench.from_dict(copy.deepcopy(http)).to_dict() == http  # without a model: no model keys
    with pytest.raises(UserError, match="key 'results.0.p50_ms' should be a number, not str"):
        timing.InprocessBench.from_dict({**inprocess, "results": [{**inprocess["results"][0], "p50_ms": "fast"}]})


def test_eval_metrics_round_trip_and_older_files_without_the_seed():
    from training.exported.evaluation import SCHEMA, EvalMetrics

    variant = {"images": 4, "accuracy": 0.5, "top5_accuracy": None, "macro_f1": 0.4, "weighted_f1": 0.5,
               "per_class": {"a": {"precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2}},
               "confusion_matrix": [[1, 1], [1, 1]], "ece": 0.1, "reliability_bins": [], "coverage": [],
               "seconds": 0.01, "model_images_per_sec": 400.0, "provider": "CPUExecutionProvider", "batch_size": 64}
    metrics = {"schema": SCHEMA, "kind": "eval", "model": "cnn", "version": "v1", "created_at": "t",
               "data": {"spec": "synthetic", "split": "test", "seed": 0, "source": "synthetic", "images": 4,
                        "scored": 4, "classes": ["a", "b"], "skipped_unreadable": {}, "skipped_unknown_class": {}},
               "runtime": "onnx", "url": None, "server": None, "class_names": ["a", "b"], "wall_seconds": 0.1,
               "images_per_sec": 40.0, "variants": {"fp32": variant}, "machine": {}, "versions": {}}
    assert EvalMetrics.from_dict(copy.deepcopy(metrics)).to_dict() == metrics
    older = copy.deepcopy(metrics)
    del older["data"]["seed"]
    assert EvalMetrics.from_dict(copy.deepcopy(older)).to_dict() == older
    with pytest.raises(UserError, match="missing key 'variants.fp32.accuracy'"):
        EvalMetrics.from_dict({**metrics, "variants": {"fp32": {k: v for k, v in variant.items() if k != "accuracy"}}})
