"""`tlserve train --class-weight`: balanced weights from the training split's counts, explicit
name=weight pairs, recorded in the run; the imbalance warning; user mistakes are one line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.record.records import RunRecord

# A class is kept or dropped whole from the generated set: 48 / 12 / 12 images, 4x imbalance.
COUNTS = {"circle": 48, "square": 12, "triangle": 12}
SMALL_CNN = ["-b", "cnn", "--cnn-layers", "c8,p,f,d16", "--epochs", "2"]


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> Path:
    from PIL import Image

    from training.data.sources import make_synthetic

    root = tmp_path_factory.mktemp("imbalanced")
    x, y, names = make_synthetic(600, seed=5)
    for name, count in COUNTS.items():
        (root / name).mkdir()
        for i, index in enumerate(np.flatnonzero(y == names.index(name))[:count]):
            Image.fromarray(x[index]).save(root / name / f"{i:03d}.png")
    return root


def _record(runs: Path, name: str) -> RunRecord:
    return RunRecord.load(runs / name / "record.json")


def test_balanced_weights_are_recorded_and_the_imbalance_is_warned_about(imbalanced, tmp_path, run_cli):
    result = run_cli("train", "--data", f"folder:{imbalanced}", *SMALL_CNN, "--class-weight", "balanced",
                     "--name", "bal", "--runs-dir", tmp_path)
    assert result.code == 0, result.err
    assert "imbalanced training split: 'circle'" in result.out and "--class-weight balanced" in result.out
    record = _record(tmp_path, "bal")
    counts = record.data.train_class_counts
    assert counts["circle"] > 3 * counts["square"]
    total, k = sum(counts.values()), len(counts)
    assert record.config["class_weight"] == "balanced"
    assert record.training.class_weights == pytest.approx({c: total / (k * n) for c, n in counts.items()}, rel=1e-5)


def test_explicit_weights_with_the_feature_cache(imbalanced, tmp_path, run_cli):
    # A frozen backbone trains its head on cached features: class weights must reach that fit too.
    result = run_cli("train", "--data", f"folder:{imbalanced}", "-b", "mobilenetv2", "-s", "frozen", "--weights", "none",
                     "--input-size", "32", "--epochs", "1", "--class-weight", "square=3, triangle=2.5",
                     "--name", "cached", "--runs-dir", tmp_path)
    assert result.code == 0, result.err
    record = _record(tmp_path, "cached")
    assert record.training.feature_cache is True
    assert record.training.class_weights == {"circle": 1.0, "square": 3.0, "triangle": 2.5}


def test_weights_change_what_is_learned(imbalanced, tmp_path, run_cli):
    for name, spec in (("w-none", "none"), ("w-heavy", "square=50")):
        assert run_cli("train", "--data", f"folder:{imbalanced}", *SMALL_CNN, "--class-weight", spec, "--seed", "4",
                       "--name", name, "--runs-dir", tmp_path).code == 0
    plain, heavy = _record(tmp_path, "w-none"), _record(tmp_path, "w-heavy")
    assert plain.training.class_weights is None
    assert heavy.history[0]["loss"] != pytest.approx(plain.history[0]["loss"], rel=1e-3)


@pytest.mark.parametrize("spec, message", [
    ("squre=2", "no class named 'squre'; nearest: square"),
    ("square=-1", "weights above 0"),
    ("square", "use balanced, none, or name=weight"),
])
def test_bad_class_weights_are_one_line(imbalanced, tmp_path, run_cli, spec, message):
    result = run_cli("train", "--data", f"folder:{imbalanced}", *SMALL_CNN, "--class-weight", spec,
                     "--name", "bad", "--runs-dir", tmp_path)
    assert result.code == 2 and message in result.err and "Traceback" not in result.err
    # One error line; the only other lines are the progress of the data loading that came before it.
    errors = [line for line in result.err.strip().splitlines() if not line.startswith("decoding images")]
    assert len(errors) == 1 and errors[0].startswith("error:")
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()
