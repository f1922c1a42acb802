"""tlserve's BentoML service against a minimal peer server, same model, same uploads, same run, 127.0.0.1 only.

    .venv/bin/python benchmarks/http_overhead.py MODEL_DIR [--concurrency 1,8,32] [--requests 300] [--rounds 3]
                                                 [--no-access-log]

Both servers run side by side (the idle one costs nothing) and are measured in alternating
rounds, tlserve then the peer, at every concurrency: this VM's speed drifts by tens of percent
within minutes, so one server measured after the other compared the minutes, not the servers.
Prints each round's requests/s and the median p50 latency and requests/s per concurrency, with
the in-process onnxruntime p50 (batch 1) as the floor. The script starts and stops both servers.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving.timing import bench_http, inprocess_p50_ms, sample_uploads  # noqa: E402
from serving.base.manifest import Manifest  # noqa: E402


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
    parser.add_argument("--requests", type=int, default=300, help="requests per server, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-access-log", action="store_true",
                        help="both servers without their per-request access log (on by default in both)")
    args = parser.parse_args()
    levels = tuple(int(c) for c in args.concurrency.split(","))
    manifest = Manifest.load(args.model_dir)
    hw = manifest.input.hw
    uploads = sample_uploads(hw, 16)
    bin_dir = Path(sys.executable).parent
    tlserve_env = {"TLSERVE_MODEL": str(args.model_dir.resolve())}
    if args.no_access_log:
        tlserve_env["BENTOML_CONFIG_OPTIONS"] = "services.tlserve.logging.access.enabled=false"
    commands = {
        "tlserve": ([str(bin_dir / "bentoml"), "serve", "serving.service:ImageClassifier", "--host", "127.0.0.1",
                     "--port", "{port}"], tlserve_env, "/readyz"),
        "peer": ([sys.executable, str(ROOT / "benchmarks" / "peer_server.py"), str(args.model_dir), "{port}",
                  *(["--no-access-log"] if args.no_access_log else [])], {}, "/metadata"),
    }
    urls, procs = {}, []
    try:
        for name, (command, env, ready) in commands.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            procs.append(start([part.format(port=port) for part in command], env, urls[name], ready))
        rows: dict[str, list[list[dict]]] = {name: [] for name in commands}
        for n in range(args.rounds):
            for name, url in urls.items():
                result = bench_http(url, concurrency=levels, requests=args.requests, uploads=uploads,
                                    log=lambda s, name=name, n=n: print(f"round {n + 1} {name:7}", s))
                rows[name].append(result["results"])
    finally:
        for proc in procs:
            stop(proc)
    floor = inprocess_p50_ms(args.model_dir, hw)
    print(f"\nmodel {manifest.name} ({manifest.backbone}, input {hw[0]}x{hw[1]}), {args.rounds} rounds of "
          f"{args.requests} requests, access logs {'off' if args.no_access_log else 'on'}; "
          f"in-process onnxruntime p50, batch 1: {floor:.3f} ms")
    print(f"{'concurrency':>11} | {'tlserve p50':>11} | {'peer p50':>9} | {'tlserve req/s':>13} | {'peer req/s':>10} | "
          "ratio | ratio per round")
    for i, c in enumerate(levels):
        ours = [r[i] for r in rows["tlserve"]]
        peer = [r[i] for r in rows["peer"]]
        per_round = [a["requests_per_sec"] / b["requests_per_sec"] for a, b in zip(ours, peer)]
        ours_rps, peer_rps = _median(ours, "requests_per_sec"), _median(peer, "requests_per_sec")
        print(f"{c:>11} | {_median(ours, 'p50_ms'):>8.2f} ms | {_median(peer, 'p50_ms'):>6.2f} ms | "
              f"{ours_rps:>13.1f} | {peer_rps:>10.1f} | {ours_rps / peer_rps:.2f}x | "
              f"{' '.join(f'{r:.2f}' for r in per_round)}")


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(row[key] for row in rows)


if __name__ == "__main__":
    main()
