"""Training: real tiny runs on generated data, their records, the seeds' parameter counts, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from training.record.records import RunRecord

from conftest import cli_call


def _record(run_dir: Path) -> RunRecord:
    return RunRecord.load(run_dir / "record.json")


def test_cnn_learns_synthetic(cnn_run):
    record = _record(cnn_run)
    # 10 balanced classes: chance is 0.10.
    assert record.test.accuracy >= 0.8, record.test
    assert record.history[-1]["val_accuracy"] >= 0.7


def test_record_has_every_field(cnn_run):
    r = _record(cnn_run).to_dict()  # the file's keys, as DESIGN.md states them
    assert r["schema"] == 1 and r["name"] == "cnn" and r["status"] == "finished"
    cfg = r["config"]
    for key in ("backbone", "strategy", "weights", "epochs", "lr", "batch_size", "optimizer", "seed", "target",
                "input_size", "head", "augment", "cnn_layers", "unfreeze", "from_run", "train_last", "patience"):
        assert key in cfg, key
    assert cfg["data"]["spec"] == "synthetic"
    d = r["data"]
    assert d["num_classes"] == len(d["class_names"]) == 10
    assert set(d["splits"]) == {"train", "val", "test"} and all(v > 0 for v in d["splits"].values())
    assert d["image_size"] == [32, 32] and d["interpolation"] == "bilinear" and "source" in d
    m = r["model"]
    for key in ("layers", "depth", "total_params", "trainable_params", "non_trainable_params",
                "trainable_layers", "frozen_layers", "size_bytes", "input_shape", "input_size"):
        assert key in m, key
    assert m["total_params"] == m["trainable_params"] + m["non_trainable_params"] > 0
    assert m["size_bytes"] == (cnn_run / "model.keras").stat().st_size
    assert m["input_shape"] == [32, 32, 3] and m["input_range"] == [0, 255]
    assert len(r["history"]) == r["epochs"] >= 1
    for row in r["history"]:
        assert set(row) >= {"epoch", "phase", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"}
        assert row["seconds"] > 0
    assert r["avg_epoch_time_sec"] == pytest.approx(np.mean([h["seconds"] for h in r["history"]]), abs=1e-3)
    assert r["total_time_sec"] >= sum(h["seconds"] for h in r["history"]) * 0.99
    first = next((h["epoch"] for h in r["history"] if h["val_accuracy"] >= r["target"]), None)
    assert r["epochs_to_target"] == first
    t = r["test"]
    assert 0 <= t["loss"] and 0 <= t["accuracy"] <= 1
    assert set(t["per_class_accuracy"]) == set(d["class_names"])
    cm = np.array(t["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == d["splits"]["test"]
    assert t["accuracy"] == pytest.approx(np.trace(cm) / cm.sum(), abs=1e-6)
    env = r["environment"]
    assert env["versions"]["tensorflow"] and env["machine"]["cpu_count"] >= 1 and env["devices"]
    with open(cnn_run / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == r["epochs"] and float(rows[0]["loss"]) == pytest.approx(r["history"][0]["loss"])
    assert any((cnn_run / "checkpoint").glob("phase-*.index"))  # the weights the last phase ended with
    assert (cnn_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (cnn_run / "state.json").exists() and not (cnn_run / "config.json").exists()
    assert r["training"]["feature_cache"] is False and r["training"]["global_batch_size"] == 64
    assert r["environment"]["precision"] == "float32" and r["environment"]["jit"] is False


def test_model_takes_raw_pixels_and_returns_probabilities(cnn_run):
    from training.model.build import load_model

    model = load_model(cnn_run / "model.keras")
    assert model.input_shape == (None, 32, 32, 3)
    probs = model.predict(np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32"), verbose=0)
    assert probs.shape == (3, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_runs_table_and_seed001_csv(cnn_run, runs_root, run_cli, tmp_path):
    out = tmp_path / "runs.csv"
    result = run_cli("runs", "--runs-dir", runs_root, "--csv", out)
    assert result.code == 0 and "cnn" in result.out
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["model", "epochs", "avg_epoch_time_sec", "total_time_sec", "test_accuracy",
                             "trainable_params", "non_trainable_params", "epochs_to_target", "macro_f1"]
    cnn = next(r for r in rows if r["model"] == "cnn")
    assert float(cnn["test_accuracy"]) == pytest.approx(_record(cnn_run).test.accuracy)


def test_existing_run_is_not_overwritten(cnn_run, runs_root, run_cli):
    before = (cnn_run / "record.json").read_bytes()
    result = run_cli("train", "--data", "synthetic", "--name", "cnn", "--runs-dir", runs_root, "--epochs", "1")
    assert result.code == 2 and "already exists" in result.err
    assert (cnn_run / "record.json").read_bytes() == before


@pytest.mark.parametrize("args, trainable, non_trainable", [
    # seed 000: MobileNetV2 at 224, frozen head then top-30 fine-tune (the notebook's own counts)
    (["-b", "mobilenetv2", "-s", "finetune", "--input-size", "224", "--unfreeze", "30"], [12_810, 1_539_210], [2_257_984, 731_584]),
    # seed 001: MobileNetV2 frozen at 128 with a Dense(128) head, 6 classes
    (["-b", "mobilenetv2", "-s", "frozen", "--input-size", "128", "--image-size", "128", "--head", "gap-dense",
      "--head-units", "128", "--num-classes", "6"], [164_742], [2_257_984]),
    # seed 001: MobileNetV2 fully unfrozen, and "partial" (trainable from block_15_expand)
    (["-b", "mobilenetv2", "-s", "full", "--input-size", "128", "--image-size", "128", "--head", "gap-dense",
      "--head-units", "128", "--num-classes", "6"], [2_388_614], [34_112]),
    (["-b", "mobilenetv2", "-s", "finetune", "--input-size", "128", "--image-size", "128", "--head", "gap-dense",
      "--head-units", "128", "--num-classes", "6", "--unfreeze-from", "block_15_expand"], [164_742, 1_370_822], [2_257_984, 1_051_904]),
    # seed 001: its Simple_CNN at 128 (3,305,414 parameters)
    (["-b", "cnn", "--cnn-layers", "seed001", "--image-size", "128", "--num-classes", "6"], [3_305_414], [0]),
    # seed 004: Conv32-Conv64-Pool-Dropout-Dense128-Dropout-Dense64-Dropout, 5 classes
    (["-b", "cnn", "--cnn-layers", "seed004", "--num-classes", "5"], [1_633_733], [0]),
])
def test_summary_counts_equal_the_seeds(run_cli, args, trainable, non_trainable):
    result = run_cli("summary", *args, "--json")
    assert result.code == 0, result.err
    phases = json.loads(result.out)["phases"]
    assert [p["facts"]["trainable_params"] for p in phases] == trainable
    assert [p["facts"]["non_trainable_params"] for p in phases] == non_trainable


def test_seed004_transfer_from_run(runs_root, run_cli):
    """Train on classes 0-4, then transfer to 5-9 training the last layer, then the last dense + output."""
    common = ["--data", "synthetic", "--limit", "200", "--runs-dir", runs_root, "--batch-size", "32"]
    cli_call("train", *common, "-b", "cnn", "--cnn-layers", "seed004", "--classes", "0-4", "--epochs", "1",
             "--optimizer", "rmsprop", "--name", "s004-base")
    cli_call("train", *common, "--from-run", "s004-base", "--classes", "5-9", "--train-last", "1", "--epochs", "1",
             "--name", "s004-last1")
    cli_call("train", *common, "--from-run", "s004-base", "--classes", "5-9", "--train-last", "2", "--epochs", "1",
             "--name", "s004-last2")
    last1, last2 = _record(runs_root / "s004-last1"), _record(runs_root / "s004-last2")
    assert last1.model.trainable_params == 325
    assert last2.model.trainable_params == 8_581
    assert last1.model.strategy == "from-run" and last1.config["from_run"] == "s004-base"
    assert last1.data.num_classes == 5


def test_finetune_two_phases_on_tiny_mobilenet(runs_root):
    cli_call("train", "--data", "synthetic", "--limit", "96", "-b", "mobilenetv2", "-s", "finetune", "--weights", "none",
             "--input-size", "32", "--epochs", "1", "--finetune-epochs", "1", "--unfreeze", "10",
             "--runs-dir", runs_root, "--name", "mnv2-ft", "--batch-size", "32")
    r = _record(runs_root / "mnv2-ft")
    assert [h["phase"] for h in r.history] == ["head", "finetune"]
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert r.test.phase1_accuracy is not None
    from training.model.build import load_model

    model = load_model(runs_root / "mnv2-ft" / "model.keras")
    assert model.count_params() == r.model.total_params


@pytest.mark.parametrize("strategy, momentum", [("scratch", 0.9), ("frozen", 0.999)])
def test_backbone_batchnorm_momentum_from_scratch_only(strategy, momentum):
    """Keras's MobileNetV2 BatchNorm momentum (0.999) left validation at chance in short scratch runs."""
    from training.config import TrainConfig
    from training.env import keras
    from training.model.build import build, leaf_layers

    cfg = TrainConfig(backbone="mobilenetv2", strategy=strategy, weights="none", input_size=32, bn_momentum=0.9)
    model = build(cfg, (32, 32), 10).model
    bns = [layer for layer in leaf_layers(model) if isinstance(layer, keras().layers.BatchNormalization)]
    assert bns and {layer.momentum for layer in bns} == {momentum}


def _bad(run_cli, runs_root, *args):
    result = run_cli("train", "--runs-dir", runs_root, "--epochs", "1", "--limit", "50", *args)
    assert result.code == 2, (result.code, result.err)
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.err
    assert "Traceback" not in result.err
    return lines[0]


@pytest.fixture
def empty_runs(tmp_path) -> Path:
    return tmp_path / "runs"


def test_bad_inputs_one_line_exit_2(run_cli, empty_runs, tmp_path):
    assert "unknown backbone" in _bad(run_cli, empty_runs, "--backbone", "resnet9000")
    assert "unknown strategy" in _bad(run_cli, empty_runs, "-b", "mobilenetv2", "--strategy", "frozn", "--weights", "none")
    assert "no such folder" in _bad(run_cli, empty_runs, "--data", f"folder:{tmp_path / 'nope'}")
    assert "unknown --data" in _bad(run_cli, empty_runs, "--data", "imagenet21k")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no class sub-folders" in _bad(run_cli, empty_runs, "--data", f"folder:{empty}")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(one / f"{i}.png")
    assert "only one class" in _bad(run_cli, empty_runs, "--data", f"folder:{one.parent}")
    assert "larger than" in _bad(run_cli, empty_runs, "-b", "mobilenetv2", "-s", "finetune", "--weights", "none",
                                 "--input-size", "32", "--unfreeze", "1000")
    line = _bad(run_cli, empty_runs, "-b", "vgg16", "-s", "finetune", "--weights", "none", "--unfreeze-from", "block5_conv9")
    assert "nearest" in line and "block5_conv" in line
    assert "out of range" in _bad(run_cli, empty_runs, "--classes", "0-12")
    assert "nearest: circle" in _bad(run_cli, empty_runs, "--classes", "circel,square")
    weights = tmp_path / "wrong.h5"
    _write_cnn_weights(weights)
    assert "does not match" in _bad(run_cli, empty_runs, "-b", "mobilenetv2", "-s", "frozen", "--input-size", "32",
                                    "--weights", weights)
    line = _bad(run_cli, empty_runs, "-b", "mobilenetv2", "-s", "frozen", "--input-size", "32", "--weights", "imagenet")
    assert "--weights none" in line
    assert "needs a pretrained backbone" in _bad(run_cli, empty_runs, "-b", "cnn", "-s", "frozen")
    assert "--lr and --finetune-lr must be above 0" in _bad(run_cli, empty_runs, "--lr", "-0.01")
    assert "--momentum must be at least 0 and below 1" in _bad(run_cli, empty_runs, "--optimizer", "sgd", "--momentum", "1.5")
    assert "--dropout must be" in _bad(run_cli, empty_runs, "--dropout", "1")
    assert "--patience must be at least 0" in _bad(run_cli, empty_runs, "--patience", "-2")
    # nothing, not even a staging folder, is left behind by any of these
    assert not empty_runs.exists() or not any(empty_runs.iterdir())


def _write_cnn_weights(path: Path) -> None:
    from training.env import keras

    K = keras()
    model = K.Sequential([K.Input((8, 8, 3)), K.layers.Conv2D(4, 3), K.layers.Flatten(), K.layers.Dense(2)])
    model.save_weights(str(path))
