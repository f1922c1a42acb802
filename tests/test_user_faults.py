"""What a new user hit in a first session: a benchmark with nothing to measure, exports killed
half-way, names that escape the models folder, tables cut at 80 columns, a folder that is a file,
a frozen backbone with random weights, and a parity check that could not tell anything."""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from training.record.records import RunRecord

from conftest import cli_call


def _one_error_line(result) -> str:
    lines = [line for line in result.err.strip().splitlines() if line.strip()]
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err
    return " ".join(lines)


def test_bench_with_nothing_to_measure_names_the_export_and_stores_nothing(cnn_run, runs_root, tmp_path, run_cli):
    models = tmp_path / "models"
    cli_call("export", "cnn", "--name", "sm-only", "--formats", "savedmodel", "--no-register",
             "--runs-dir", runs_root, "--models-dir", models)
    for runtimes in ("onnx", "onnx,onnx-int8"):
        result = run_cli("bench", "sm-only", "--runtimes", runtimes, "--iterations", "2", "--models-dir", models)
        message = _one_error_line(result)
        assert "nothing to measure" in message
        assert "tlserve export cnn --name sm-only --formats savedmodel,onnx" in message, message
        assert "--fp32" not in message
    assert not (models / "sm-only" / "bench").exists()
    # something measurable beside something missing: measured, the missing one named, stored
    result = run_cli("bench", "sm-only", "--runtimes", "savedmodel,onnx-int8", "--iterations", "2",
                     "--batch-sizes", "1", "--models-dir", models)
    assert result.code == 0, result.err
    assert "skipped onnx-int8" in result.out and "--int8" in result.out
    stored = list((models / "sm-only" / "bench").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["results"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_killed_export_leaves_nothing_that_later_commands_keep(tlserve_bin, cnn_run, runs_root, tmp_path, run_cli):
    models = tmp_path / "models"
    args = [str(tlserve_bin), "export", "cnn", "--name", "killed", "--int8", "--no-register",
            "--runs-dir", str(runs_root), "--models-dir", str(models)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(models.glob(".killed.*.partial")):
            assert proc.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline, "no staging folder appeared"
            time.sleep(0.02)
        time.sleep(0.3)  # let it write something into the folder
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert list(models.glob(".killed.*.partial")) and not (models / "killed").exists()
    # an unrelated export's staging of a process still alive (this one) is never touched
    alive = models / f".other.{os.getpid()}-abcdefgh.partial"
    alive.mkdir()
    dead = models / f".other.{_dead_pid()}-zyxwvuts.partial"
    dead.mkdir()
    result = run_cli("models", "--models-dir", models)
    assert "removed .killed." in result.err and "removed .other." in result.err, result.err
    assert not list(models.glob(".killed.*.partial")) and not dead.exists() and alive.exists()
    # an export of the same name cleans its own leftovers too
    leftover = models / f".killed.{_dead_pid()}-abcdefgh.partial"
    leftover.mkdir()
    cli_call("export", "cnn", "--name", "killed", "--no-register", "--runs-dir", runs_root, "--models-dir", models)
    assert not leftover.exists() and (models / "killed" / "manifest.json").is_file()
    # model folders are created like run folders: by the umask, not 0700
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((models / "killed").stat().st_mode) == 0o777 & ~umask


def test_interrupted_runs_are_listed_and_empty_partials_are_not_kept(cnn_run, runs_root, tmp_path, run_cli):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / ".paused.partial").mkdir()
    (runs / ".paused.partial" / "config.json").write_text("{}")
    (runs / ".paused.partial" / "state.json").write_text(json.dumps({"history": [{}, {}]}))
    result = run_cli("runs", "--runs-dir", runs)
    assert result.code == 0, result.err
    assert "interrupted after 2 epoch(s): paused" in result.out and "--resume paused" in result.out
    assert (runs / ".paused.partial").is_dir()  # an interrupted run is the user's work: never removed


@pytest.mark.parametrize("name", ["bad/name", "../escape", "UPPER case"])
def test_export_refuses_a_name_it_would_have_to_change(cnn_run, runs_root, tmp_path, run_cli, name):
    models = tmp_path / "models"
    result = run_cli("export", "cnn", "--name", name, "--no-register", "--runs-dir", runs_root, "--models-dir", models)
    message = _one_error_line(result)
    assert f"--name '{name}'" in message and "e.g." in message
    assert not models.exists() or not any(models.iterdir())
    assert not (tmp_path / "escape").exists()


def test_tables_show_every_name_and_number_at_80_columns(cnn_run, runs_root, tmp_path, run_cli, monkeypatch):
    import cli

    long_name = "cnn-scratch-leaf-disease-second-set-20261202-151418-seed-3"
    runs = tmp_path / "runs"
    cli_call("train", "--data", "synthetic", "-b", "cnn", "--cnn-layers", "c8,p,f", "--epochs", "1", "--limit", "40",
             "--name", long_name, "--runs-dir", runs)
    monkeypatch.setattr(cli, "console", cli.Console(width=80, force_terminal=False))
    result = run_cli("runs", "--runs-dir", runs)
    assert result.code == 0
    lines = result.out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.out
    joined = "".join(line.split()[0] if line.split() else "" for line in lines)
    assert long_name in joined, result.out
    record = RunRecord.load(runs / long_name / "record.json")
    flat = result.out.replace("\n", " ")
    assert f"{record.test.accuracy:.4f}" in flat  # the name's figures stay; other columns may be left out, and said so
    left_out = flat.split("(not shown at 80 columns:")[1] if "(not shown at 80 columns:" in flat else ""
    for value, column in ((f"{record.model.trainable_params:,}", "trainable params"), ("to target", "epochs to target")):
        assert value in flat or column in left_out, value


@pytest.mark.fast
def test_data_folder_that_is_a_file_or_has_a_validation_split(tmp_path, run_cli):
    afile = tmp_path / "leaves.zip"
    afile.write_bytes(b"PK")
    result = run_cli("train", "--data", f"folder:{afile}", "--epochs", "1")
    assert "is a file" in _one_error_line(result)

    from training.config import DataConfig
    from training.data.sources import load_dataset

    rng = np.random.default_rng(0)
    root = tmp_path / "leafset"
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        for cls in ("healthy", "rust"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = load_dataset(DataConfig(spec=f"folder:{root}"))
    assert (len(data.train), len(data.val), len(data.test)) == (12, 4, 4)
    assert "train/validation/test" in data.source
    # train/ and valid/ only (a common download layout): valid/ is the held-out test split
    (root / "test").rename(tmp_path / "gone")
    (root / "validation").rename(root / "valid")
    data = load_dataset(DataConfig(spec=f"folder:{root}"))
    assert len(data.test) == 4 and len(data.train) + len(data.val) == 12
    assert "valid/ is the test split" in data.source


def test_frozen_backbone_with_random_weights_is_warned_about(tmp_path, run_cli):
    result = run_cli("train", "--data", "synthetic", "-b", "mobilenetv2", "-s", "frozen", "--weights", "none",
                     "--input-size", "32", "--epochs", "1", "--limit", "40", "--runs-dir", tmp_path)
    assert result.code == 0, result.err
    warned = [line for line in result.out.splitlines() if "--weights none" in line and "random" in line]
    assert len(warned) == 1, result.out


def test_a_parity_check_that_cannot_tell_anything_says_so():
    from training.exported.export import _Check

    x = np.zeros((4, 8, 8, 3), np.float32)
    constant = _Check(x, np.tile([[0.1] * 10], (4, 1)), x, np.zeros(4), x)
    varied = _Check(x, np.eye(4, 10) * 0.5 + 0.05, x, np.zeros(4), x)
    assert not constant.informative and varied.informative


@pytest.mark.fast
def test_library_warnings_are_held_back_unless_debugging(monkeypatch, caplog):
    from training.env import quiet_library_logging

    monkeypatch.delenv("TLSERVE_DEBUG", raising=False)
    with quiet_library_logging():
        logging.warning("Axis 1 is out-of-range for weight")
    assert "out-of-range" not in caplog.text
    monkeypatch.setenv("TLSERVE_DEBUG", "1")
    with quiet_library_logging():
        logging.warning("Axis 1 is out-of-range for weight")
    assert "out-of-range" in caplog.text
