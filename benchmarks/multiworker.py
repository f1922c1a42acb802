"""Training images/s of one worker against two MultiWorkerMirroredStrategy workers on 127.0.0.1.

    .venv/bin/python benchmarks/multiworker.py [--limit 2000] [--epochs 3] [--batch-size 64]

Trains the cnn on CIFAR-10 (`folder:../shared/datasets/cifar10-jpg --limit N`) twice with the same
global batch: one process at --batch-size, then two `tlserve train` processes with a two-worker
TF_CONFIG at half of it each. images/s = training images x epochs / the epochs' seconds, from each
run's record, leaving out epoch 1 (graph tracing, and for two workers the first collectives).

On one machine the two workers share the same cores and talk over loopback gRPC, so the figure is
the multi-worker engine's overhead on this machine, not a speed-up: a speed-up needs workers on
separate machines (docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.base.machine import cpu_model  # noqa: E402
from training.record.records import RECORD, RunRecord  # noqa: E402

CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10-jpg"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images_per_second(record: RunRecord) -> tuple[float, int]:
    rows = record.history[1:]
    images = record.data.splits["train"] * len(rows)
    return images / sum(r["seconds"] for r in rows), images


def _run(args: list[str], tf_configs: list[str | None], workdir: Path) -> tuple[RunRecord, float]:
    tlserve = str(Path(sys.executable).with_name("tlserve"))
    procs = []
    t0 = time.perf_counter()
    for i, tf_config in enumerate(tf_configs):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("TF_CONFIG", None)
        if tf_config:
            env["TF_CONFIG"] = tf_config
        log = open(workdir / f"{args[args.index('--name') + 1]}-{i}.log", "w")
        procs.append((subprocess.Popen([tlserve, *args], stdout=log, stderr=subprocess.STDOUT, env=env), log))
    try:
        for proc, log in procs:
            if proc.wait(timeout=3600) != 0:
                raise SystemExit(f"training failed; see {log.name}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            log.close()
    wall = time.perf_counter() - t0
    runs = Path(args[args.index("--runs-dir") + 1])
    return RunRecord.load(runs / args[args.index("--name") + 1] / RECORD), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000, help="images per split")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (two workers: half each)")
    parser.add_argument("--data", default=f"folder:{CIFAR}")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="tlserve-multiworker-bench-"))
    runs = workdir / "runs"
    common = ["train", "--data", args.data, "--limit", str(args.limit), "-b", "cnn", "--epochs", str(args.epochs),
              "--patience", "0", "--seed", "0", "--runs-dir", str(runs)]

    one, one_wall = _run([*common, "--batch-size", str(args.batch_size), "--name", "one"], [None], workdir)
    cluster = {"worker": [f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}"]}
    configs = [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(2)]
    two, two_wall = _run([*common, "--batch-size", str(args.batch_size // 2), "--name", "two"], configs, workdir)

    one_rate, images = _images_per_second(one)
    two_rate, _ = _images_per_second(two)
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"data: {args.data} --limit {args.limit}: {one.data.splits['train']} training images, "
          f"global batch {one.training.global_batch_size} (two workers: "
          f"{two.training.cluster['per_replica_batch_size']} each), epochs 2-{args.epochs} timed ({images} images)")
    print(f"one worker:  {one_rate:8.1f} images/s  test accuracy {one.test.accuracy:.4f}  wall {one_wall:.0f}s")
    print(f"two workers: {two_rate:8.1f} images/s  test accuracy {two.test.accuracy:.4f}  wall {two_wall:.0f}s")
    print(f"two / one:   {two_rate / one_rate:.2f}x  (one machine: the engine's overhead, not a speed-up)")
    print(f"logs and runs: {workdir}")


if __name__ == "__main__":
    main()
