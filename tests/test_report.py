"""compare (report from real runs), bench (in-process figures, stored with machine facts), features."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.record.records import RunRecord

from conftest import cli_call, train_run


@pytest.fixture(scope="module")
def benched(cnn_model, run_cli_module):
    result = run_cli_module("bench", cnn_model, "--runtimes", "keras,tf-function,savedmodel,onnx,onnx-int8,onnx-fp16",
                            "--batch-sizes", "1,4", "--iterations", "5", "--warmup", "2", "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_bench_measures_every_runtime_and_stores_machine_facts(benched, cnn_model):
    rows = benched["results"]
    assert {(r["runtime"], r["batch_size"]) for r in rows} == {
        (rt, b) for rt in ("keras", "tf-function", "savedmodel", "onnx", "onnx-int8", "onnx-fp16") for b in (1, 4)}
    for r in rows:
        assert r["iterations"] == 5
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["images_per_sec"] == pytest.approx(r["batch_size"] * 1000 / r["mean_ms"])
        assert r["provider"]
    onnx = next(r for r in rows if r["runtime"] == "onnx")
    assert onnx["provider"] == "CPUExecutionProvider" and onnx["threads"] >= 1
    assert benched["machine"]["cpu"] and benched["machine"]["cpu_count"] >= 1
    assert benched["versions"]["onnxruntime-gpu"] or benched["versions"]["onnxruntime"]
    stored = Path(benched["path"])
    assert stored.parent == cnn_model / "bench" and json.loads(stored.read_text())["results"] == rows


def test_bench_skips_missing_variants(runs_root, models_root, run_cli):
    cli_call("export", "cnn", "--name", "cnn-plain", "--formats", "onnx", "--runs-dir", runs_root,
             "--models-dir", models_root, "--no-register")
    result = run_cli("bench", models_root / "cnn-plain", "--runtimes", "onnx,onnx-int8,savedmodel",
                     "--batch-sizes", "1", "--iterations", "3", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [r["runtime"] for r in report["results"]] == ["onnx"]
    assert set(report["skipped"]) == {"onnx-int8", "savedmodel"}
    bad = run_cli("bench", models_root / "cnn-plain", "--runtimes", "tensorrt")
    assert bad.code == 2 and "unknown runtime" in bad.err
    import shutil

    shutil.rmtree(models_root / "cnn-plain")  # a second benchmarked export of run cnn would change the report's pick


@pytest.fixture(scope="module")
def finetune_run(runs_root) -> str:
    train_run(runs_root, "rep-mnv2-ft", limit=64, backbone="mobilenetv2", strategy="finetune", weights="none",
              input_size=32, epochs=1, finetune_epochs=1, batch_size=32)
    return "rep-mnv2-ft"


def test_compare_report(cnn_run, benched, finetune_run, runs_root, models_root, tmp_path, run_cli):
    out = tmp_path / "report"
    result = run_cli("compare", "cnn", finetune_run, "--runs-dir", runs_root, "--models-dir", models_root, "--out", out)
    assert result.code == 0, result.err
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    cnn = RunRecord.load(cnn_run / "record.json")
    ft = RunRecord.load(runs_root / finetune_run / "record.json")
    # the seed 001 table carries each run's real numbers
    assert f"| cnn | {cnn.epochs} | {cnn.avg_epoch_time_sec:.4f} | {cnn.total_time_sec:.4f} | " \
           f"{cnn.test.accuracy:.4f} | {cnn.model.trainable_params:,} |" in md
    # frozen vs fine-tuned: the finetune run's phase-1 (frozen) and final accuracy
    assert f"{ft.test.phase1_accuracy:.4f} | {ft.test.accuracy:.4f}" in md
    onnx_b1 = next(r["p50_ms"] for r in benched["results"] if r["runtime"] == "onnx" and r["batch_size"] == 1)
    assert f"{onnx_b1:.4f}" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"curves.png", "test_accuracy.png", "accuracy_vs_latency.png", "confusion-cnn.png"} <= set(pngs)
    # self-contained: every figure embedded, nothing fetched from elsewhere
    assert page.count("data:image/png;base64,") == len(pngs)
    assert not re.search(r'(src|href)="(http|//)', page)
    best = max((cnn, ft), key=lambda r: r.test.accuracy)
    assert f"Most accurate: {best.name} at {best.test.accuracy:.4f}" in md
    fastest = min((cnn, ft), key=lambda r: r.total_time_sec)
    assert f"Fastest to train: {fastest.name}" in md
    assert "Fastest to serve: cnn" in md  # the only benchmarked export


@pytest.mark.fast
def test_compare_without_runs_is_one_line(tmp_path, run_cli):
    result = run_cli("compare", "--runs-dir", tmp_path / "none", "--out", tmp_path / "r")
    assert result.code == 2 and "no finished runs" in result.err
    result = run_cli("compare", "nope", "--runs-dir", tmp_path / "none", "--out", tmp_path / "r")
    assert result.code == 2 and "no run named 'nope'" in result.err


def test_features_grid(cnn_run, finetune_run, runs_root, sample_images, tmp_path, run_cli):
    image = sorted(sample_images.glob("*.png"))[0]
    out = tmp_path / "maps.png"
    from training.model.build import load_model

    # Keras numbers layer names per session, so the name depends on what the session built first.
    conv = [layer.name for layer in load_model(cnn_run / "model.keras").layers if layer.name.startswith("conv2d")]
    result = run_cli("features", "cnn", image, "--layer", conv[1], "--runs-dir", runs_root, "--out", out)
    assert result.code == 0, result.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    nested = tmp_path / "nested.png"
    result = run_cli("features", finetune_run, image, "--layer", "block_13_expand_relu", "--runs-dir", runs_root,
                     "--out", nested)
    assert result.code == 0, result.err and nested.is_file()
    result = run_cli("features", "cnn", image, "--layer", "conv2d_9999", "--runs-dir", runs_root)
    assert result.code == 2 and "nearest: conv2d" in result.err


def test_compare_to_an_unwritable_place_is_one_line(cnn_run, runs_root, models_root, tmp_path, run_cli):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli("compare", "cnn", "--runs-dir", runs_root, "--models-dir", models_root, "--out", blocker / "report")
    assert result.code == 2 and f"cannot write {blocker / 'report'}" in result.err.replace("\n", "")
    assert "Traceback" not in result.err and blocker.read_text() == "not a folder"


@pytest.mark.fast
def test_mistyped_option_is_a_usage_error_not_a_traceback(run_cli):
    result = run_cli("compare", "--no-such-option")
    assert result.code == 2 and "No such option" in result.err and "Traceback" not in result.err


@pytest.mark.fast
def test_most_accurate_ranks_by_leak_free_accuracy_when_a_run_leaked():
    """Issue 29: compare crowned a run whose test images were 73.6% copies of its training images."""
    import copy

    from training.exported.report import Entry, answers

    from test_records import TODAY

    def run(name: str, accuracy: float, free: float | None, free_images: int | None, leaked: int = 0) -> Entry:
        d = copy.deepcopy(TODAY)
        d["name"] = name
        d["test"].update(accuracy=accuracy, leak_free_accuracy=free, leak_free_images=free_images)
        if free_images is None:  # an older record: only its data check's count
            del d["test"]["leak_free_accuracy"], d["test"]["leak_free_images"]
            d["data_check"].update(dropped=None, leaks={"test-in-train": {"images": leaked, "of": 10, "percent": 10.0 * leaked}})
        return Entry(RunRecord.from_dict(d), None, None)

    clean, leaky, old = run("clean", 0.95, 0.95, 10), run("leaky", 0.99, 0.9, 6), run("old", 0.999, None, None, 7)
    said = answers([clean, leaky, old])[0]
    assert said.startswith("Most accurate: clean at 0.9500 leak-free test accuracy")
    assert ("leaky is LEAKY (0.9900 on all test images): 4 of 10 test images copy train/val images; "
            "leak-free accuracy 0.9000 on the other 6") in said
    assert "Not ranked: old (leaky; no leak-free accuracy recorded)" in said
    assert answers([clean])[0].startswith("Most accurate: clean at 0.9500 test accuracy")
    best = answers([run("a", 0.99, 0.97, 6), run("b", 0.9, 0.9, 10)])[0]
    assert best.startswith("Most accurate: a at 0.9700 leak-free test accuracy (LEAKY, 0.9900 on all test images: 4 of 10")
