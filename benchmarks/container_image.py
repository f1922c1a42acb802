"""The CPU image's size, start-to-ready and stop times (and the GPU image's size), measured end to end.

    .venv/bin/python benchmarks/container_image.py [--rounds 5] [--gpu]

Makes what the container tier makes (scripts/container-tier.sh up: a Docker engine, the base image, a
tiny exported model and its CPU image built by `tlserve build --device cpu`), prints how long each step
took, then starts the image --rounds times on 127.0.0.1: seconds from `docker run` to /readyz 200 and
the CPU seconds the container used until then (its cgroup), and seconds `docker stop` took (exit code
137 would mean killed, not stopped). --gpu also builds the GPU image (`--device gpu`) and prints its size;
it is not run (it needs a GPU and the NVIDIA container runtime). Everything is removed at the end
(scripts/container-tier.sh down); the base image's rootfs stays cached. Prints the load average beside
each timing: this VM is shared.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
TIER = str(ROOT / "scripts" / "container-tier.sh")


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker(*args: str, env: dict[str, str], check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, env=env, timeout=1800)
    if check and out.returncode != 0:
        raise SystemExit(f"docker {' '.join(args)}: {out.stderr[-2000:]}")
    return out.stdout.strip()


def cpu_seconds(cid: str) -> float | None:
    """CPU time of the container so far, from its cgroup: v1 (cpuacct) or v2, cgroupfs or systemd driver."""
    v1 = Path(f"/sys/fs/cgroup/cpuacct/docker/{cid}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    for path in (f"/sys/fs/cgroup/docker/{cid}/cpu.stat", f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/cpu.stat"):
        if Path(path).exists():
            usage = re.search(r"^usage_usec (\d+)", Path(path).read_text(), re.M)
            return int(usage.group(1)) / 1e6 if usage else None
    return None


def one_round(image: str, env: dict[str, str]) -> tuple[float, float | None, float, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    cid = docker("run", "-d", "--network", "host", image, "--host", "127.0.0.1", "--port", str(port), env=env)
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - started > 300:
                raise SystemExit(f"not ready in 300 s: {docker('logs', cid, env=env, check=False)[-2000:]}")
            time.sleep(0.1)
        ready_s = time.monotonic() - started
        cpu_s = cpu_seconds(cid)
        stopping = time.monotonic()
        docker("stop", cid, env=env)
        stop_s = time.monotonic() - stopping
        code = docker("inspect", "--format", "{{.State.ExitCode}}", cid, env=env)
    finally:
        docker("rm", "-f", cid, env=env, check=False)
    return ready_s, cpu_s, stop_s, code


def layers(image: str, env: dict[str, str]) -> None:
    for line in docker("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", image, env=env).splitlines():
        size, _, step = line.partition("\t")
        step = re.sub(r"^.*?/bin/sh -c (#\(nop\) )?", "", step) if step else "(the base image)"
        if size not in ("0B", "0"):
            print(f"    {size:>9}  {step[:110]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="also build the GPU image and print its size")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="tlserve-container."))
    print(f"load before: {load()}  (2-core VM: {os.cpu_count()} CPUs)")
    try:
        began = time.monotonic()
        with open(state / "up.log", "w") as log:
            code = subprocess.run(["bash", TIER, "up", str(state)], stdout=log, stderr=subprocess.STDOUT).returncode
        print((state / "up.log").read_text().rstrip())
        if code != 0:
            raise SystemExit("scripts/container-tier.sh up failed")
        print(f"prepared in {time.monotonic() - began:.0f} s (load {load()})")
        env = dict(os.environ, **dict(ln.split("=", 1) for ln in (state / "env").read_text().splitlines() if "=" in ln))
        if not env.get("DOCKER_HOST"):
            env.pop("DOCKER_HOST")
        image = re.search(r"^built image (\S+)", (state / "build.out").read_text(), re.M).group(1)
        size = int(docker("image", "inspect", "--format", "{{.Size}}", image, env=env))
        print(f"\nCPU image {image}: {size / 1e6:.0f} MB; its layers:")
        layers(image, env)
        print(f"\n{'round':>5}  {'ready s':>8}  {'ready CPU s':>11}  {'stop s':>7}  exit  load")
        rows = []
        for i in range(args.rounds):
            ready_s, cpu_s, stop_s, code = one_round(image, env)
            rows.append((ready_s, stop_s))
            cpu = f"{cpu_s:11.2f}" if cpu_s is not None else f"{'-':>11}"
            print(f"{i + 1:>5}  {ready_s:8.2f}  {cpu}  {stop_s:7.2f}  {code:>4}  {load()}")
        print(f"median: ready {statistics.median(r for r, _ in rows):.2f} s, stop {statistics.median(s for _, s in rows):.2f} s")
        if args.gpu:
            gpu_image(state, env, image)
    finally:
        began = time.monotonic()
        down = subprocess.run(["bash", TIER, "down", str(state)], capture_output=True, text=True)
        print(f"\n{down.stdout.strip()}\ntaken away in {time.monotonic() - began:.0f} s (load {load()})")


def gpu_image(state: Path, env: dict[str, str], cpu_image: str) -> None:
    """Build the same model's GPU image into the same engine; print its size and layers, then remove it."""
    model_env = {**env, "TLSERVE_HOME": str(state / "home"), "BENTOML_HOME": str(state / "bentoml")}
    began = time.monotonic()
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "tlserve"), "build", "box", "--device", "gpu", "--engine",
                          "docker", "--network", "host", "--base-image", env["TLSERVE_BASE_IMAGE"]],
                         capture_output=True, text=True, env=model_env)
    if out.returncode != 0:
        raise SystemExit(f"GPU image build failed: {out.stderr.strip()}")
    print(f"\n{out.stdout.strip()}\nGPU image built in {time.monotonic() - began:.0f} s (load {load()}); its layers:")
    image = re.search(r"^built image (\S+)", out.stdout, re.M).group(1)
    layers(image, env)
    docker("image", "rm", "-f", image, env=env, check=False)


if __name__ == "__main__":
    sys.exit(main())
