"""tlserve's BentoML service against a minimal peer server, same model, same uploads, same run, 127.0.0.1 only.

    .venv/bin/python benchmarks/http_overhead.py MODEL_DIR [--concurrency 1,8,32] [--requests 300]

Prints p50/p99 latency and requests/s per concurrency for both servers, with the in-process
onnxruntime p50 (batch 1) as the floor. Both servers are started and stopped by this script.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.bench import bench_http, sample_uploads  # noqa: E402
from serving.manifest import load_manifest  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str], url: str, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    stop(proc)
    raise SystemExit(f"server at {url} did not start")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    levels = tuple(int(c) for c in args.concurrency.split(","))
    manifest = load_manifest(args.model_dir)
    hw = (manifest["input"]["shape"][1], manifest["input"]["shape"][2])
    uploads = sample_uploads(hw, 16)
    bin_dir = Path(sys.executable).parent
    results = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([str(bin_dir / "bentoml"), "serve", "serving.service:ImageClassifier", "--host", "127.0.0.1",
                  "--port", str(port)], {"TLSERVE_MODEL": str(args.model_dir.resolve())}, url, "/readyz")
    try:
        results["tlserve"] = bench_http(url, concurrency=levels, requests=args.requests, uploads=uploads,
                                        model_dir=args.model_dir, log=lambda s: print("tlserve", s))
    finally:
        stop(proc)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, str(ROOT / "benchmarks" / "peer_server.py"), str(args.model_dir), str(port)], {}, url,
                 "/metadata")
    try:
        results["peer"] = bench_http(url, concurrency=levels, requests=args.requests, uploads=uploads,
                                     log=lambda s: print("peer   ", s))
    finally:
        stop(proc)
    floor = results["tlserve"]["inprocess_onnx_p50_ms"]
    print(f"\nmodel {manifest['name']} ({manifest['backbone']}, input {hw[0]}x{hw[1]}); in-process onnxruntime p50, "
          f"batch 1: {floor:.3f} ms")
    print(f"{'concurrency':>11} | {'tlserve p50':>11} | {'peer p50':>9} | {'tlserve req/s':>13} | {'peer req/s':>10} | ratio")
    for ours, peer in zip(results["tlserve"]["results"], results["peer"]["results"]):
        ratio = ours["requests_per_sec"] / peer["requests_per_sec"]
        print(f"{ours['concurrency']:>11} | {ours['p50_ms']:>8.2f} ms | {peer['p50_ms']:>6.2f} ms | "
              f"{ours['requests_per_sec']:>13.1f} | {peer['requests_per_sec']:>10.1f} | {ratio:.2f}x")


if __name__ == "__main__":
    main()
