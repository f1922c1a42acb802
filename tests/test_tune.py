"""`tlserve tune`: the search space's one parser, a study to its best recipe and runs, trials on features
cached once, a study killed and resumed, and two processes on one SQLite study."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.base.errors import UserError

# A tiny CNN from scratch on generated data: a trial is a second or two, and it learns.
TINY = ["--data", "synthetic", "--limit", "120", "--cnn-layers", "c8,p,f,d16", "--data-check", "off", "--batch-size", "32",
        "--epochs", "2", "--no-calibrate"]
SPACE = "lr=1e-3..3e-2:log,epochs=1..2,dropout=0..0.3"
BOUND = 600  # seconds a tune process may take here (a few on a quiet machine; the shared one can be 20x slower)


# ---- the space ---------------------------------------------------------------------------------

@pytest.mark.fast
def test_space_parses_ranges_choices_and_types():
    from training.fit.search_space import parse

    space = parse("lr=1e-4..1e-2:log, weight-decay=0..1e-3,head=gap|gap-dense,epochs=5..40,batch_size=32|64")
    by = {p.name: p for p in space.params}
    assert by["lr"].log and by["lr"].low == 1e-4 and by["lr"].high == 1e-2 and by["lr"].kind is float
    assert by["weight_decay"].low == 0 and not by["weight_decay"].log
    assert by["head"].choices == ("gap", "gap-dense")
    assert by["epochs"].kind is int and by["epochs"].corners() == [5, 40]
    assert by["batch_size"].choices == (32, 64)
    assert parse(space.text()) == space  # the canonical text a study stores reads back the same


@pytest.mark.fast
@pytest.mark.parametrize("text, message", [
    ("lrr=1e-4..1e-2", "unknown parameter 'lrr'; nearest: lr"),
    ("lr=1e-2..1e-4", "empty range"),
    ("lr=1e-3..1e-3", "empty range"),
    ("dropout=0.5..", "not a number"),
    ("lr", "expected NAME=LOW..HIGH"),
    ("head=gap..gap-dense", "takes choices"),
    ("lr=0..1e-2:log", "above 0"),
    ("epochs=1.5..3", "not an integer"),
    ("lr=1e-3..1e-2,lr=1e-4..1e-3", "twice"),
    ("head=gap||gap-dense", "empty choice"),
    ("", "--space is empty"),
])
def test_space_mistakes_are_one_line(text, message):
    from training.fit.search_space import parse

    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("|", r"\|")):
        parse(text)


@pytest.mark.fast
@pytest.mark.parametrize("space, message", [
    ("lrr=1e-4..1e-2", "unknown parameter"),
    ("dropout=0..1.5", "--dropout must be"),     # an end a trial could draw fails train's own check
    ("head=gap|wide", "unknown --head 'wide'"),
    ("unfreeze=5..20", "apply to --strategy finetune"),
])
def test_bad_space_exits_2_and_writes_nothing(run_cli, tmp_path, space, message):
    result = run_cli("tune", "-b", "mobilenetv2", "-s", "frozen", "--weights", "none", "--space", space,
                     "--out", tmp_path / "study", "--runs-dir", tmp_path / "runs")
    assert result.code == 2
    assert message in result.err and "Traceback" not in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "study").exists() and not (tmp_path / "runs").exists()


# ---- a study --------------------------------------------------------------------------------------

def test_study_writes_best_recipe_and_runs_and_resumes(run_cli, tmp_path):
    out, runs = tmp_path / "study", tmp_path / "runs"
    args = ["tune", *TINY, "--space", SPACE, "--trials", "3", "--study", "s1", "--out", out, "--runs-dir", runs,
            "--pruner", "none"]
    first = run_cli(*args)
    assert first.code == 0, first.err
    rows = [line for line in first.out.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(rows) >= 3 and all("complete" in r for r in rows[:3])  # the table, a line per trial as it ends
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trials"] == {"complete": 3}
    best = summary["best_trial"]
    # The best recipe is a `tlserve train --config` file holding the best trial's values.
    from training.fit.recipes import read

    recipe = read(out / "best.yaml")
    assert recipe["lr"] == pytest.approx(best["params"]["lr"]) and recipe["epochs"] == best["params"]["epochs"]
    # Both configurations were trained as runs and tested once; the default is the base options' own.
    default = json.loads((runs / "s1-default" / "record.json").read_text())
    tuned = json.loads((runs / "s1-best" / "record.json").read_text())
    assert default["config"]["lr"] == 1e-3 and default["config"]["epochs"] == 2
    assert tuned["config"]["lr"] == pytest.approx(best["params"]["lr"])
    assert summary["best_run"]["test_accuracy"] == tuned["test"]["accuracy"]
    assert summary["default_run"]["test_accuracy"] == default["test"]["accuracy"]
    assert "test split, measured once after the search" in first.out
    # The same command again: the study is finished and its runs are reused, not trained again.
    again = run_cli(*args)
    assert again.code == 0 and "nothing left to search" in again.err + again.out
    assert "already trained with this configuration" in again.err + again.out
    assert json.loads((runs / "s1-best" / "record.json").read_text())["created_at"] == tuned["created_at"]
    # Another space under the same study name is refused, before any data loads.
    other = run_cli(*[("lr=1e-3..1e-2" if a == SPACE else a) for a in args])
    assert other.code == 2 and "another search space" in other.err


def test_frozen_trials_share_one_feature_extraction():
    from training.config import DataConfig, TrainConfig
    from training.data.sources import load_dataset
    from training.fit.trial import Trainer
    from training.fit.validation import resolve

    dataset = load_dataset(DataConfig(limit=60))
    trainer = Trainer(dataset, Path("/nonexistent"))
    base = TrainConfig(backbone="mobilenetv2", strategy="frozen", weights="none", input_size=32, epochs=2, batch_size=32)
    seen: list[tuple[int, float]] = []
    for dropout, head in ((0.0, "gap"), (0.3, "gap"), (0.2, "gap-dense")):
        result = trainer.fit(resolve(dataclasses.replace(base, dropout=dropout, head=head)),
                             lambda step, acc: seen.append((step, acc)))
        assert result.epochs == 2 and 0 <= result.val_accuracy <= 1
    assert list(trainer.caches) == [("head", True)]  # three trials, one extraction (pooled features)
    assert [s for s, _ in seen] == [0, 1] * 3       # every epoch reported to the pruner


# ---- processes --------------------------------------------------------------------------------

def _tune_process(tmp_path: Path, name: str, trials: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("tlserve")
    cmd = [str(exe), "tune", *TINY, "--space", SPACE, "--trials", str(trials), "--study", name,
           "--out", str(tmp_path / name), "--runs-dir", str(tmp_path / "runs"), "--no-final", "--pruner", "none"]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TLSERVE_HOME": str(tmp_path)})


def _trials(tmp_path: Path, name: str):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name / 'study.db'}").trials


def _wait(proc: subprocess.Popen, seconds: float) -> int:
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"tune process still running after {seconds}s")


def test_killed_study_resumes(tmp_path):
    log = tmp_path / "first.log"
    proc = _tune_process(tmp_path, "k", 5, log)
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline and proc.poll() is None:
        if log.read_text().count(" complete ") >= 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # no cleanup of any kind: the trial in flight stays RUNNING
    proc.wait()
    before = [t for t in _trials(tmp_path, "k") if t.state.name == "COMPLETE"]
    assert 1 <= len(before) < 5, log.read_text()[-2000:]
    resumed = _tune_process(tmp_path, "k", 5, tmp_path / "second.log")
    assert _wait(resumed, BOUND) == 0, (tmp_path / "second.log").read_text()[-2000:]
    text = (tmp_path / "second.log").read_text()
    assert f"{len(before)} of 5 trials finished, continuing" in text
    after = [t for t in _trials(tmp_path, "k") if t.state.name == "COMPLETE"]
    assert len(after) == 5
    # The trials finished before the kill are kept as they were; the resumed process added the rest.
    assert [(t.number, t.params, t.value) for t in after[:len(before)]] == [(t.number, t.params, t.value) for t in before]


def test_two_processes_share_one_sqlite_study(tmp_path):
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_tune_process(tmp_path, "p", 6, log) for log in logs]
    for proc, log in zip(procs, logs):
        assert _wait(proc, BOUND) == 0, log.read_text()[-2000:]
    finished = [t for t in _trials(tmp_path, "p") if t.state.name == "COMPLETE"]
    assert 6 <= len(finished) <= 7  # two processes starting the last trial together may both run it
    assert len({t.number for t in finished}) == len(finished)
    mine = [sum(1 for line in log.read_text().splitlines() if " complete " in line) for log in logs]
    assert all(n >= 1 for n in mine) and sum(mine) == len(finished)  # both worked on the one study
    # Each process proposed its own trials (the joining one draws its own sampler seed).
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == len(finished)
