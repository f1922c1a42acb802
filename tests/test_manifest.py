"""The manifest contract (serving.base.manifest.Manifest) and the one table of runtimes (serving.base.formats).

The fast tests work on manifests shaped as `tlserve export` writes them; the slow ones on the
shared exported CNN (conftest.cnn_model) and copies of it that were tampered with.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from serving.base import formats
from serving.base.errors import UserError
from serving.base.manifest import MANIFEST, Artifact, Manifest, ModelFolder

RECALL = {"circle": 0.75, "square": 1.0}


def _written_by_export() -> dict:
    """A manifest as training.exported.export writes it today (two classes, every variant, int8 not kept)."""
    onnx = {"sha256": "b" * 64, "bytes": 2183569, "max_abs_diff": 7.45e-07, "top1_agreement": 1.0,
            "test_accuracy": 0.9, "test_ece": 0.027, "test_per_class_recall": RECALL}
    gate = {"passed": True, "accuracy_drop_points": 0.0, "worst_class": "circle", "worst_class_drop_points": 0.0,
            "max_accuracy_drop": 1.0, "max_class_drop": 5.0, "crossed": [], "reason": None}
    fp16 = {**onnx, "sha256": "c" * 64, "accuracy_delta": 0.0, "gate": gate}
    int8 = {**onnx, "sha256": None, "accuracy_delta": -0.2, "gate": {**gate, "passed": False, "reason": "too low"},
            "calibration_images": 256, "quantization": "static QDQ", "kept": False}
    return {
        "schema": 1, "name": "cnn", "version": "202612022240188ec7", "created_at": "2026-12-02T22:40:21+00:00",
        "run": "cnn", "run_path": "/runs/cnn", "class_names": ["circle", "square"],
        "input": {"name": "image", "shape": [None, 32, 48, 3], "dtype": "float32", "range": [0, 255],
                  "layout": "NHWC", "interpolation": "bicubic"},
        "output": {"name": "probabilities", "shape": [None, 2]},
        "backbone": "cnn", "strategy": "scratch", "tta": "flip", "test_accuracy": 0.9, "params": 545098,
        "export": {"opset": 17, "formats": ["savedmodel", "onnx"], "check_batch": 32, "parity_tolerance": 0.0001,
                   "check_informative": True, "check_output_spread": 0.99, "versions": {"onnx": "1.23.2"},
                   "gate": {"max_accuracy_drop": 1.0, "max_class_drop": 5.0, "test_images": 400,
                            "rejected": {"model.int8.onnx": int8}}},
        "calibration": {"temperature": 0.54, "fitted_on": "val"},
        "ood": {"method": "mahalanobis", "output": "ood_score", "feature_layer": "probabilities:input", "dims": 64,
                "threshold": 1.13, "accept": 0.95, "val_accepted": 0.953, "train_images": 300, "val_images": 45,
                "shrinkage": 0.02, "val_score_percentiles": {"50": 0.54}, "score_bins": [0.4, 0.6],
                "score_reference": [0.3, 0.4, 0.3], "class_reference": {"circle": 0.5, "square": 0.5},
                "file": "ood_reference.npz", "sha256": "d" * 64},
        "artifacts": {"saved_model": {"sha256": "a" * 64, "bytes": 2287999, "max_abs_diff": 0.0, "top1_agreement": 1.0},
                      "model.onnx": onnx, "model.fp16.onnx": fp16},
        "bentoml_tag": "cnn:202612022240188ec7",
    }


def _write(folder: Path, data: dict | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).write_text(data if isinstance(data, str) else json.dumps(data))
    return folder


@pytest.mark.fast
def test_round_trip_keeps_every_key_in_order(tmp_path):
    written = _written_by_export()
    m = Manifest.load(_write(tmp_path / "a", written))
    assert m.input.hw == (32, 48) and m.input.interpolation == "bicubic" and m.tta == "flip"
    assert m.artifacts["model.fp16.onnx"].gate["passed"] and m.temperature == 0.54
    assert m.rejected["model.int8.onnx"].kept is False and m.export.gate.test_images == 400
    assert m.ood.threshold == 1.13 and "score_bins" not in m.ood.summary()
    assert m.to_dict() == written and json.dumps(m.to_dict()) == json.dumps(written)  # same keys, same order
    m.save(tmp_path / "b")
    again = Manifest.load(tmp_path / "b")
    assert again == Manifest.load(tmp_path / "a") and again.to_dict() == written


@pytest.mark.fast
def test_older_manifests_load_with_defaults_and_newer_keys_are_kept(tmp_path):
    old = _written_by_export()
    for key in ("tta", "calibration", "params", "export", "output", "ood"):
        del old[key]
    del old["input"]["interpolation"]
    m = Manifest.load(_write(tmp_path / "old", old))
    assert m.tta == "none" and m.input.interpolation == "bilinear" and m.temperature is None and m.rejected == {}
    assert m.ood is None and "ood" not in m.to_dict()  # exported before the OOD score
    newer = _written_by_export()
    newer["licence"] = "CC-BY"
    newer["artifacts"]["model.onnx"]["signed_by"] = "ci"
    newer["input"]["mean"] = [0.5, 0.5, 0.5]
    m = Manifest.load(_write(tmp_path / "new", newer))
    assert m.extra == {"licence": "CC-BY"} and m.artifacts["model.onnx"].extra == {"signed_by": "ci"}
    assert m.to_dict() == newer


@pytest.mark.parametrize("change, key", [
    (lambda d: d.pop("class_names"), "class_names"),
    (lambda d: d["input"].pop("shape"), "input.shape"),
    (lambda d: d["artifacts"]["model.onnx"].pop("bytes"), "artifacts.model.onnx.bytes"),
    (lambda d: d.update(test_accuracy="high"), "test_accuracy"),
    (lambda d: d.update(input=[32, 32]), "input"),
    (lambda d: d["export"]["gate"].update(test_images=True), "export.gate.test_images"),
    (lambda d: d["artifacts"].update({"model.onnx": "b" * 64}), "artifacts.model.onnx"),
])
@pytest.mark.fast
def test_a_bad_manifest_is_one_line_naming_the_file_and_the_key(tmp_path, change, key):
    data = copy.deepcopy(_written_by_export())
    change(data)
    folder = _write(tmp_path / "m", data)
    with pytest.raises(UserError) as caught:
        Manifest.load(folder)
    message = str(caught.value)
    assert "\n" not in message and str(folder / MANIFEST) in message and f"'{key}'" in message, message


@pytest.mark.fast
def test_missing_or_broken_manifest_files(tmp_path):
    with pytest.raises(UserError, match="is not an exported model"):
        Manifest.load(tmp_path)
    with pytest.raises(UserError, match="is not valid JSON"):
        Manifest.load(_write(tmp_path / "j", "{"))
    with pytest.raises(UserError, match="the manifest should be an object, not list"):
        Manifest.load(_write(tmp_path / "l", "[]"))


@pytest.mark.fast
def test_model_folder_layout(tmp_path):
    folder = ModelFolder(_write(tmp_path / "cnn", _written_by_export()))
    assert folder.is_export() and folder.manifest().name == "cnn"
    assert folder.bench_dir == tmp_path / "cnn" / "bench" and folder.eval_dir == tmp_path / "cnn" / "eval"
    assert folder.bench_results() == [] and folder.eval_results() == []
    for name in ("inprocess-20260101-000000.json", "inprocess-20260102-000000.json", "http-20260103-000000.json"):
        _write(folder.bench_dir, "{}").joinpath(MANIFEST).rename(folder.bench_dir / name)
    assert [p.name for p in folder.bench_results()] == ["inprocess-20260101-000000.json", "inprocess-20260102-000000.json"]
    assert not ModelFolder(tmp_path).is_export()


@pytest.mark.fast
def test_the_table_has_one_row_per_file_and_every_export_variant():
    files = [f.file for f in formats.FORMATS]
    assert len(files) == len(set(files)) and len(formats.RUNTIMES) == len(set(formats.RUNTIMES))
    # every file a full export writes (savedmodel,onnx --fp16 --int8) is a row
    assert set(_written_by_export()["artifacts"]) | {"model.int8.onnx"} <= set(files)
    from training.exported import export

    assert set(export.FORMATS) == {f.export_format for f in formats.FORMATS if f.export_format}
    assert {f.export_flag for f in formats.FORMATS if f.export_flag} == {"--fp16", "--int8"}
    for flag in ("fp16", "int8"):
        assert hasattr(export.ExportOptions(), flag)  # each flag row is an option export has
    assert [f.runtime for f in formats.FORMATS if f.serving_can_load] == ["onnx", "onnx-fp16", "onnx-int8"]
    assert all(f.engine in (formats.TENSORFLOW, formats.ONNXRUNTIME, formats.LITERT) for f in formats.FORMATS)
    assert formats.BENCH_RUNTIMES == ("keras", "tf-function", "savedmodel", "onnx", "onnx-fp16", "onnx-int8",
                                      "tflite", "tflite-fp16", "tflite-int8")
    assert formats.BASE_RUNTIMES == ("keras", "savedmodel", "onnx", "tflite", "tflite-fp16", "tflite-int8")


@pytest.mark.fast
def test_what_a_model_has_and_how_to_make_what_it_lacks():
    m = Manifest.from_dict(_written_by_export())
    have = [f.runtime for f in formats.FORMATS if f.present(m)]
    assert have == ["keras", "savedmodel", "onnx", "onnx-fp16"]  # int8 was not kept by the gate
    with pytest.raises(formats.MissingFormat, match="has no int8 model") as caught:
        formats.require(m, formats.BY_RUNTIME["onnx-int8"])
    assert "tlserve export cnn --name cnn --formats savedmodel,onnx --fp16 --int8 --overwrite" in str(caught.value)
    m.artifacts = {"saved_model": m.artifacts["saved_model"]}
    assert formats.export_command(m, formats.BY_VARIANT["fp32"]) == \
        "tlserve export cnn --name cnn --formats savedmodel,onnx --overwrite"
    assert formats.export_command(m, formats.BY_VARIANT["int8"]) == \
        "tlserve export cnn --name cnn --formats savedmodel,onnx --int8 --overwrite"
    with pytest.raises(UserError, match="unknown runtime 'tensorrt'"):
        formats.by_runtime("tensorrt")
    with pytest.raises(UserError, match="nearest: int8"):
        formats.by_variant("int4")


@pytest.mark.fast
def test_artifact_dump_leaves_out_figures_that_do_not_apply():
    assert Artifact("a" * 64, 10, 0.0, 1.0).extra == {}
    m = Manifest.from_dict(_written_by_export())
    assert set(m.to_dict()["artifacts"]["saved_model"]) == {"sha256", "bytes", "max_abs_diff", "top1_agreement"}


# ---- through the one loader, on the shared exported CNN ------------------------------------------

def test_a_modified_savedmodel_is_refused_by_bench_and_predict(cnn_model, tmp_path, run_cli, sample_images):
    tampered = tmp_path / "tampered"
    shutil.copytree(cnn_model, tampered, ignore=shutil.ignore_patterns("bench", "eval"))
    pb = tampered / "saved_model" / "saved_model.pb"
    pb.write_bytes(pb.read_bytes() + b"\0")
    for args in (("bench", tampered, "--runtimes", "savedmodel", "--iterations", "1", "--batch-sizes", "1"),
                 ("predict", tampered, sample_images, "--runtime", "savedmodel")):
        result = run_cli(*args)
        assert result.code == 2 and "saved_model does not match its sha256" in result.err, result.err
    assert not (tampered / "bench").exists()


def test_every_artifact_of_a_real_export_has_a_row_and_loads(cnn_model):
    import numpy as np

    from training.exported.loader import load

    m = Manifest.load(cnn_model)
    assert set(m.artifacts) <= {f.file for f in formats.FORMATS}
    x = np.random.default_rng(0).uniform(0, 255, (2, *m.input.hw, 3)).astype(np.float32)
    outputs = {f.runtime: load(cnn_model, f.runtime, manifest=m).predict(x) for f in formats.FORMATS if f.present(m)}
    # conftest exports every ONNX variant; TFLite is written on request (tests/test_ood.py runs its files)
    assert set(outputs) == {f.runtime for f in formats.FORMATS if f.engine != formats.LITERT}
    for runtime, probs in outputs.items():
        assert probs.shape == (2, m.num_classes), runtime
        np.testing.assert_allclose(probs, outputs["keras"], atol=0.05, err_msg=runtime)


def test_keras_that_is_not_the_exported_model_is_refused(cnn_model, tmp_path):
    from training.exported.loader import load

    copy_dir = tmp_path / "other"
    shutil.copytree(cnn_model, copy_dir, ignore=shutil.ignore_patterns("bench", "eval", "saved_model", "*.onnx"))
    data = json.loads((copy_dir / MANIFEST).read_text())
    data["params"] += 1
    (copy_dir / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(UserError, match="is not the model cnn was exported from .parameters"):
        load(copy_dir, "keras")
    data["run_path"] = str(tmp_path / "gone")
    (copy_dir / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(formats.MissingFormat, match="model.keras is not at"):
        load(copy_dir, "keras")
