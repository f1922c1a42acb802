"""Training recipes and devices: feature caching equals the uncached path, accelerator decisions,
MirroredStrategy over two logical CPUs, and resuming a killed run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_call
from training.fit.accel import choose_distribution, choose_jit, choose_precision, precision_note
from training.record.records import RunRecord
from serving.base.errors import UserError


def _record(path: Path) -> RunRecord:
    return RunRecord.load(path / "record.json")


def test_feature_cache_matches_uncached_training(tmp_path):
    common = ["train", "--data", "synthetic", "--limit", "128", "-b", "vgg16", "-s", "frozen", "--weights", "none",
              "--input-size", "32", "--epochs", "3", "--dropout", "0", "--patience", "0", "--runs-dir", tmp_path]
    cli_call(*common, "--name", "cached")
    cli_call(*common, "--name", "plain", "--no-feature-cache")
    cached, plain = _record(tmp_path / "cached"), _record(tmp_path / "plain")
    assert cached.training.feature_cache is True and cached.training.extract_seconds > 0
    assert plain.training.feature_cache is False and plain.training.feature_cache_reason == "--no-feature-cache"
    for a, b in zip(cached.history, plain.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-4)
    assert cached.test.accuracy == pytest.approx(plain.test.accuracy, abs=1e-6)
    from training.model.build import load_model

    wa = load_model(tmp_path / "cached" / "model.keras").get_layer("probabilities").get_weights()
    wb = load_model(tmp_path / "plain" / "model.keras").get_layer("probabilities").get_weights()
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, atol=1e-4)


def test_augmentation_turns_the_cache_off(tmp_path):
    cli_call("train", "--data", "synthetic", "--limit", "64", "-b", "vgg16", "-s", "frozen", "--weights", "none",
             "--input-size", "32", "--epochs", "1", "--augment", "--runs-dir", tmp_path, "--name", "aug")
    training = _record(tmp_path / "aug").training
    assert training.feature_cache is False and "augment" in training.feature_cache_reason


def test_flip_tta_turns_the_cache_off():
    """With --tta flip the backbone sees each image twice (it and its mirror): no one feature row per image."""
    from training.config import TrainConfig
    from training.fit.feature_cache import decide

    assert decide(TrainConfig(backbone="vgg16", strategy="frozen"), True)[0] is True
    use, reason = decide(TrainConfig(backbone="vgg16", strategy="frozen", tta="flip"), True)
    assert use is False and "--tta" in reason


def test_residual_onecycle_bfloat16_recipe_trains_and_exports(tmp_path):
    """The fast-CIFAR recipe's parts on a tiny residual net: flip-crop augmentation, Nesterov SGD with
    weight decay, a one-cycle schedule; then bfloat16 compute, whose export computes in float32 and
    agrees. (The bfloat16 run is one short epoch: on a CPU without bfloat16 instructions it is emulated
    and about 16x slower.)"""
    runs, exported = tmp_path / "runs", tmp_path / "models"
    recipe = ["--data", "synthetic", "-b", "cnn-bn", "--cnn-layers", "c16,r16,p,c32,r32,g", "--augment",
              "--augment-policy", "flip-crop", "--optimizer", "sgd", "--nesterov", "--weight-decay", "5e-4",
              "--schedule", "onecycle", "--lr", "0.1", "--batch-size", "50", "--patience", "0", "--bn-momentum", "0.9",
              "--runs-dir", runs]
    cli_call("train", *recipe, "--limit", "600", "--epochs", "6", "--name", "res")
    record = _record(runs / "res")
    cfg = record.config
    assert (cfg["schedule"], cfg["augment_policy"], cfg["nesterov"], cfg["weight_decay"]) == ("onecycle", "flip-crop", True, 5e-4)
    lrs = [row["lr"] for row in record.history]
    # 12 steps an epoch: warm-up (30% of 72 steps) from lr/25 to the peak, then a cosine down to zero.
    assert lrs[0] > 0.1 / 25 and max(lrs) <= 0.1 + 1e-6 and lrs[-1] < 0.01 and lrs.index(max(lrs)) in (0, 1)
    assert record.test.accuracy > 0.3  # chance is 0.1
    from training.model import build as models
    from training.env import keras

    cli_call("train", *recipe, "--limit", "100", "--epochs", "1", "--precision", "mixed_bfloat16", "--name", "bf16")
    assert _record(runs / "bf16").environment.precision == "mixed_bfloat16"
    assert keras().mixed_precision.global_policy().name == "float32"  # the run did not leak its policy
    model = models.load_model(runs / "bf16" / "model.keras")
    assert {layer.dtype_policy.name for layer in models.leaf_layers(model)} == {"float32"}
    assert any(layer.__class__.__name__ == "Add" for layer in model.layers)
    cli_call("export", "bf16", "--runs-dir", runs, "--models-dir", exported, "--formats", "onnx", "--no-register")
    facts = json.loads((exported / "bf16" / "manifest.json").read_text())["artifacts"]["model.onnx"]
    assert facts["max_abs_diff"] <= 1e-4 and facts["top1_agreement"] == 1.0


@pytest.mark.fast
def test_residual_block_needs_matching_channels(run_cli, tmp_path):
    result = run_cli("train", "--data", "synthetic", "--limit", "50", "-b", "cnn-bn", "--cnn-layers", "c16,r32,g",
                     "--runs-dir", tmp_path)
    assert result.code == 2 and "r32 needs an input of 32 channels" in result.err and "Traceback" not in result.err


@pytest.mark.fast
def test_label_smoothing_loss_matches_its_definition():
    from training.fit.optim import loss

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    targets = 0.8 * np.eye(3)[labels] + 0.2 / 3
    expected = -(targets * np.log(probs)).sum(axis=1)
    np.testing.assert_allclose(loss(0.2)(labels, probs).numpy(), expected, rtol=1e-5)
    assert loss(0.0) == "sparse_categorical_crossentropy"


def test_recorded_test_loss_is_the_training_loss():
    """With label smoothing the recorded test loss is the smoothed loss trained on, as val_loss is, so the two compare."""
    from types import SimpleNamespace

    from training.fit.optim import loss
    from training.fit.train import evaluate

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], np.float32)
    labels = np.array([0, 2])
    model = SimpleNamespace(predict=lambda ds, verbose=0, callbacks=None: probs, losses=[])
    dataset = SimpleNamespace(test=SimpleNamespace(y=labels), class_names=["a", "b", "c"])
    assert evaluate(model, None, dataset, 0.0)["loss"] == pytest.approx(-np.log([0.7, 0.8]).mean(), rel=1e-5)
    test = evaluate(model, None, dataset, 0.2)
    assert test["loss"] == pytest.approx(float(np.mean(loss(0.2)(labels, probs))), rel=1e-5)
    assert test["accuracy"] == 1.0 and test["confusion_matrix"] == [[1, 0, 0], [0, 0, 0], [0, 0, 1]]


def test_logit_scale_global_max_pool_export_and_transfer(tmp_path, run_cli):
    """Page's ResNet-9 head (global max pool, logits scaled by 1/8) with label smoothing: the model
    computes softmax(scale * logits), exports with parity, and --from-run replaces its whole output."""
    runs, exported = tmp_path / "runs", tmp_path / "models"
    common = ["--data", "synthetic", "--limit", "100", "--runs-dir", runs, "--batch-size", "25", "--epochs", "1"]
    cli_call("train", *common, "-b", "cnn-bn", "--cnn-layers", "c8,p,c16,gm", "--logit-scale", "0.125",
             "--label-smoothing", "0.1", "--name", "scaled")
    cfg = _record(runs / "scaled").config
    assert (cfg["logit_scale"], cfg["label_smoothing"]) == (0.125, 0.1)
    from training.model import build as models
    from training.env import keras

    K = keras()
    model = models.load_model(runs / "scaled" / "model.keras")
    assert any(layer.__class__.__name__ == "GlobalMaxPooling2D" for layer in model.layers)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    logits = K.Model(model.input, model.get_layer("logits").output)(x).numpy() * 0.125
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model(x).numpy(), expected, atol=1e-5)
    cli_call("export", "scaled", "--runs-dir", runs, "--models-dir", exported, "--formats", "onnx", "--no-register")
    facts = json.loads((exported / "scaled" / "manifest.json").read_text())["artifacts"]["model.onnx"]
    assert facts["max_abs_diff"] <= 1e-4 and facts["top1_agreement"] == 1.0
    cli_call("train", *common, "--from-run", "scaled", "--classes", "0-4", "--name", "moved")
    moved = _record(runs / "moved")
    assert moved.model.trainable_params == 16 * 5 + 5
    result = run_cli("train", *common, "-b", "mobilenetv2", "--weights", "none", "--logit-scale", "0.5")
    assert result.code == 2 and "scratch CNNs" in result.err
    result = run_cli("train", *common, "--label-smoothing", "1")
    assert result.code == 2 and "--label-smoothing" in result.err


@pytest.mark.fast
def test_emulated_bfloat16_is_named():
    assert "much slower than float32" in precision_note("mixed_bfloat16", 0, {"avx2", "fma"})
    assert precision_note("mixed_bfloat16", 0, {"avx2", "avx512_bf16"}) is None
    assert precision_note("mixed_bfloat16", 0, {"amx_bf16"}) is None
    assert precision_note("mixed_bfloat16", 1, {"avx2"}) is None      # a GPU computes it
    assert precision_note("mixed_bfloat16", 0, None) is None          # unknown CPU: no guess
    assert precision_note("float32", 0, {"avx2"}) is None


@pytest.mark.fast
def test_accelerator_decisions():
    assert choose_precision(0) == "float32"
    assert choose_precision(1) == "mixed_float16"
    assert choose_precision(1, "float32") == "float32"
    assert choose_jit(0) is False and choose_jit(0, True) is False  # never XLA on CPU
    assert choose_jit(2) is True and choose_jit(2, False) is False
    assert choose_distribution(0) == "default" and choose_distribution(1) == "default"
    assert choose_distribution(4) == "mirrored"
    assert choose_distribution(4, "none") == "default"
    cluster = json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}})
    assert choose_distribution(1, "auto", cluster) == "multiworker"
    with pytest.raises(UserError):
        choose_precision(0, "bfloat8")
    with pytest.raises(UserError):
        choose_distribution(0, "auto", "{not json")


def _tlserve(tlserve_bin: Path, *args, env=None, **kw):
    return subprocess.run([str(tlserve_bin), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def test_mirrored_strategy_on_two_logical_cpus(tlserve_bin, tmp_path):
    result = _tlserve(tlserve_bin, "train", "--data", "synthetic", "--limit", "256", "--epochs", "2",
                      "--distribute", "mirrored", "--batch-size", "32", "--runs-dir", tmp_path, "--name", "mirrored",
                      env={"TLSERVE_LOGICAL_CPUS": "2"})
    assert result.returncode == 0, result.stderr
    env = _record(tmp_path / "mirrored").environment
    assert env.distribution == "mirrored" and env.replicas == 2
    assert sum("CPU" in d for d in env.devices) == 2
    assert _record(tmp_path / "mirrored").training.global_batch_size == 64
    # without two devices, asking for mirrored is a clear error, not a crash
    result = _tlserve(tlserve_bin, "train", "--epochs", "1", "--distribute", "mirrored", "--runs-dir", tmp_path)
    assert result.returncode == 2 and "TLSERVE_LOGICAL_CPUS" in result.stderr and "Traceback" not in result.stderr


def test_killed_run_resumes_with_history_continuing(tlserve_bin, tmp_path):
    args = ["train", "--data", "synthetic", "-b", "cnn", "--cnn-layers", "seed002", "--epochs", "6", "--patience", "0",
            "--runs-dir", tmp_path, "--name", "long"]
    proc = subprocess.Popen([str(tlserve_bin), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".long.partial" / "state.json"
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if state.is_file() and len(json.loads(state.read_text())["history"]) >= 1:
                break
            if proc.poll() is not None:
                pytest.fail("training ended before it could be interrupted")
            time.sleep(0.05)
        else:
            pytest.fail("no epoch finished in time")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    done_before = len(json.loads(state.read_text())["history"])
    assert 1 <= done_before < 6 and not (tmp_path / "long").exists()
    # starting it again by name is refused: it must be resumed or overwritten
    again = _tlserve(tlserve_bin, *args)
    assert again.returncode == 2 and "--resume long" in again.stderr
    resumed = _tlserve(tlserve_bin, "train", "--resume", "long", "--runs-dir", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    r = _record(tmp_path / "long")
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5, 6]
    assert r.training.resumed is True and r.epochs == 6
    assert not (tmp_path / ".long.partial").exists()
    assert r.test.accuracy > 0.3


def test_sigint_leaves_a_resumable_run(tlserve_bin, tmp_path):
    args = ["train", "--data", "synthetic", "-b", "cnn", "--cnn-layers", "seed002", "--epochs", "6", "--patience", "0",
            "--runs-dir", tmp_path, "--name", "ctrlc"]
    proc = subprocess.Popen([str(tlserve_bin), *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".ctrlc.partial" / "state.json"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (state.is_file() and json.loads(state.read_text())["history"]):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume with: tlserve train --resume ctrlc" in stderr and "Traceback" not in stderr
    assert state.is_file()
