"""`--track mlflow[:URI]`: runs, studies, exports and evals logged to MLflow as well as written locally.

`mlflow` alone is a local store in $TLSERVE_HOME/mlruns (./mlruns): a SQLite database (mlruns/mlflow.db;
MLflow 3 keeps its file store in maintenance mode) with the artifacts beside it (mlruns/artifacts);
`mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db` shows it. `mlflow:URI` is any tracking
server (http://host:5000) or store URI MLflow takes. Experiment: $MLFLOW_EXPERIMENT_NAME, else "tlserve".

Every MLflow run carries the tlserve name (tag tlserve.name) and the sha256 of each model file
(tlserve.sha256.<file>). What is logged is read from the files tlserve wrote (the record, history,
plots, manifest, exported files, eval folder), after the command has written them.

An unreachable tracker: the command refuses before it starts (one line, exit 2, nothing done), since a
user who asked for tracking wants the run in the tracker; a tracker that fails after that (a server
going down mid-run) costs a warning, never the run: it stays in runs/ or models/.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from serving.base import storage
from serving.base.errors import UserError, choose
from serving.base.manifest import sha256_file
from training.record import records

TRACKERS = ("mlflow",)
DEFAULT_EXPERIMENT = "tlserve"
PROBE_TIMEOUT_SECONDS = 30  # one try: a refused connection fails at once, a slow server gets this long
_BATCH = 100  # MLflow's log_batch takes at most 100 params (and 1,000 metrics) a call


@dataclass
class Tracker:
    spec: str
    uri: str
    client: Any                   # mlflow.MlflowClient
    experiment_id: str
    study_run: str | None = None  # a tune study's parent run

    # ---- what each command logs ----------------------------------------------------------------

    def log_run(self, run: records.Run, parent: str | None = None) -> str:
        """A finished training run: its config, per-epoch metrics, test figures, record, history and plots."""
        rec = run.record
        model = run.path / records.MODEL
        tags = {"tlserve.kind": "train", "tlserve.backbone": rec.model.backbone, "tlserve.strategy": rec.model.strategy,
                **({f"tlserve.sha256.{records.MODEL}": sha256_file(model)} if model.is_file() else {})}
        run_id = self._start(rec.name, tags, parent)
        metrics: list[tuple[str, float, int]] = []
        for row in rec.history:
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"):
                if row.get(key) is not None:
                    metrics.append((key if key != "seconds" else "epoch_seconds", float(row[key]), int(row["epoch"])))
        summary = {"test_accuracy": rec.test.accuracy, "test_loss": rec.test.loss, "test_macro_f1": rec.test.macro_f1,
                   "total_time_sec": rec.total_time_sec, "avg_epoch_time_sec": rec.avg_epoch_time_sec,
                   "epochs": rec.epochs}
        metrics += [(k, float(v), 0) for k, v in summary.items() if v is not None]
        self._log(run_id, flatten(rec.config), metrics)
        for name in sorted(p.name for p in run.path.iterdir() if p.suffix in (".json", ".csv", ".png")):
            self.client.log_artifact(run_id, str(run.path / name))
        self.client.set_terminated(run_id)
        return run_id

    def log_export(self, folder: Path, manifest) -> str:
        """An export: its options and checks, the sha256 of every file, and the exported files themselves."""
        tags = {"tlserve.kind": "export", "tlserve.run": manifest.run,
                **{f"tlserve.sha256.{name}": a.sha256 for name, a in manifest.artifacts.items() if a.sha256}}
        run_id = self._start(manifest.name, tags, None)
        params = {"run": manifest.run, "backbone": manifest.backbone, "strategy": manifest.strategy,
                  "tta": manifest.tta, **flatten(manifest.to_dict().get("export") or {}, "export")}
        metrics = [("test_accuracy", float(manifest.test_accuracy), 0)]
        for name, a in manifest.artifacts.items():
            for key in ("max_abs_diff", "top1_agreement", "test_accuracy", "accuracy_delta"):
                value = getattr(a, key)
                if value is not None:
                    metrics.append((f"{name}.{key}", float(value), 0))
        self._log(run_id, {k: v for k, v in params.items() if not k.endswith(".extra")}, metrics)
        self.client.log_artifact(run_id, str(Path(folder) / "manifest.json"))
        for name, a in manifest.artifacts.items():
            path = Path(folder) / name
            if path.is_dir():
                self.client.log_artifacts(run_id, str(path), artifact_path=name)
            elif path.is_file():
                self.client.log_artifact(run_id, str(path))
        self.client.set_terminated(run_id)
        return run_id

    def log_eval(self, result: dict[str, Any], manifest) -> str:
        """An eval: its data and figures per variant, and its folder (metrics.json, page, plots)."""
        tags = {"tlserve.kind": "eval", "tlserve.model": manifest.name,
                **{f"tlserve.sha256.{name}": a.sha256 for name, a in manifest.artifacts.items() if a.sha256}}
        run_id = self._start(f"{manifest.name}-eval", tags, None)
        params = {"model": manifest.name, "runtime": result["runtime"], **flatten(result["data"], "data")}
        metrics = [(f"{variant}.{key}", float(value), 0) for variant, row in result["variants"].items()
                   for key, value in row.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]
        self._log(run_id, params, metrics)
        if result.get("path"):
            self.client.log_artifacts(run_id, str(result["path"]))
        self.client.set_terminated(run_id)
        return run_id

    def start_study(self, name: str, config: dict[str, Any], space: str, trials: int) -> None:
        self.study_run = self._start(name, {"tlserve.kind": "tune"}, None)
        self._log(self.study_run, {**flatten(config), "space": space, "trials": trials}, [])

    def log_trial(self, row, intermediate: dict[int, float]) -> None:
        """One finished trial as a child of the study's run: its values and its validation curve."""
        run_id = self._start(f"trial-{row.number}", {"tlserve.kind": "trial", "tlserve.state": row.state},
                             self.study_run)
        metrics = [("val_accuracy", float(v), int(step) + 1) for step, v in sorted(intermediate.items())]
        if row.val_accuracy is not None:
            metrics.append(("final_val_accuracy", float(row.val_accuracy), 0))
        self._log(run_id, row.params, metrics)
        self.client.set_terminated(run_id, status="FINISHED" if row.state != "fail" else "FAILED")

    def log_study(self, result) -> None:
        """The study's outcome on its run: the best trial, the recipe, and the best and default runs as children."""
        metrics = [("best_val_accuracy", float(result.best.val_accuracy), 0)]
        for label, run in (("best", result.best_run), ("default", result.default_run)):
            if run is not None:
                self.log_run(run, parent=self.study_run)
                metrics.append((f"{label}_test_accuracy", float(run.record.test.accuracy), 0))
        self._log(self.study_run, {f"best.{k}": v for k, v in result.best.params.items()}, metrics)
        for path in sorted(result.folder.iterdir()):
            if path.suffix in (".yaml", ".csv", ".json"):
                self.client.log_artifact(self.study_run, str(path))
        self.client.set_terminated(self.study_run)

    def safely(self, log_it: Callable[[], Any], *, what: str, log: Callable[[str], None]) -> None:
        """Log after the work is saved: a tracker that fails now costs a warning, not the work."""
        try:
            log_it()
        except Exception as exc:  # noqa: BLE001 (MLflow's and the network's errors alike)
            log(f"warning: could not log {what} to MLflow at {self.uri}: {_first_line(exc)}")

    # ---- MLflow ---------------------------------------------------------------------------------

    def _start(self, name: str, tags: dict[str, str], parent: str | None) -> str:
        tags = {"tlserve.name": name, **tags, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def _log(self, run_id: str, params: dict[str, Any], metrics: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric, Param  # noqa: PLC0415

        now = int(time.time() * 1000)
        items = [Param(k, _text(v)) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, params=items[i:i + _BATCH])
        values = [Metric(k, v, now, step) for k, v, step in metrics]
        for i in range(0, len(values), 10 * _BATCH):
            self.client.log_batch(run_id, metrics=values[i:i + 10 * _BATCH])


def open_tracker(spec: str) -> Tracker:
    """The tracker `--track` names, reached now: an unknown name, a missing MLflow or an unreachable
    store is one line before the command does anything."""
    kind, _, target = spec.partition(":")
    choose("--track", kind, TRACKERS)
    try:
        from mlflow import MlflowClient  # noqa: PLC0415
    except ImportError:
        raise UserError("--track mlflow needs MLflow: pip install 'tlserve[track]'") from None
    uri, artifacts = _store(target)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        with _quick_requests():
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else \
                client.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:  # noqa: BLE001 (connection refused, bad URI, unreadable store: all the user's to fix)
        raise UserError(f"--track {spec}: cannot reach MLflow at {uri} ({_first_line(exc)}); nothing was run") from None
    return Tracker(spec, uri, client, experiment_id)


def _store(target: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment) of `--track mlflow[:TARGET]`: a URI as given;
    nothing or a folder: the SQLite store in it (default $TLSERVE_HOME/mlruns), artifacts beside."""
    if "://" in target or target.startswith(("sqlite:", "file:", "databricks")):
        return target, None
    folder = (Path(target) if target else storage.home() / "mlruns").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


@contextlib.contextmanager
def _quick_requests() -> Iterator[None]:
    """The reachability check makes one try: MLflow otherwise retries a dead server for minutes."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(PROBE_TIMEOUT_SECONDS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'data': {'spec': x}} as {'data.spec': x}: MLflow's params are flat."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def _text(value: Any) -> str:
    return "" if value is None else str(value)[:6000]  # MLflow's limit on a param's value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
