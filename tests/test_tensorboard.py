"""Every run writes TensorBoard event files with Keras's own callback; read back here with
TensorBoard's own reader, their per-epoch scalars are the run's history, once per epoch, also for
cached-feature phases and for runs killed and resumed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import ROOT
from training.record.records import RunRecord

KILL_AT = ROOT / "tests" / "kill_at.py"
TINY = ["--data", "synthetic", "--limit", "64", "--batch-size", "16", "--patience", "0", "--seed", "1"]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard's reader sees the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.env import tf

    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    return {tag: [(e.step, float(tf().make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def _assert_events_match_history(run: Path) -> None:
    history = RunRecord.load(run / "record.json").history
    for phase in dict.fromkeys(row["phase"] for row in history):
        rows = [row for row in history if row["phase"] == phase]
        steps = [row["epoch"] - 1 for row in rows]
        train = _scalars(run / "tensorboard" / phase / "train")
        val = _scalars(run / "tensorboard" / phase / "validation")
        for tag, key, got in (("epoch_loss", "loss", train), ("epoch_accuracy", "accuracy", train),
                              ("epoch_learning_rate", "lr", train), ("epoch_loss", "val_loss", val),
                              ("epoch_accuracy", "val_accuracy", val)):
            assert [s for s, _ in got[tag]] == steps, f"{phase} {tag}: each epoch exactly once"
            np.testing.assert_allclose([v for _, v in got[tag]], [row[key] for row in rows], rtol=1e-6,
                                       err_msg=f"{phase} {tag}")


def test_event_files_hold_the_history_and_runs_prints_the_command(run_cli, tmp_path):
    for name in ("a", "b"):
        result = run_cli("train", *TINY, "--epochs", "2", "--schedule", "cosine", "--name", name, "--runs-dir", tmp_path)
        assert result.code == 0, result.err
    _assert_events_match_history(tmp_path / "a")
    lr = [v for _, v in _scalars(tmp_path / "a" / "tensorboard" / "train" / "train")["epoch_learning_rate"]]
    assert lr[1] < lr[0]  # the schedule shows
    result = run_cli("runs", "--tensorboard", "--runs-dir", tmp_path)
    assert result.code == 0
    spec = f"a:{(tmp_path / 'a').resolve()}/tensorboard,b:{(tmp_path / 'b').resolve()}/tensorboard"
    assert result.out.strip() == f"tensorboard --logdir_spec {spec}"


def test_runs_tensorboard_without_runs_is_one_line(run_cli, tmp_path):
    result = run_cli("runs", "--tensorboard", "--runs-dir", tmp_path)
    assert result.code == 2 and "no finished run" in result.err and "Traceback" not in result.err


def test_cached_feature_phases_log_each_phase(run_cli, tmp_path):
    # Both phases of a fine-tune train on cached activations; the callback sits on the model fit runs.
    result = run_cli("train", *TINY, "-b", "mobilenetv2", "-s", "finetune", "--weights", "none", "--input-size", "32",
                     "--unfreeze", "10", "--epochs", "2", "--finetune-epochs", "1", "--name", "ft", "--runs-dir", tmp_path)
    assert result.code == 0, result.err
    record = RunRecord.load(tmp_path / "ft" / "record.json")
    assert record.training.caches["finetune"]["used"] is True
    assert sorted(p.name for p in (tmp_path / "ft" / "tensorboard").iterdir()) == ["finetune", "head"]
    _assert_events_match_history(tmp_path / "ft")


def test_killed_and_resumed_run_logs_every_epoch_once(tlserve_bin, tmp_path):
    # Killed after epoch 1's state is saved but before its events are (the resumed run backfills them
    # from the history), then killed again mid-epoch 2 (whose events are never written), then finished.
    args = ["train", *TINY, "--epochs", "3", "--name", "k", "--runs-dir", tmp_path]
    resume = ["train", "--resume", "k", "--runs-dir", tmp_path]
    for point, argv in (("state:1", args), ("batch:2", resume)):
        killed = subprocess.run([sys.executable, str(KILL_AT), point, "--", *map(str, argv)], capture_output=True,
                                text=True, timeout=300)
        assert killed.returncode == -9, killed.stderr[-2000:]
        if point == "batch:2":
            assert "tensorboard: wrote the epochs" in killed.stdout
    resumed = subprocess.run([str(tlserve_bin), *map(str, resume)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(RunRecord.load(tmp_path / "k" / "record.json").history) == 3
    _assert_events_match_history(tmp_path / "k")
