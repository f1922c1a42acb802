"""A run killed at any stage boundary and resumed ends with exactly the weights of the run that
was never interrupted: mid-epoch, between phases, between a checkpoint and the state naming it,
after the last epoch, during the save. Each kill is a real SIGKILL of a real `tlserve train`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED
from training.record.records import RunRecord

KILL_AT = ROOT / "tests" / "kill_at.py"
MOBILENET = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"


def _weights(run: Path) -> list[np.ndarray]:
    from training.model.build import load_model

    return load_model(run / "model.keras").get_weights()


def _record(run: Path) -> RunRecord:
    return RunRecord.load(run / "record.json")


def _train(tlserve_bin, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(tlserve_bin), *map(str, args)], capture_output=True, text=True, timeout=300)


def _kill_then_resume(tlserve_bin, runs: Path, name: str, point: str, args: list[str]) -> Path:
    killed = subprocess.run([sys.executable, str(KILL_AT), point, "--", *map(str, args), "--name", name],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, f"{point}: not killed (exit {killed.returncode}):\n{killed.stderr[-2000:]}"
    assert not (runs / name).exists(), f"{point}: a killed run must not look finished"
    resumed = _train(tlserve_bin, "train", "--resume", name, "--runs-dir", runs)
    assert resumed.returncode == 0, f"{point}:\n{resumed.stderr[-2000:]}"
    assert not (runs / f".{name}.partial").exists()
    return runs / name


def _assert_same_run(reference: Path, resumed: Path, point: str) -> None:
    ref, got = _record(reference), _record(resumed)
    assert [h["epoch"] for h in got.history] == [h["epoch"] for h in ref.history], point
    assert [h["val_loss"] for h in got.history] == [h["val_loss"] for h in ref.history], point
    for a, b in zip(_weights(reference), _weights(resumed), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"killed at {point}")
    assert got.test.accuracy == ref.test.accuracy, point
    assert got.model.trainable_params == ref.model.trainable_params, point
    assert got.training.resumed is True


def test_scratch_run_with_dropout_and_augmentation_resumes_exactly(tlserve_bin, tmp_path):
    # Dropout and random augmentation: the resumed run must draw the same random numbers.
    args = ["train", "--data", "synthetic", "-b", "cnn", "--cnn-layers", "seed002", "--augment", "--epochs", "3",
            "--limit", "200", "--patience", "2", "--seed", "3", "--runs-dir", tmp_path]
    assert _train(tlserve_bin, *args, "--name", "ref").returncode == 0
    for n, point in enumerate(("batch:5", "checkpoint:epoch-2", "evaluate", "save")):
        resumed = _kill_then_resume(tlserve_bin, tmp_path, f"k{n}", point, args)
        _assert_same_run(tmp_path / "ref", resumed, point)


@pytest.mark.skipif(not MOBILENET.is_file(), reason="needs ../shared/weights")
def test_two_phase_finetune_resumes_exactly(tlserve_bin, tmp_path):
    # Frozen head on cached features, then the top layers unfrozen: killed between the phases,
    # in phase 2, and after phase 2's last checkpoint before the state names it.
    args = ["train", "--data", "synthetic", "-b", "mobilenetv2", "-s", "finetune", "--weights", MOBILENET,
            "--input-size", "32", "--epochs", "2", "--finetune-epochs", "2", "--unfreeze", "10", "--limit", "200",
            "--patience", "2", "--finetune-lr", "1e-3", "--seed", "3", "--runs-dir", tmp_path]
    assert _train(tlserve_bin, *args, "--name", "ref").returncode == 0
    ref = _record(tmp_path / "ref")
    assert [h["phase"] for h in ref.history] == ["head", "head", "finetune", "finetune"]
    assert ref.training.feature_cache is True
    for n, point in enumerate(("phase-end:head", "batch:6", "checkpoint:phase-finetune")):
        resumed = _kill_then_resume(tlserve_bin, tmp_path, f"f{n}", point, args)
        _assert_same_run(tmp_path / "ref", resumed, point)
        assert _record(resumed).test.phase1_accuracy == ref.test.phase1_accuracy


def test_early_stopping_state_survives_a_resume(tmp_path):
    """Patience counter, best loss and best-epoch weights come back from the saved state, so the
    resumed phase stops where the uninterrupted one did and ends with the best epoch's weights."""
    from training.fit.callbacks import early_stopping
    from training.fit.checkpoints import Checkpoints
    from training.env import keras

    K = keras()
    model = K.Sequential([K.Input((2,)), K.layers.Dense(1)])
    ckpts = Checkpoints(tmp_path, [])
    losses = [1.0, 0.5, 0.7, 0.8]  # best at epoch 2; patience 2 stops after epoch 4

    def run_epochs(early, epochs):
        for epoch in epochs:
            model.set_weights([np.full((2, 1), epoch, np.float32), np.zeros(1, np.float32)])
            early.on_epoch_end(epoch, {"val_loss": losses[epoch]})

    early = early_stopping(2, None, ckpts)
    early.set_model(model)
    run_epochs(early, range(3))
    saved = json.loads(json.dumps(early.snapshot("train")))  # through JSON, as state.json holds it
    resumed = early_stopping(2, saved, ckpts)
    resumed.set_model(model)
    resumed.on_train_begin()  # what fit calls: it must not reset the restored progress
    run_epochs(resumed, [3])
    assert model.stop_training and resumed.snapshot("train")["stopped"] == 3
    resumed.restore_best(model)
    assert model.get_weights()[0][0, 0] == 1.0  # the weights of epoch 2 (index 1)
