"""Transfer learning with the real ImageNet MobileNetV2 weights in ../shared/weights, and the caches
that make frozen and fine-tuned training cheap: pooled features, the frozen bottom of a fine-tune,
memory-mapped caches. Cached and uncached training must give the same weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.record.records import RunRecord

from conftest import SHARED, cli_call

MOBILENET = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
LEAVES = SHARED / "datasets" / "banana-leaf"
needs_weights = pytest.mark.skipif(not MOBILENET.is_file(), reason="needs ../shared/weights")


def _record(run: Path) -> RunRecord:
    return RunRecord.load(run / "record.json")


def _weights(run: Path) -> list[np.ndarray]:
    from training.model.build import load_model

    return load_model(run / "model.keras").get_weights()


@needs_weights
@pytest.mark.skipif(not LEAVES.is_dir(), reason="needs ../shared/datasets")
def test_imagenet_weights_beat_random_weights_on_real_leaves(tmp_path):
    common = ["train", "--data", f"folder:{LEAVES}", "--image-size", "64", "--input-size", "96", "-b", "mobilenetv2",
              "-s", "frozen", "--epochs", "8", "--lr", "3e-3", "--patience", "0", "--runs-dir", tmp_path]
    cli_call(*common, "--weights", MOBILENET, "--name", "imagenet")
    cli_call(*common, "--weights", "none", "--name", "random")
    real, random = _record(tmp_path / "imagenet").test.accuracy, _record(tmp_path / "random").test.accuracy
    assert real - random >= 0.20, (real, random)


@needs_weights
@pytest.mark.parametrize("size", [32, 128])
def test_the_weights_file_loads_at_any_input_size(size):
    import h5py

    from training.model import backbones

    base = backbones.build_pretrained(backbones.get("mobilenetv2"), size, str(MOBILENET))
    with h5py.File(MOBILENET) as f:
        kernel = np.asarray(f["Conv1"]["Conv1"]["kernel:0"])
    np.testing.assert_array_equal(base.get_layer("Conv1").get_weights()[0], kernel)


@needs_weights
def test_a_weights_file_for_another_backbone_is_one_line(tmp_path, run_cli):
    result = run_cli("train", "--data", "synthetic", "--limit", "20", "-b", "vgg16", "-s", "frozen",
                     "--weights", MOBILENET, "--input-size", "32", "--epochs", "1", "--runs-dir", tmp_path)
    assert result.code == 2 and "does not match vgg16" in result.err and "Traceback" not in result.err
    junk = tmp_path / "weights.h5"
    junk.write_bytes(b"not hdf5")
    result = run_cli("train", "--data", "synthetic", "--limit", "20", "-b", "mobilenetv2", "-s", "frozen",
                     "--weights", junk, "--input-size", "32", "--epochs", "1", "--runs-dir", tmp_path)
    assert result.code == 2 and "not a Keras weights file" in result.err and "Traceback" not in result.err
    assert not list(tmp_path.glob("*/record.json"))


@needs_weights
@pytest.mark.parametrize("unfreeze", [["--unfreeze", "12"], ["--unfreeze-from", "block_14_project_BN"]])
def test_cached_fine_tune_equals_the_uncached_one(tmp_path, unfreeze):
    # --unfreeze-from block_14_project_BN cuts a residual block: two tensors cross the boundary.
    common = ["train", "--data", "synthetic", "--limit", "96", "-b", "mobilenetv2", "-s", "finetune",
              "--weights", MOBILENET, "--input-size", "32", "--epochs", "1", "--finetune-epochs", "2", *unfreeze,
              # SGD, not Adam: Adam divides each step by the gradient's own scale, so a float-noise
              # difference in a near-zero gradient becomes a full step of difference in that weight.
              "--optimizer", "sgd", "--lr", "0.01", "--finetune-lr", "0.01",
              "--patience", "0", "--seed", "1", "--runs-dir", tmp_path]
    cli_call(*common, "--name", "cached")
    cli_call(*common, "--name", "plain", "--no-feature-cache")
    cached, plain = _record(tmp_path / "cached"), _record(tmp_path / "plain")
    phase2 = cached.training.caches["finetune"]
    assert phase2["used"] is True and plain.training.caches["finetune"]["used"] is False
    assert phase2["shared_with"] == "head"  # one pass over the images made both phases' caches
    if unfreeze[0] == "--unfreeze-from":
        assert len(phase2["shapes"]) == 2, phase2
    for a, b in zip(cached.history, plain.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert cached.history[-1]["loss"] != cached.history[-2]["loss"]  # phase 2 did train
    for a, b in zip(_weights(tmp_path / "cached"), _weights(tmp_path / "plain"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # measured: at most 1.3e-5 apart
    assert cached.model.trainable_params == plain.model.trainable_params


def test_phase2_cache_says_why_it_is_off():
    from training.model import build as models, strategies
    from training.config import TrainConfig
    from training.fit.feature_cache import decide_finetune

    cfg = TrainConfig(backbone="mobilenetv2", strategy="finetune", weights="none", input_size=32, unfreeze=200)
    base = models.build(cfg, (32, 32), 10).backbone
    with pytest.raises(Exception, match="larger than"):
        strategies.unfreeze_start(base, cfg)
    cfg.unfreeze = len(base.layers)  # every layer: nothing left frozen
    assert decide_finetune(cfg, base, strategies.unfreeze_start(base, cfg)) == \
        (False, "nothing below the unfreeze point is frozen")
    cfg.unfreeze = 10
    start = strategies.unfreeze_start(base, cfg)
    assert decide_finetune(cfg, base, start)[0] is True
    for change, word in (({"augment": True}, "--augment"), ({"tta": "flip"}, "--tta"),
                         ({"feature_cache": False}, "--no-feature-cache")):
        use, why = decide_finetune(TrainConfig(**{**cfg.__dict__, **change}), base, start)
        assert use is False and word in why


def test_pooled_and_memory_mapped_caches(tmp_path, monkeypatch):
    from training.fit import feature_cache

    common = ["train", "--data", "synthetic", "--limit", "64", "-b", "mobilenetv2", "-s", "frozen", "--weights", "none",
              "--input-size", "32", "--epochs", "2", "--patience", "0", "--seed", "2", "--runs-dir", tmp_path]
    cli_call(*common, "--name", "pooled")
    cli_call(*common, "--name", "spatial", "--head", "flatten-dense-bn")
    monkeypatch.setattr(feature_cache, "IN_MEMORY_BYTES", 0)
    cli_call(*common, "--name", "on-disk")
    pooled = _record(tmp_path / "pooled").training.caches["head"]
    assert pooled["shapes"] == [[1280]] and pooled["storage"] == "memory" and "pooled" in pooled["what"]
    assert pooled["bytes"] == 4 * 1280 * 64 * 3
    spatial = _record(tmp_path / "spatial").training.caches["head"]
    assert spatial["shapes"] == [[1, 1, 1280]]
    on_disk = _record(tmp_path / "on-disk")
    assert on_disk.training.caches["head"]["storage"] == "disk"
    assert on_disk.training.peak_rss_bytes > 0
    assert not (tmp_path / "on-disk" / "cache").exists()
    for a, b in zip(_weights(tmp_path / "pooled"), _weights(tmp_path / "on-disk"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_fine_tune_without_phase_1_records_no_frozen_accuracy(tmp_path):
    """--epochs 0 (seed 001's "partial"): there is no frozen phase, so no frozen accuracy to report."""
    cli_call("train", "--data", "synthetic", "--limit", "32", "-b", "mobilenetv2", "-s", "finetune", "--weights", "none",
             "--input-size", "32", "--epochs", "0", "--finetune-epochs", "1", "--unfreeze", "10", "--runs-dir", tmp_path,
             "--name", "partial")
    record = _record(tmp_path / "partial")
    assert record.test.phase1_accuracy is None and [h["phase"] for h in record.history] == ["finetune"]
