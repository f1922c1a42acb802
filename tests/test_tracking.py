"""`--track mlflow[:URI]`: a run in the local store, then export, eval and a tune study on a real
`mlflow server` on 127.0.0.1, each read back through MLflow's own client; an unreachable tracker refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, stop_group

TINY = ["--data", "synthetic", "--limit", "100", "--cnn-layers", "c8,p,f,d16", "--epochs", "2", "--data-check", "off",
        "--no-calibrate"]
SERVER_BOUND = 180  # seconds for `mlflow server` to answer (a few on a quiet machine)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracked")


@pytest.fixture(scope="module")
def local_run(home):
    """A run trained with --track mlflow: the local store in $TLSERVE_HOME/mlruns."""
    import cli

    os.environ["TLSERVE_HOME"], before = str(home), os.environ["TLSERVE_HOME"]
    try:
        cli.main(["train", *TINY, "--name", "tracked", "--track", "mlflow"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    finally:
        os.environ["TLSERVE_HOME"] = before
    return home


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(client, kind: str):
    experiment = client.get_experiment_by_name("tlserve")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`tlserve.kind` = '{kind}'")


def test_train_run_in_local_store(local_run):
    from serving.base.manifest import sha256_file

    home = local_run
    client = _client(f"sqlite:///{home / 'mlruns' / 'mlflow.db'}")
    [run] = _runs(client, "train")
    record = json.loads((home / "runs" / "tracked" / "record.json").read_text())
    assert run.info.run_name == "tracked" and run.data.tags["tlserve.name"] == "tracked"
    assert run.data.tags["tlserve.sha256.model.keras"] == sha256_file(home / "runs" / "tracked" / "model.keras")
    assert run.data.params["lr"] == "0.001" and run.data.params["data.spec"] == "synthetic"
    curve = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(r["epoch"], r["val_accuracy"]) for r in record["history"]]
    assert run.data.metrics["test_accuracy"] == record["test"]["accuracy"]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"record.json", "history.csv", "curves.png"}
    local = client.download_artifacts(run.info.run_id, "record.json")
    assert json.loads(Path(local).read_text()) == record


@pytest.fixture(scope="module")
def server(local_run, tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 and a free port (its own store; artifacts served through it)."""
    import httpx

    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    exe = str(Path(sys.executable).with_name("mlflow"))
    # The local store's database is already at MLflow's schema, so the server starts without migrating.
    db = folder / "server.db"
    db.write_bytes((local_run / "mlruns" / "mlflow.db").read_bytes())
    log = open(folder / "server.log", "w")
    proc = subprocess.Popen([exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{db}", "--artifacts-destination", str(folder / "art")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_BOUND
        while time.monotonic() < deadline:
            assert proc.poll() is None, (folder / "server.log").read_text()[-3000:]
            try:
                # Ready when its REST API answers (its /health answers earlier, before the store is open).
                if httpx.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                             timeout=30).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server not ready in {SERVER_BOUND}s")
        yield url
    finally:
        stop_group(proc, grace=10)


def test_export_eval_and_tune_on_a_tracking_server(run_cli, local_run, server, tmp_path):
    home, track = local_run, f"mlflow:{server}"
    runs, models = home / "runs", tmp_path / "models"
    exported = run_cli("export", "tracked", "--formats", "onnx", "--no-register", "--runs-dir", runs,
                       "--models-dir", models, "--track", track)
    assert exported.code == 0, exported.err
    evaluated = run_cli("eval", str(models / "tracked"), "--data", "synthetic", "--no-gradcam", "--track", track)
    assert evaluated.code == 0, evaluated.err
    tuned = run_cli("tune", *TINY, "--space", "lr=1e-3..1e-2:log", "--trials", "2", "--no-final", "--study", "tracked",
                    "--out", tmp_path / "study", "--runs-dir", runs, "--track", track)
    assert tuned.code == 0, tuned.err

    client = _client(server)
    manifest = json.loads((models / "tracked" / "manifest.json").read_text())
    [export] = _runs(client, "export")
    assert export.data.tags["tlserve.name"] == "tracked" and export.data.tags["tlserve.run"] == "tracked"
    assert export.data.tags["tlserve.sha256.model.onnx"] == manifest["artifacts"]["model.onnx"]["sha256"]
    assert {a.path for a in client.list_artifacts(export.info.run_id)} >= {"manifest.json", "model.onnx"}
    [ev] = _runs(client, "eval")
    metrics = json.loads(next((models / "tracked" / "eval").rglob("metrics.json")).read_text())
    assert ev.data.metrics["fp32.accuracy"] == metrics["variants"]["fp32"]["accuracy"]
    assert ev.data.tags["tlserve.sha256.model.onnx"] == manifest["artifacts"]["model.onnx"]["sha256"]
    [study] = _runs(client, "tune")
    trials = _runs(client, "trial")
    assert study.data.tags["tlserve.name"] == "tracked" and study.data.params["space"] == "lr=0.001..0.01:log"
    assert len(trials) == 2 and all(t.data.tags["mlflow.parentRunId"] == study.info.run_id for t in trials)
    assert all(client.get_metric_history(t.info.run_id, "val_accuracy") for t in trials)
    assert "best.yaml" in {a.path for a in client.list_artifacts(study.info.run_id)}


def test_unreachable_tracker_is_refused_before_anything_runs(run_cli, tmp_path):
    t0 = time.monotonic()
    result = run_cli("train", *TINY, "--name", "never", "--runs-dir", tmp_path, "--track",
                     f"mlflow:http://127.0.0.1:{free_port()}")
    assert result.code == 2 and "cannot reach MLflow at http://127.0.0.1:" in result.err and "nothing was run" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())
    assert time.monotonic() - t0 < 60  # no minutes of retries
    other = run_cli("train", *TINY, "--runs-dir", tmp_path, "--track", "wandb")
    assert other.code == 2 and "unknown --track 'wandb'" in other.err
