"""Temperature scaling at the end of training: fitted on the validation split, baked into the
classifier layer (probabilities equal metrics.apply_temperature of the unbaked ones, same argmax),
recorded in the run and carried into the manifest with each variant's ECE."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.record.records import RunRecord

from conftest import train_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The same tiny run twice: calibrated, and with --no-calibrate (otherwise identical)."""
    root = tmp_path_factory.mktemp("calib-runs")
    tiny = dict(backbone="cnn", cnn_layers="c16,p,c32,p,f,d32", epochs=6, limit=400, seed=1)
    train_run(root, "cal", **tiny)
    train_run(root, "raw", calibrate=False, **tiny)
    return root


def _record(run: Path) -> RunRecord:
    return RunRecord.load(run / "record.json")


def _probs(run: Path, x: np.ndarray) -> np.ndarray:
    from training.model.build import load_model

    return load_model(run / "model.keras").predict(x.astype(np.float32), verbose=0)


def test_fitted_temperature_lowers_validation_nll_and_is_recorded(runs):
    cal = _record(runs / "cal").calibration
    assert cal.temperature > 0 and cal.fitted_on == "val" and cal.layer == "probabilities"
    assert cal.val_nll_after < cal.val_nll_before
    # T minimises NLL, not ECE: on 200 validation images ECE need not fall, so it is only recorded.
    for key in ("test_ece_before", "test_ece_after", "val_ece_before", "val_ece_after"):
        assert 0 <= getattr(cal, key) <= 1, key
    assert cal.test_top1_agreement == 1.0
    raw = _record(runs / "raw").calibration
    assert raw.temperature is None and "--no-calibrate" in raw.skipped


def test_baked_model_serves_apply_temperature_of_the_unbaked_one_with_the_same_argmax(runs):
    from training.record import metrics
    from training.config import DataConfig
    from training.data.sources import load_dataset

    record = _record(runs / "cal")
    test = load_dataset(DataConfig(**record.config["data"])).test
    baked, plain = _probs(runs / "cal", test.x), _probs(runs / "raw", test.x)
    temperature = record.calibration.temperature
    np.testing.assert_allclose(baked, metrics.apply_temperature(plain, temperature), atol=2e-5)
    assert (baked.argmax(1) == plain.argmax(1)).all()
    # The record's test figures are the calibrated model's: same accuracy as the uncalibrated twin.
    assert record.test.accuracy == _record(runs / "raw").test.accuracy
    assert record.calibration.test_ece_after == pytest.approx(metrics.ece(test.y, baked), abs=1e-6)


@pytest.mark.parametrize("options", [
    {"tta": "flip"},                                 # logits averaged over two views before the classifier
    {"logit_scale": 0.125},                          # Dense 'logits' -> Rescaling -> softmax
    {"backbone": "mobilenetv2", "weights": "none", "strategy": "frozen", "head": "gap-dense", "input_size": 32},
])
def test_baking_is_exact_for_every_head(options):
    from training.fit import calibration
    from training.record import metrics
    from training.model import build as models
    from training.config import TrainConfig

    cfg = TrainConfig(**options)
    model = models.build(cfg, (32, 32), 5).model
    rng = np.random.default_rng(0)
    # Larger weights in the classifier so the distribution is far from uniform: a real test of the scale.
    layer = calibration.classifier_layer(model)
    layer.set_weights([w * 40 for w in layer.get_weights()])
    x = rng.uniform(0, 255, (6, 32, 32, 3)).astype(np.float32)
    before = model.predict(x, verbose=0)
    calibration.bake(model, 2.5)
    after = model.predict(x, verbose=0)
    np.testing.assert_allclose(after, metrics.apply_temperature(before, 2.5), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()


def test_no_validation_split_skips_calibration_with_a_logged_reason():
    from training.fit import calibration

    lines: list[str] = []
    result = calibration.calibrate(None, True, None, np.zeros(0, np.int64), None, lines.append)
    assert result.facts["temperature"] is None and "--val-split 0" in result.facts["skipped"]
    assert lines and lines[0].startswith("calibration skipped:")


def test_manifest_carries_calibration_and_each_variants_ece(runs, tmp_path, run_cli):
    result = run_cli("export", "cal", "--runs-dir", runs, "--models-dir", tmp_path, "--int8", "--no-register",
                     "--max-accuracy-drop", "100", "--max-class-drop", "100")
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "cal" / "manifest.json").read_text())
    assert manifest["calibration"] == _record(runs / "cal").calibration.to_dict()
    for file in ("model.onnx", "model.int8.onnx"):
        facts = manifest["artifacts"][file]
        assert 0 <= facts["test_ece"] <= 1 and set(facts["test_per_class_recall"]) == set(manifest["class_names"])
    # fp32 ONNX computes the Keras model: its ECE on the test split is the record's calibrated figure.
    assert manifest["artifacts"]["model.onnx"]["test_ece"] == pytest.approx(manifest["calibration"]["test_ece_after"],
                                                                           abs=1e-4)
    assert "ECE" in result.out


@pytest.mark.fast
def test_a_temperature_is_baked_only_when_it_clearly_helps_held_out_images():
    from training.fit import calibration

    rng = np.random.default_rng(0)

    def model_output(n: int, sharpness: float) -> tuple[np.ndarray, np.ndarray]:
        logits = rng.normal(0, 1.5, (n, 5))
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        y = np.array([rng.choice(5, p=row) for row in p])  # labels drawn from p: p is calibrated
        q = np.exp(sharpness * logits)
        return y, q / q.sum(1, keepdims=True)

    assert calibration.cross_check(*model_output(2000, 3.0)) is None  # overconfident, plenty of images: kept
    reason = calibration.cross_check(*model_output(2000, 1.0))  # already calibrated: T ~ 1 is no clear gain
    assert reason is not None and "2000 validation images" in reason and "t = " in reason
    assert "too few" in calibration.cross_check(*model_output(6, 3.0))


@pytest.mark.fast
def test_a_split_that_cannot_measure_a_temperature_is_refused_in_one_line():
    from training.fit import calibration

    reason = calibration.identifiable({"val_copies": 40, "val_images": 0, "val_errors": 0})
    assert "all 40 validation images copy training images" in reason
    reason = calibration.identifiable({"val_copies": None, "val_images": 500, "val_errors": 3})
    assert "497 of 500" in reason and f"at least {calibration.MIN_ERRORS} wrong" in reason
    assert calibration.identifiable({"val_copies": 0, "val_images": 500, "val_errors": calibration.MIN_ERRORS}) is None
    low, high = calibration.T_RANGE
    assert calibration.out_of_range(low) is None and calibration.out_of_range(high) is None
    assert "sharpen" in calibration.out_of_range(low * 0.9) and "flatten" in calibration.out_of_range(high * 1.1)


@pytest.mark.fast
def test_a_validation_split_the_model_gets_all_right_keeps_no_temperature():
    """Issue 29: every fold of an all-right split "improves" as T falls, so T ran to its floor and was baked in."""
    from types import SimpleNamespace

    from training.fit import calibration

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    confidence = rng.uniform(0.7, 0.99, 600)  # right, but not certain: T -> 0 makes every image "better"
    probs = np.stack([np.where(y == 0, confidence, 1 - confidence), np.where(y == 1, confidence, 1 - confidence)], 1)
    model = SimpleNamespace(predict=lambda data, verbose=0: probs)
    lines: list[str] = []
    result = calibration.calibrate(model, True, "val", y, "test", lines.append)
    assert result.facts["temperature"] is None and result.facts["val_errors"] == 0
    assert "600 of 600 validation images right" in result.facts["skipped"]
    assert lines == [f"calibration skipped: {result.facts['skipped']}"]


@pytest.mark.fast
def test_a_temperature_that_raises_the_test_nll_is_flagged_and_shown_loudly(tmp_path):
    import copy
    import io

    from rich.console import Console

    from training.console import tables
    from training.fit import calibration
    from training.record import metrics
    from training.record.records import Run

    from test_records import TODAY

    y = np.array([0, 1, 1, 0])
    before = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1]])
    after = metrics.apply_temperature(before, 0.2)  # sharper: the one mistake becomes near certain
    cal = calibration.Calibrated({"temperature": 0.2, "val_images": 400, "val_errors": 30}, before)
    lines: list[str] = []
    cal.finish(after, y, lines.append)
    assert cal.facts["test_nll_rose"] is True and cal.facts["test_nll_after"] > cal.facts["test_nll_before"]
    assert len(lines) == 1 and lines[0].startswith("warning: the baked temperature 0.200 RAISED the test log-loss")

    d = copy.deepcopy(TODAY)
    d["calibration"].update(temperature=0.2, test_nll_rose=True, val_errors=30, test_nll_before=0.1, test_nll_after=0.9)
    out = Console(file=io.StringIO(), width=100)
    tables.print_record(out, Run(tmp_path, RunRecord.from_dict(d)))
    said = " ".join(out.file.getvalue().replace("│", " ").split())
    assert "WARNING" in said and "RAISED the test log-loss 0.1000 -> 0.9000" in said
    assert "val NLL 0.7000 -> 0.6500, ECE 0.1000 -> 0.0500" in said and "test NLL 0.1000 -> 0.9000, ECE 0.1200 -> 0.0600" in said
