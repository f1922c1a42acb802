"""`tlserve train --teacher RUN`: the distillation loss, a student taught by a teacher run and recorded,
a teacher that saw other data refused before training, and `tlserve compare` showing both."""
from __future__ import annotations

import json

import numpy as np
import pytest

STUDENT = ["--data", "synthetic", "--limit", "150", "--cnn-layers", "c8,p,f,d16", "--epochs", "2", "--data-check", "off",
           "--no-calibrate"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from conftest import train_run

    runs = tmp_path_factory.mktemp("distill-runs")
    train_run(runs, "teacher", limit=150, backbone="cnn", cnn_layers="c16,p,c32,p,f,d32", epochs=3, data_check="off",
              calibrate=False)
    return runs


def test_loss_mixes_labels_and_softened_teacher():
    from training.fit.distill import distillation_loss
    from training.env import tf

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], np.float32)
    labels = np.array([0, 1], np.float32)
    teacher = np.array([[0.5, 0.4, 0.1], [0.2, 0.6, 0.2]], np.float32)
    packed = lambda w: np.concatenate([labels[:, None], np.full((2, 1), w, np.float32), teacher], axis=1)  # noqa: E731
    hard = -np.log(probs[[0, 1], [0, 1]])
    # weight 0: the labels alone; a plain label batch (validation, test): the labels alone too.
    np.testing.assert_allclose(distillation_loss(3, 4.0, 0.0, 0.0)(tf().constant(packed(1)), probs), hard, rtol=1e-5)
    np.testing.assert_allclose(distillation_loss(3, 4.0, 0.7, 0.0)(tf().constant(labels), probs), hard, rtol=1e-5)
    # weight 1: T^2 KL between the softened distributions (softmax(log p / T)), zero when they agree.
    t = 2.0
    soft = lambda p: np.exp(np.log(p) / t) / np.exp(np.log(p) / t).sum(1, keepdims=True)  # noqa: E731
    kl = (soft(teacher) * np.log(soft(teacher) / soft(probs))).sum(1) * t * t
    np.testing.assert_allclose(distillation_loss(3, t, 1.0, 0.0)(tf().constant(packed(1)), probs), kl, rtol=1e-4)
    same = np.concatenate([labels[:, None], np.ones((2, 1), np.float32), probs], axis=1)
    np.testing.assert_allclose(distillation_loss(3, t, 1.0, 0.0)(tf().constant(same), probs), 0, atol=1e-6)
    # The class weight in the targets scales each image's loss.
    np.testing.assert_allclose(distillation_loss(3, t, 0.5, 0.0)(tf().constant(packed(2)), probs),
                               2 * distillation_loss(3, t, 0.5, 0.0)(tf().constant(packed(1)), probs), rtol=1e-5)


def test_student_learns_from_teacher_and_records_it(run_cli, teacher, tmp_path):
    result = run_cli("train", *STUDENT, "--teacher", "teacher", "--distill-temperature", "3", "--distill-weight", "0.6",
                     "--name", "student", "--runs-dir", teacher, "--class-weight", "balanced", "--json")
    assert result.code == 0, result.err
    record = json.loads(result.out)
    d = record["distillation"]
    teacher_record = json.loads((teacher / "teacher" / "record.json").read_text())
    assert d["teacher"] == "teacher" and d["temperature"] == 3 and d["weight"] == 0.6
    assert d["teacher_test_accuracy"] == teacher_record["test"]["accuracy"] and not d["cache_reused"]
    assert record["config"]["teacher"] == "teacher" and record["config"]["distill_weight"] == 0.6
    assert "probabilities on 150 training images computed once" in result.err
    # The teacher's probabilities are on disk for the next student: the same images read them back.
    cached = np.load(d["cache"])
    assert cached.shape == (150, 10) and np.allclose(cached.sum(axis=1), 1, atol=1e-4)
    assert d["train_label_agreement"] == pytest.approx(float(np.mean(cached.argmax(1) == _train_labels())), abs=1e-6)
    # val_loss is the plain cross-entropy on labels, comparable with a run trained without a teacher.
    assert all(np.isfinite(row["val_loss"]) for row in record["history"])
    again = run_cli("train", *STUDENT, "--teacher", "teacher", "--name", "student2", "--runs-dir", teacher, "--json")
    assert again.code == 0 and json.loads(again.out)["distillation"]["cache_reused"]

    report = run_cli("compare", "teacher", "student", "--runs-dir", teacher, "--out", tmp_path / "report")
    assert report.code == 0, report.err
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Distillation: student beside teacher" in text
    row = next(line for line in text.splitlines() if line.startswith("| student | teacher |") and "acc" not in line)
    assert f"{record['test']['accuracy']:.4f}" in row and f"{teacher_record['test']['accuracy']:.4f}" in row
    assert "Distilled: student" in report.out


def _train_labels():
    from training.config import DataConfig
    from training.data.sources import load_dataset

    return load_dataset(DataConfig(limit=150)).train.y


@pytest.mark.parametrize("options, message", [
    (["--seed", "3"], "was trained on other data: seed 0 (here 3)"),
    (["--classes", "0-4"], "was trained on other data: classes None (here '0-4')"),
    (["--data", "folder:/nonexistent"], "was trained on other data: spec"),
    (["--teacher", "nobody"], "no run named 'nobody'"),
    (["--distill-weight", "1.5"], "--distill-weight between 0 and 1"),
])
def test_teacher_on_other_data_is_refused_before_training(run_cli, teacher, options, message):
    result = run_cli("train", *STUDENT, "--teacher", "teacher", *options, "--name", "refused", "--runs-dir", teacher)
    assert result.code == 2 and message in result.err, result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (teacher / "refused").exists() and not (teacher / ".refused.partial").exists()
