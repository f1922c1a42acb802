"""80 columns, output piped (as a user's `| less` or a log): every row can be told apart and every name
and number is whole (issue 29, item 6)."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

NARROW = {"COLUMNS": "80"}
LONG_NAME = "mnv2-frozen-leaf-disease-s1"  # longer than the old table gave a name (8 columns)


def _tlserve(tlserve_bin: Path, *args: str | Path) -> str:
    """`tlserve ARGS` with stdout a pipe and COLUMNS=80; its stdout."""
    out = subprocess.run([str(tlserve_bin), *map(str, args)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **NARROW})
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _whole(number: str, line: str) -> bool:
    """`number` stands in `line` as a whole number, not as the start or end of a longer or cut one."""
    return re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", line) is not None


def _line_of(name: str, text: str) -> str:
    """The one table row that begins with `name`, whole, and fits in 80 columns."""
    lines = [line for line in text.splitlines() if re.match(rf"{re.escape(name)}(?![\w./-])", line.strip())]
    assert len(lines) == 1 and len(lines[0]) <= 80, f"{name!r} does not begin exactly one row:\n{text}"
    return lines[0]


@pytest.fixture(scope="module")
def narrow_runs(cnn_run, tmp_path_factory) -> Path:
    """Two finished runs, one with a long name, copied from the shared CNN run."""
    runs = tmp_path_factory.mktemp("narrow-runs")
    for name in ("cnn-cherry", LONG_NAME):
        shutil.copytree(cnn_run, runs / name)
        record = json.loads((runs / name / "record.json").read_text())
        (runs / name / "record.json").write_text(json.dumps({**record, "name": name}))
    return runs


def _check_run_rows(text: str, runs: Path) -> None:
    from training.record.records import RunRecord

    for name in ("cnn-cherry", LONG_NAME):
        record = RunRecord.load(runs / name / "record.json")
        row = _line_of(name, text)
        for number in (f"{record.test.accuracy:.4f}", f"{record.test.macro_f1:.4f}", f"{record.avg_epoch_time_sec:.1f}"):
            assert _whole(number, row), (number, row)


def test_runs_table_at_80_columns(narrow_runs, tlserve_bin):
    _check_run_rows(_tlserve(tlserve_bin, "runs", "--runs-dir", narrow_runs), narrow_runs)


def test_compare_table_at_80_columns(narrow_runs, tlserve_bin, tmp_path):
    text = _tlserve(tlserve_bin, "compare", "--runs-dir", narrow_runs, "--models-dir", tmp_path / "no-models",
                    "--out", tmp_path / "report")
    _check_run_rows(text.split("\n- ")[0], narrow_runs)  # the table, before the answers


def test_export_table_at_80_columns(cnn_model):
    from serving.base.manifest import Manifest
    from training.console import tables

    buf = io.StringIO()
    manifest = Manifest.load(cnn_model)
    tables.print_export(Console(file=buf, width=80), cnn_model, manifest)
    text = buf.getvalue()
    for file, facts in manifest.artifacts.items():
        row = _line_of(file, text)
        assert _whole(f"{facts.bytes / 1e6:.2f}", row) and f"{facts.max_abs_diff:.2e}" in row, row


def test_predict_folder_rows_can_be_told_apart(cnn_model, tlserve_bin, tmp_path):
    """Files deep in a folder, with one long shared prefix: each row names its own file, whole."""
    from training.data.sources import make_synthetic

    folder = tmp_path / "a-rather-long-user-folder" / "inputs" / "mildew_data_augmented_copy"
    x, _, _ = make_synthetic(4, seed=8)
    names = []
    for i, image in enumerate(x):
        name = f"{'healthy' if i % 2 else 'mildew'}/mildew_data_leaf_photo_{i:03d}.png"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name)
        names.append(name)
    text = _tlserve(tlserve_bin, "predict", cnn_model, folder, "--top-k", "2")
    rows = [_line_of(name, text) for name in names]
    assert len(set(rows)) == len(rows)
    for row in rows:
        prediction = row.split(name_end := ".png", 1)[1].rsplit(None, 1)[0]  # the OOD score's column is last
        assert len(re.findall(r"(?<![\d.])[01]\.\d{3}(?![\d])", prediction)) == 2, row  # both probabilities whole
    assert str(folder) in text  # where the names are relative to


@pytest.mark.fast
def test_train_help_descriptions_have_room_at_80_columns(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli("train", "--help")
    assert result.code == 0
    lines = [line.strip("│ ").rstrip() for line in result.out.splitlines()]
    first = next(i for i, line in enumerate(lines) if line.startswith("--config"))
    start = lines[first].index("A recipe")
    block = [lines[first]] + [line for line in lines[first + 1:first + 8] if line[:start].strip() == ""]
    width = max(len(line[start:]) for line in block)
    assert width >= 40, f"--config's description gets {width} columns:\n" + "\n".join(block)
    assert max(len(line) for line in result.out.splitlines()) <= 80
