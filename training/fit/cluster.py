"""Who is who in a TF_CONFIG cluster: read without TensorFlow, so a bad TF_CONFIG is one line before
anything heavy loads.

MultiWorkerMirroredStrategy takes its cluster from TF_CONFIG (what a Kubeflow TFJob sets on every
pod). Its chief is the `chief` task when the cluster names one, else worker 0: the task that writes
`runs/<name>/`. Every other worker writes its copies to a temporary folder that is removed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.base.errors import UserError

TASK_TYPES = ("chief", "worker")


@dataclass(frozen=True)
class Cluster:
    spec: dict[str, list[str]]
    task_type: str
    task_index: int

    @property
    def workers(self) -> int:
        """Processes that train (chief included): MultiWorkerMirroredStrategy's num_workers."""
        return sum(len(self.spec.get(kind, [])) for kind in TASK_TYPES)

    @property
    def is_chief(self) -> bool:
        if "chief" in self.spec:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.task_index == 0

    @property
    def task(self) -> str:
        return f"{self.task_type}:{self.task_index}"

    def facts(self) -> dict[str, Any]:
        return {"workers": self.workers, "task": self.task, "chief": self.is_chief,
                "cluster": {kind: list(self.spec[kind]) for kind in TASK_TYPES if kind in self.spec}}


def parse(tf_config: str | None) -> Cluster | None:
    """The cluster TF_CONFIG describes, or None when it is unset or empty; a UserError naming what is wrong."""
    if not tf_config or not tf_config.strip():
        return None
    try:
        config = json.loads(tf_config)
    except ValueError as exc:
        raise UserError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(config, dict):
        raise UserError("TF_CONFIG must be a JSON object with \"cluster\" and \"task\"")
    spec = config.get("cluster")
    if not isinstance(spec, dict) or not spec:
        raise UserError("TF_CONFIG has no \"cluster\": give {\"cluster\": {\"worker\": [\"host:port\", ...]}, \"task\": {...}}")
    for kind, addresses in spec.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and a for a in addresses):
            raise UserError(f"TF_CONFIG cluster.{kind} must be a list of \"host:port\" strings")
    if not any(spec.get(kind) for kind in TASK_TYPES):
        raise UserError(f"TF_CONFIG's cluster names no chief or worker (it has: {', '.join(sorted(spec)) or 'nothing'}); "
                        "MultiWorkerMirroredStrategy trains on \"chief\" and \"worker\" tasks")
    if len(spec.get("chief", [])) > 1:
        raise UserError(f"TF_CONFIG names {len(spec['chief'])} chiefs; a cluster has at most one")
    extra = sorted(set(spec) - set(TASK_TYPES) - {"evaluator"})
    if extra:
        raise UserError(f"TF_CONFIG cluster has {', '.join(extra)}: MultiWorkerMirroredStrategy takes only chief and worker tasks")
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise UserError("TF_CONFIG has no \"task\": give {\"task\": {\"type\": \"worker\", \"index\": 0}} (this process's place)")
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in TASK_TYPES:
        raise UserError(f"TF_CONFIG task type '{kind}' does not train here; use one of {', '.join(TASK_TYPES)}")
    if kind not in spec:
        raise UserError(f"TF_CONFIG task type '{kind}' is not in the cluster (it has: {', '.join(sorted(spec))})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(spec[kind]):
        raise UserError(f"TF_CONFIG task index {index!r} is outside the cluster: '{kind}' has "
                        f"{len(spec[kind])} task(s), index 0 to {len(spec[kind]) - 1}")
    return Cluster({k: list(v) for k, v in spec.items()}, kind, index)


def from_env(distribute: str, tf_config: str | None) -> Cluster | None:
    """The cluster this run trains in: TF_CONFIG with two or more training tasks, unless --distribute
    says otherwise (`none` and `mirrored` ignore TF_CONFIG, as accel.choose_distribution does)."""
    if distribute != "auto":
        return None
    found = parse(tf_config)
    return found if found is not None and found.workers > 1 else None


def worker_path(name: str, task_type: str, task_index: int, runs_dir: Path) -> Path:
    """Where a non-chief works: named for the run, the task and the runs folder, so a worker started
    again after a kill (which could not clean up) finds what its predecessor left."""
    where = hashlib.sha1(str(runs_dir.resolve()).encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / f"tlserve-{name}-{task_type}{task_index}-{where}"


def worker_folder(name: str, cluster: Cluster, runs_dir: Path) -> Path:
    """A non-chief's temporary folder (worker_path), emptied of what a killed predecessor left."""
    folder = worker_path(name, cluster.task_type, cluster.task_index, runs_dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
