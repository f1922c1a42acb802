"""The accuracy gate of `tlserve export --fp16/--int8`: a variant that loses more than
--max-accuracy-drop points of test accuracy, or more than --max-class-drop points of any class's
recall, is not kept; the table and the manifest say which limit it crossed and by how much."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import train_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gate-runs")
    train_run(root, "g", backbone="cnn", cnn_layers="c16,p,c32,p,f,d32", epochs=3, limit=200, seed=2)
    return root


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_a_variant_over_a_limit_is_not_kept_and_the_manifest_says_why(runs, tmp_path, run_cli):
    # A limit below zero fails any variant: even one that loses nothing is "over" it by the margin.
    result = run_cli("export", "g", "--runs-dir", runs, "--models-dir", tmp_path, "--fp16", "--int8", "--no-register",
                     "--max-accuracy-drop", "-1", "--max-class-drop", "100")
    assert result.code == 0, result.err
    folder = tmp_path / "g"
    assert (folder / "model.onnx").is_file()
    assert not (folder / "model.fp16.onnx").exists() and not (folder / "model.int8.onnx").exists()
    manifest = _manifest(folder)
    assert set(manifest["artifacts"]) == {"saved_model", "model.onnx"}
    rejected = manifest["export"]["gate"]["rejected"]
    assert set(rejected) == {"model.fp16.onnx", "model.int8.onnx"}
    fp32 = manifest["artifacts"]["model.onnx"]
    for file, facts in rejected.items():
        gate = facts["gate"]
        assert facts["kept"] is False and gate["passed"] is False
        [crossed] = gate["crossed"]
        drop = 100 * (fp32["test_accuracy"] - facts["test_accuracy"])
        assert crossed["limit"] == "max_accuracy_drop" and crossed["limit_points"] == -1
        assert crossed["drop_points"] == pytest.approx(drop) and crossed["over_by_points"] == pytest.approx(drop + 1)
        assert set(facts["test_per_class_recall"]) == set(manifest["class_names"])
    assert result.out.count("NOT KEPT") == 2 and result.out.count("not kept: ") == 2 and "gate: " not in result.out
    assert result.out.count("over --max-accuracy-drop -1 by") == 2
    # A variant the gate dropped cannot be served: one clear line.
    served = run_cli("predict", folder, str(tmp_path), "--variant", "int8")
    assert served.code == 2 and "no int8 model" in served.err


def test_the_class_limit_names_the_class_and_its_drop(runs, tmp_path, run_cli):
    result = run_cli("export", "g", "--runs-dir", runs, "--models-dir", tmp_path, "--int8", "--no-register",
                     "--max-accuracy-drop", "100", "--max-class-drop", "-0.5")
    assert result.code == 0, result.err
    manifest = _manifest(tmp_path / "g")
    gate = manifest["export"]["gate"]["rejected"]["model.int8.onnx"]["gate"]
    [crossed] = gate["crossed"]
    fp32 = manifest["artifacts"]["model.onnx"]["test_per_class_recall"]
    int8 = manifest["export"]["gate"]["rejected"]["model.int8.onnx"]["test_per_class_recall"]
    worst = max(fp32, key=lambda c: fp32[c] - int8[c])
    assert crossed["limit"] == "max_class_drop" and crossed["class"] == gate["worst_class"]
    assert crossed["drop_points"] == pytest.approx(100 * (fp32[worst] - int8[worst]))


def test_variants_within_the_limits_are_kept_with_their_figures(runs, tmp_path, run_cli):
    result = run_cli("export", "g", "--runs-dir", runs, "--models-dir", tmp_path, "--fp16", "--int8", "--no-register",
                     "--max-accuracy-drop", "100", "--max-class-drop", "100")
    assert result.code == 0, result.err
    folder = tmp_path / "g"
    manifest = _manifest(folder)
    assert manifest["export"]["gate"]["rejected"] == {}
    assert manifest["export"]["gate"]["max_accuracy_drop"] == 100
    for file in ("model.fp16.onnx", "model.int8.onnx"):
        assert (folder / file).is_file()
        gate = manifest["artifacts"][file]["gate"]
        assert gate["passed"] is True and gate["crossed"] == []
        assert gate["accuracy_drop_points"] == pytest.approx(-100 * manifest["artifacts"][file]["accuracy_delta"])
    assert "NOT KEPT" not in result.out and result.out.count("gate: ") == 2 and result.out.count(" kept: ") == 2


def test_a_limit_that_is_not_a_number_is_one_line(runs, tmp_path, run_cli):
    result = run_cli("export", "g", "--runs-dir", runs, "--models-dir", tmp_path, "--int8", "--no-register",
                     "--max-accuracy-drop", "nan")
    assert result.code == 2 and "--max-accuracy-drop" in result.err
    assert not (tmp_path / "g").exists()
