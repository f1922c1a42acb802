"""Two `tlserve train` processes on 127.0.0.1 training one run with MultiWorkerMirroredStrategy, as a
user starts them (TF_CONFIG, the console script): only the chief writes runs/<name>, the result
matches a one-worker run at the same global batch, and a worker killed mid-epoch loses nothing but
the epoch it was in. Bad TF_CONFIGs are one line and exit 2 before TensorFlow loads."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, free_port
from training.fit.cluster import worker_path
from training.record.records import RunRecord

KILL_AT = ROOT / "tests" / "kill_at.py"
TIMEOUT = 240  # per group of processes; the whole file stays well under that on an idle 2-core machine
# The tiny run both tests train: 200 images, 3 epochs, global batch 32 (16 per worker).
RUN = ["--data", "synthetic", "-b", "cnn", "--limit", "200", "--epochs", "3", "--seed", "1", "--patience", "0"]
PER_WORKER_BATCH = 16
# Measured on this config (2026-12-02, 2-core EPYC): test accuracy 0.4000 for both, per-epoch losses
# equal to 4 decimals, largest per-layer |w2 - w1| / |w1| 0.0041 (float summation order differs
# between one batch of 32 and two all-reduced halves). The bounds leave about 4x room.
# On the generated set as it is since 2026-12-05 (tilted, stretched, ramped shapes): kernels within 0.0072,
# biases (small vectors, so a small change is a large share) within 0.0525.
ACCURACY_TOLERANCE = 0.02  # 4 of the 200 test images
WEIGHT_TOLERANCE = 0.02    # relative, per kernel
BIAS_TOLERANCE = 0.15      # relative, per bias vector


def _tf_configs() -> list[str]:
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]


def _env(tf_config: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = tf_config
    return env


def _start(cmd: list[str], tf_config: str | None, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_env(tf_config), cwd=log.parent,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait(procs: list[subprocess.Popen], logs: list[Path], timeout: float = TIMEOUT) -> list[int]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail("workers did not finish in time:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
    return [proc.returncode for proc in procs]


def _tlserve() -> str:
    return str(Path(sys.executable).with_name("tlserve"))


def _record(run: Path) -> RunRecord:
    return RunRecord.load(run / "record.json")


def _weights(run: Path) -> list[np.ndarray]:
    from training.model.build import load_model

    return load_model(run / "model.keras").get_weights()


def _worker_leftovers(name: str, runs: Path) -> list[Path]:
    """Worker 1's temporary folder for this runs folder, if it is still there (other folders in /tmp
    belong to other test sessions)."""
    folder = worker_path(name, "worker", 1, runs)
    return [folder] if folder.exists() else []


def test_two_workers_write_one_run_that_matches_one_worker(tmp_path):
    runs = tmp_path / "runs"
    configs = _tf_configs()
    args = ["train", *RUN, "--batch-size", str(PER_WORKER_BATCH), "--runs-dir", str(runs)]
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log", tmp_path / "one.log"]
    procs: list[subprocess.Popen] = []
    try:
        procs = [_start([_tlserve(), *args, "--name", "two"], configs[0], logs[0]),
                 _start([_tlserve(), *args, "--name", "two"], configs[1], logs[1]),
                 # The one-worker reference: the same global batch in one process.
                 _start([_tlserve(), "train", *RUN, "--batch-size", str(2 * PER_WORKER_BATCH), "--runs-dir",
                         str(runs), "--name", "one"], None, logs[2])]
        codes = _wait(procs, logs)
    finally:
        _stop(procs)
    assert codes == [0, 0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    # Only the chief's run and the reference: worker 1 wrote nothing under runs/ and cleaned its folder.
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    assert not _worker_leftovers("two", runs)
    record, reference = _record(runs / "two"), _record(runs / "one")
    cluster = record.training.cluster
    assert cluster["workers"] == 2 and cluster["task"] == "worker:0" and cluster["chief"] is True
    assert cluster["cluster"]["worker"] == json.loads(configs[0])["cluster"]["worker"]
    assert cluster["global_batch_size"] == 2 * PER_WORKER_BATCH == record.training.global_batch_size
    assert cluster["per_replica_batch_size"] == PER_WORKER_BATCH and cluster["replicas"] == 2
    assert record.environment.distribution == "multiworker"
    assert reference.training.global_batch_size == 2 * PER_WORKER_BATCH and reference.training.cluster is None
    assert [h["epoch"] for h in record.history] == [1, 2, 3]
    # Both learned (10 classes: chance is 0.1) and to the same accuracy within the tolerance.
    assert record.test.accuracy > 0.3, record.test
    assert abs(record.test.accuracy - reference.test.accuracy) <= ACCURACY_TOLERANCE, \
        (record.test.accuracy, reference.test.accuracy)
    # The same initial weights and data order: the weights stay close, layer by layer.
    for a, b in zip(_weights(runs / "two"), _weights(runs / "one"), strict=True):
        bound = BIAS_TOLERANCE if b.ndim == 1 else WEIGHT_TOLERANCE
        assert np.linalg.norm(a - b) <= bound * np.linalg.norm(b) + 1e-6, (b.shape, np.linalg.norm(a - b) / np.linalg.norm(b))


def test_a_worker_killed_mid_epoch_and_restarted_loses_no_epoch(tmp_path, run_cli):
    runs = tmp_path / "runs"
    configs = _tf_configs()
    args = ["train", *RUN, "--batch-size", str(PER_WORKER_BATCH), "--runs-dir", str(runs), "--name", "lost"]
    steps = -(-200 // (2 * PER_WORKER_BATCH))  # 7 steps an epoch
    logs = [tmp_path / "worker0.log", tmp_path / "worker1.log"]
    procs: list[subprocess.Popen] = []
    try:
        # Worker 1 dies (SIGKILL) in the middle of epoch 2; the chief's collective fails without it.
        procs = [_start([_tlserve(), *args], configs[0], logs[0]),
                 _start([sys.executable, str(KILL_AT), f"batch:{steps + 3}", "--", *args], configs[1], logs[1])]
        codes = _wait(procs, logs)
        assert codes[1] == -signal.SIGKILL, logs[1].read_text()[-2000:]
        assert codes[0] == 138, logs[0].read_text()[-2000:]
        chief_says = logs[0].read_text()
        assert "lost worker:1" in chief_says and "Traceback" not in chief_says, chief_says[-2000:]
        assert not (runs / "lost").exists() and (runs / ".lost.partial" / "backup").is_dir()
        state = json.loads((runs / ".lost.partial" / "state.json").read_text())
        assert [h["epoch"] for h in state["history"]] == [1]
        # Single-process --resume cannot continue it (its epochs are in TensorFlow's backup): one line.
        refused = run_cli("train", "--resume", "lost", "--runs-dir", runs)
        assert refused.code == 2 and "start every worker again" in refused.err, refused

        # Both started again with the same command and TF_CONFIG, as a TFJob restarts its pods.
        logs = [tmp_path / "worker0-again.log", tmp_path / "worker1-again.log"]
        procs = [_start([_tlserve(), *args], configs[0], logs[0]), _start([_tlserve(), *args], configs[1], logs[1])]
        codes = _wait(procs, logs)
    finally:
        _stop(procs)
    assert codes == [0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    assert "phase train continues after epoch 1" in logs[0].read_text()
    assert sorted(p.name for p in runs.iterdir()) == ["lost"]
    assert not _worker_leftovers("lost", runs)
    record = _record(runs / "lost")
    assert [h["epoch"] for h in record.history] == [1, 2, 3]  # every epoch once
    assert record.training.cluster["restarted"] is True
    assert record.test.accuracy > 0.3
    assert not (runs / "lost" / "backup").exists()


@pytest.mark.parametrize("tf_config, says", [
    ("{not json", "TF_CONFIG is not valid JSON"),
    ('["worker"]', "must be a JSON object"),
    ('{"cluster": {"ps": ["127.0.0.1:1"]}, "task": {"type": "ps", "index": 0}}', "names no chief or worker"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker", "index": 2}}',
     "index 2 is outside the cluster"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "chief", "index": 0}}',
     "task type 'chief' is not in the cluster"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}', "TF_CONFIG has no \"task\""),
])
def test_bad_tf_config_is_one_line_before_tensorflow_loads(run_cli, monkeypatch, tmp_path, tf_config, says):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    result = run_cli("train", *RUN, "--name", "bad", "--runs-dir", tmp_path)
    assert result.code == 2, result
    assert says in result.err and "Traceback" not in result.err
    assert len(result.err.strip().splitlines()) <= 2, result.err  # one message (rich may wrap it)
    assert not any(tmp_path.iterdir())


def test_a_cluster_run_needs_a_name(run_cli, monkeypatch, tmp_path):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 1}}))
    result = run_cli("train", *RUN, "--runs-dir", tmp_path)
    assert result.code == 2 and "needs --name" in result.err


def test_cluster_roles_follow_tensorflow():
    from training.fit.cluster import parse

    workers_only = parse('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}')
    assert workers_only.is_chief and workers_only.workers == 2
    with_chief = '{"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}'
    assert not parse(with_chief).is_chief and parse(with_chief).workers == 2
    assert parse(with_chief.replace('"type": "worker"', '"type": "chief"')).is_chief
    assert parse(None) is None and parse("  ") is None
