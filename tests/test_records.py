"""The run record's contract: training.record.records.RunRecord is record.json's schema. Today's records and
older ones round-trip unchanged, fields older files lack load as None, and every key a real training run
writes is a declared field (so the schema and the record cannot drift apart)."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from training.record import records
from training.record.records import RunRecord

CLASSES = ["circle", "square"]

# Every key today's code writes, with the optional ones too: a fine-tuned run (phase1_accuracy) on a
# two-worker cluster (training.fit.cluster), calibrated (the fitted shape), data-checked with --drop-leaks.
TODAY: dict = {
    "schema": 1, "name": "ft", "status": "finished", "created_at": "2026-12-02T22:43:35+00:00",
    "config": {"data": {"spec": "synthetic", "seed": 0}, "backbone": "mobilenetv2", "strategy": "finetune",
               "epochs": 1, "name": "ft"},
    "data": {"source": "synthetic (seed 0)", "class_names": CLASSES, "num_classes": 2, "image_size": [32, 32],
             "interpolation": "bilinear", "splits": {"train": 18, "val": 10, "test": 10},
             "train_class_counts": {"circle": 10, "square": 8}, "skipped": ["bad.jpg"], "spec": "synthetic", "seed": 0},
    "model": {"backbone": "mobilenetv2", "strategy": "finetune", "weights": "imagenet", "from_run": None,
              "input_shape": [32, 32, 3], "input_dtype": "float32", "input_range": [0, 255], "input_size": 96,
              "interpolation": "bilinear", "layers": 7, "depth": 160, "weighted_layers": 105, "total_params": 2260546,
              "trainable_params": 411202, "non_trainable_params": 1849344, "trainable_layers": 12,
              "frozen_layers": 93, "size_bytes": 9650123},
    "history": [{"epoch": 1, "phase": "head", "seconds": 2.9, "loss": 0.69, "accuracy": 0.5, "val_loss": 0.68,
                 "val_accuracy": 0.6, "lr": 0.001},
                {"epoch": 2, "phase": "finetune", "seconds": 3.1, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.61,
                 "val_accuracy": 0.8, "lr": 1e-05}],
    "epochs": 2, "avg_epoch_time_sec": 3.0, "total_time_sec": 7.5, "target": 0.8, "epochs_to_target": 2,
    "test": {"loss": 0.6, "accuracy": 0.8, "per_class_accuracy": {"circle": 0.8, "square": None},
             "confusion_matrix": [[8, 2], [0, 0]],
             "per_class": {"circle": {"precision": 1.0, "recall": 0.8, "f1": 0.8889, "support": 10},
                           "square": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}},
             "macro_f1": 0.4444, "weighted_f1": 0.8889, "phase1_accuracy": 0.7, "leak_free_accuracy": 0.8,
             "leak_free_images": 10},
    "training": {"class_weights": {"circle": 0.9, "square": 1.125}, "feature_cache": False,
                 "feature_cache_reason": "multi-worker runs do not cache", "caches": {"head": {"used": False}},
                 "peak_rss_bytes": 907882496, "extract_seconds": 0.0, "global_batch_size": 16,
                 "per_replica_batch_size": 8, "resumed": False,
                 "cluster": {"task": "worker:0", "replicas": 2, "global_batch_size": 16, "restarted": False}},
    "environment": {"machine": {"cpu": "Intel(R) Xeon(R) Processor", "cpu_count": 2}, "versions": {"python": "3.11.7"},
                    "devices": ["/device:CPU:0"], "precision": "float32", "jit": False, "distribution": "multiworker",
                    "replicas": 2},
    "calibration": {"temperature": 1.3, "layer": "probabilities", "fitted_on": "val", "val_images": 10,
                    "val_nll_before": 0.7, "val_nll_after": 0.65, "val_ece_before": 0.1, "val_ece_after": 0.05,
                    "test_ece_before": 0.12, "test_ece_after": 0.06, "test_nll_before": 0.71, "test_nll_after": 0.66,
                    "test_top1_agreement": 1.0},
    "data_check": {"mode": "fast", "thresholds": {"phash_distance": 4, "cosine": 0.9}, "embeddings": "fast mode: hashes only", "search": "exact",
                   "pairs": {"train-test": {"exact": 1, "near": 0}},
                   "leaks": {"test-in-train": {"images": 1, "of": 10, "percent": 10.0}}, "label_conflicts": 0,
                   "dropped": {"count": 1, "train_before": 19, "files": ["circle/7.jpg"]}, "seconds": 0.5},
}


def _old() -> dict:
    """A record as written before macro/weighted F1, per-class scores, leak-free accuracy, calibration, the
    data check, class weights and the per-replica batch existed."""
    old = copy.deepcopy(TODAY)
    for key in ("per_class", "macro_f1", "weighted_f1", "phase1_accuracy", "leak_free_accuracy", "leak_free_images"):
        del old["test"][key]
    for key in ("calibration", "data_check"):
        del old[key]
    for key in ("class_weights", "per_replica_batch_size", "cluster"):
        del old["training"][key]
    del old["data"]["train_class_counts"]
    del old["environment"]["jit"], old["environment"]["replicas"], old["model"]["weighted_layers"]
    return old


def _missing_required(section: records._Section, prefix: str = "") -> list[str]:
    """Declared fields a record lacks though every run writes them (optional ones are written only sometimes)."""
    out = []
    for f in dataclasses.fields(section):
        if f.name in ("extra", "absent"):
            continue
        if f.name in section.absent and not f.metadata.get("optional"):
            out.append(prefix + f.name)
        value = getattr(section, f.name)
        if isinstance(value, records._Section):
            out += _missing_required(value, f"{prefix}{f.name}.")
    return out


@pytest.mark.fast
def test_todays_record_round_trips_and_reads_as_attributes():
    record = RunRecord.from_dict(json.loads(json.dumps(TODAY)))
    assert record.to_dict() == TODAY
    assert list(record.to_dict()) == list(TODAY)  # the file's key order too
    assert record.undeclared() == [] and _missing_required(record) == []
    assert record.test.phase1_accuracy == 0.7 and record.calibration.temperature == 1.3
    assert record.training.cluster["replicas"] == 2 and record.data_check.dropped["count"] == 1
    assert records.table_row(record) == {
        "model": "ft", "epochs": 2, "avg_epoch_time_sec": 3.0, "total_time_sec": 7.5, "test_accuracy": 0.8,
        "trainable_params": 411202, "non_trainable_params": 1849344, "epochs_to_target": 2, "macro_f1": 0.4444}


@pytest.mark.fast
def test_optional_facts_are_left_out_when_a_run_has_none():
    """phase1_accuracy exists only for two-phase runs and training.fit.cluster only for multi-worker ones; a
    skipped calibration is {temperature: null, skipped: reason}."""
    d = copy.deepcopy(TODAY)
    del d["test"]["phase1_accuracy"], d["training"]["cluster"]
    d["calibration"] = {"temperature": None, "skipped": "turned off (--no-calibrate)"}
    d["data_check"] = None
    record = RunRecord.from_dict(d)
    assert record.to_dict() == d
    assert record.test.phase1_accuracy is None and record.training.cluster is None and record.data_check is None
    assert record.calibration.skipped == "turned off (--no-calibrate)" and record.calibration.layer is None
    built = dataclasses.replace(record, test=dataclasses.replace(record.test, phase1_accuracy=None))
    assert "phase1_accuracy" not in built.to_dict()["test"]


@pytest.mark.fast
def test_an_older_record_loads_with_none_and_writes_back_unchanged(tmp_path: Path):
    old = _old()
    record = RunRecord.from_dict(old)
    assert record.test.macro_f1 is None and record.test.weighted_f1 is None and record.test.per_class is None
    assert record.test.leak_free_accuracy is None and record.test.leaked_images(10) is None
    assert record.calibration is None and record.data_check is None
    assert record.training.class_weights is None and record.data.train_class_counts is None
    assert record.environment.jit is None and record.model.weighted_layers is None
    assert record.to_dict() == old  # nothing added: not even nulls for what the file lacked

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / records.RECORD).write_text(json.dumps(old))
    [run] = records.list_runs(tmp_path)
    assert run.name == "ft" and isinstance(run.record, RunRecord)
    assert records.table_row(run.record)["macro_f1"] is None
    assert records.table_csv([run.record]).splitlines()[1].endswith(",2,")  # epochs_to_target 2, macro F1 empty


@pytest.mark.fast
def test_unknown_keys_are_kept():
    d = copy.deepcopy(TODAY)
    d["later"] = {"a": 1}
    d["test"]["top5_accuracy"] = 0.99
    record = RunRecord.from_dict(d)
    assert record.to_dict() == d
    assert sorted(record.undeclared()) == ["later", "test.top5_accuracy"]


@pytest.mark.fast
def test_a_fact_without_a_field_fails_when_the_record_is_built():
    """records.build passes each producer's dict by keyword: a new key with no field stops the run's record."""
    with pytest.raises(TypeError, match="top5_accuracy"):
        records.TestFacts(**{**TODAY["test"], "top5_accuracy": 0.99})


@pytest.mark.fast
def test_a_record_that_is_not_an_object_is_not_a_run(tmp_path: Path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / records.RECORD).write_text("[1, 2]")
    assert records.list_runs(tmp_path) == []


def test_every_key_a_real_run_writes_is_a_declared_field(cnn_run, runs_root):
    """A tiny synthetic CNN trained by the real CLI (conftest's shared run): its record.json, read back,
    has no key the dataclasses do not declare, lacks none that every run writes, and round-trips."""
    written = json.loads((cnn_run / records.RECORD).read_text())
    run = records.load_run("cnn", runs_root)
    assert run.record.undeclared() == []
    assert _missing_required(run.record) == []
    assert run.record.to_dict() == written
    assert run.record.model.size_bytes == run.model_path.stat().st_size
