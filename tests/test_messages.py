"""What the commands say: whole, in order, once, in a user's words (issue 29, item 8)."""
from __future__ import annotations

import builtins
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

INTERNAL = re.compile(r"seed \d{3}'s|\(seed \d{3}|the seeds'")


def _one_line_error(result) -> str:
    assert result.code == 2, (result.out, result.err)
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1, result.err
    return result.err.strip()


@pytest.fixture
def leaf_folder(tmp_path) -> Path:
    """Two classes of small generated images, as `folder:PATH` reads them."""
    from training.data.sources import make_synthetic

    x, y, names = make_synthetic(40, seed=4)
    for i, (image, label) in enumerate(zip(x, y % 2)):
        folder = tmp_path / "leaves" / ("healthy", "mildew")[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return tmp_path / "leaves"


@pytest.mark.fast
def test_help_shows_brackets_and_user_words(run_cli):
    data_check = run_cli("data", "check", "--help")
    assert data_check.code == 0 and "needs the [ann] extra" in " ".join(data_check.out.split())
    for command in (["runs", "--help"], ["train", "--help"], ["features", "--help"], ["backbones"]):
        result = run_cli(*command)
        assert result.code == 0 and not INTERNAL.search(result.out), (command, INTERNAL.search(result.out))


@pytest.mark.fast
def test_nearest_names_each_candidate_once():
    from serving.base.errors import nearest

    assert nearest("cnn-chery", ["cnn-cherry", "mnv2", "cnn-cherry"]) == "; nearest: cnn-cherry"


def test_explain_suggests_a_run_and_its_export_once(cnn_run, tmp_path, run_cli):
    runs, models = tmp_path / "runs", tmp_path / "models"
    shutil.copytree(cnn_run, runs / "cnn-cherry")
    record = json.loads((runs / "cnn-cherry" / "record.json").read_text())
    (runs / "cnn-cherry" / "record.json").write_text(json.dumps({**record, "name": "cnn-cherry"}))
    (models / "cnn-cherry").mkdir(parents=True)
    (models / "cnn-cherry" / "manifest.json").write_text("{}")  # an export of the same name
    error = _one_line_error(run_cli("explain", "cnn-chery", tmp_path, "--runs-dir", runs, "--models-dir", models))
    assert error.endswith("nearest: cnn-cherry"), error


def test_offline_cifar10_error_keeps_the_whole_reason(run_cli, monkeypatch, tmp_path):
    from training.env import keras

    reason = ("URL fetch failure on https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz: None -- "
              "[Errno -2] Name or service not known")

    def offline():
        raise Exception(reason)  # what keras.utils.get_file raises when the download fails

    monkeypatch.setattr(keras().datasets.cifar10, "load_data", offline)
    error = _one_line_error(run_cli("train", "--data", "cifar10", "--runs-dir", tmp_path))
    assert "Name or service not known" in error and "--data cifar10:PATH" in error, error


def test_an_unreadable_file_reads_the_same_in_train_and_data_check(leaf_folder, run_cli, monkeypatch, tmp_path):
    denied = sorted((leaf_folder / "mildew").iterdir())[0]
    if os.geteuid() == 0:  # root reads any file: refuse this one as the kernel would refuse a user
        real_open = builtins.open

        def open_(file, *args, **kwargs):
            if Path(str(file)) == denied:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
    else:
        denied.chmod(0)
    said = f"mildew/{denied.name}: cannot read the file (Permission denied)"
    # --class-weight naming no class stops training right after the data loads
    train = run_cli("train", "--data", f"folder:{leaf_folder}", "--class-weight", "nosuch=2", "--runs-dir", tmp_path / "runs")
    assert train.code == 2 and said in train.out, train.out
    check = run_cli("data", "check", "--data", f"folder:{leaf_folder}", "--mode", "fast", "--out", tmp_path / "check")
    assert check.code == 0 and said in check.out, check.out


def test_a_weights_file_that_is_not_one_is_refused_before_the_data_loads(leaf_folder, run_cli, tmp_path):
    leaf = sorted((leaf_folder / "healthy").iterdir())[0]
    train = run_cli("train", "--data", f"folder:{leaf_folder}", "-b", "mobilenetv2", "-s", "frozen", "--weights", leaf,
                    "--runs-dir", tmp_path / "runs")
    error = _one_line_error(train)
    assert "not a Keras weights file" in error and str(leaf) in error, error
    assert "decoding" not in train.out + train.err and "data:" not in train.out  # nothing was read first
    check = run_cli("data", "check", "--data", f"folder:{leaf_folder}", "--weights", leaf, "--out", tmp_path / "check")
    assert "not a Keras weights file" in _one_line_error(check)


def test_export_with_a_name_does_not_claim_to_rename_it(cnn_run, run_cli, tmp_path):
    models = tmp_path / "models"
    (models / "ft-kill").mkdir(parents=True)  # already there: the export stops right after choosing its name
    result = run_cli("export", cnn_run, "--name", "ft-kill", "--runs-dir", cnn_run.parent, "--models-dir", models,
                     "--no-register")
    assert "already exists" in _one_line_error(result)
    assert "model name:" not in result.out + result.err, result.out


def test_drop_leaks_says_what_it_dropped_before_what_it_means():
    from training.audit import guard
    from training.config import DataConfig, TrainConfig
    from training.data.sources import load_dataset

    cfg = TrainConfig(data=DataConfig(spec="synthetic", limit=30), data_check="fast", drop_leaks=True)
    dataset = load_dataset(cfg.data)
    dataset.train.x[:4] = dataset.test.x[:4]  # four test images copied into train
    lines: list[str] = []
    dataset, part, _ = guard.guard(dataset, cfg, lines.append)
    dropped = next(i for i, line in enumerate(lines) if "dropped" in line)
    leak = next(i for i, line in enumerate(lines) if "test image(s)" in line and "copy in train" in line)
    assert part["dropped"]["count"] >= 4 and dropped < leak, lines
    assert "will read high" not in lines[leak] and "dropped" in lines[leak], lines


def test_run_summary_formats_its_values(cnn_run):
    from training.console import tables
    from training.record.records import load_run

    buf = io.StringIO()
    run = load_run(cnn_run)
    tables.print_record(Console(file=buf, width=80), run)
    text = " ".join(buf.getvalue().split())
    assert "{" not in text and "None" not in text, text
    assert not re.search(r"\d\.\d{2,} ?s\b", text), text  # seconds to one decimal
    assert f"{run.record.total_time_sec:.1f} s" in text and f"test {run.record.data.splits['test']:,}" in text


def test_feature_extraction_shows_progress_without_a_terminal(monkeypatch, capsys, tmp_path):
    from training import progress
    from training.data.sources import Split, pipeline
    from training.env import keras
    from training.fit.feature_cache import extract

    K = keras()
    inputs = K.Input((8, 8, 3))
    extractor = K.Model(inputs, K.layers.GlobalAveragePooling2D()(K.layers.Conv2D(4, 3)(inputs)))
    rng = np.random.default_rng(0)
    splits = {name: Split(rng.integers(0, 256, (100, 8, 8, 3), dtype=np.uint8), np.zeros(100, np.int64))
              for name in ("train", "test")}
    monkeypatch.setattr(progress, "interactive", lambda: False)
    monkeypatch.setattr(progress, "EVERY_S", 0.0, raising=False)  # a line at every batch, not every few seconds
    extract(extractor, splits, pipeline, tmp_path)
    err = capsys.readouterr().err
    assert re.search(r"^extracting features: 64/200 images so far \(\d+ s\)$", err, re.M), err
    assert re.search(r"^extracting features: 200 images in [\d.]+ s$", err, re.M), err
