"""The container tier: the CPU image, built by `tlserve build --device cpu` and run for real.

scripts/container-tier.sh makes what it needs (a Docker engine, a base image, a tiny exported model and
its image): in the background from the session's start while the rest of the suite runs
(tests/container_tier.py), or here when that did not happen. This file starts the image on 127.0.0.1
and checks that it answers as `tlserve predict` does, refuses a bad upload with a 4xx, and stops when
told.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

import container_tier
from conftest import free_port

pytestmark = pytest.mark.container

MAX_IMAGE_MB = 700
READY_TIMEOUT_S = 120  # the test's bound under a loaded CI; the README states the unloaded figure
STOP_LIMIT_S = 10  # `docker stop` kills after 10 s: a graceful stop is well inside it


@dataclass
class Tier:
    state: Path
    env: dict[str, str]  # DOCKER_HOST for the docker client, the model folder
    build_out: str  # what `tlserve build` printed

    @property
    def image(self) -> str:
        return re.search(r"^built image (\S+) with docker", self.build_out, re.M).group(1)

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **{k: v for k, v in self.env.items() if k == "DOCKER_HOST" and v}}
        out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=env)
        if check:
            assert out.returncode == 0, f"docker {' '.join(args)}: {out.stderr[-2000:]}"
        return out


@pytest.fixture(scope="module")
def tier():
    """What scripts/container-tier.sh made: started by tests/conftest.py when the session began, or made
    (and taken away) here when it was not."""
    owned = container_tier.STATE_ENV not in os.environ
    state = Path(os.environ.get(container_tier.STATE_ENV) or tempfile.mkdtemp(prefix="tlserve-container."))
    script = str(container_tier.SCRIPT)
    try:
        if owned:
            with open(state / "up.log", "w") as log:
                subprocess.run(["bash", script, "up", str(state)], stdout=log, stderr=subprocess.STDOUT,
                               timeout=container_tier.PREPARE_TIMEOUT_S)
        env = container_tier.wait_ready(state)
        yield Tier(state, env, (state / "build.out").read_text())
    finally:
        if owned:
            subprocess.run(["bash", script, "down", str(state)], capture_output=True, timeout=600)


def test_build_printed_a_cpu_image_without_cuda_or_compilers(tier):
    out = tier.build_out
    assert re.search(r"^built bento tlserve-cpu:\S+ \(cpu: onnxruntime\)$", out, re.M), out
    printed_mb = float(re.search(r"^built image \S+ with docker: (\d+) MB$", out, re.M).group(1))
    assert f"run it: docker run --rm -p 3000:3000 {tier.image}" in out
    size_mb = int(tier.docker("image", "inspect", "--format", "{{.Size}}", tier.image).stdout) / 1e6
    assert abs(size_mb - printed_mb) <= 1 and size_mb <= MAX_IMAGE_MB, out
    inside = tier.docker("run", "--rm", "--network", "none", "--entrypoint", "sh", tier.image, "-c",
                         "ls /app/.venv/lib/python3*/site-packages; command -v gcc cc git || true").stdout.split()
    # no CUDA wheels (their `nvidia` package; nvidia_ml_py is BentoML's small NVML binding) and no compiler
    assert "onnxruntime" in inside and "nvidia" not in inside and not [n for n in inside if n.startswith("onnxruntime_gpu")]
    assert not [n for n in inside if n.endswith(("/gcc", "/cc", "/git"))]


def test_image_serves_like_tlserve_predict_and_stops(tier, sample_images, run_cli):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    cid = tier.docker("run", "-d", "--network", "host", tier.image, "--host", "127.0.0.1", "--port", str(port)).stdout.strip()
    try:
        ready_s = _wait_ready(tier, cid, url, started)
        paths = sorted(sample_images.iterdir())
        with httpx.Client(timeout=30) as http:
            served = [http.post(f"{url}/predict", files={"image": (p.name, p.read_bytes())}, data={"top_k": "3"})
                      for p in paths]
            bad = http.post(f"{url}/predict", files={"image": ("x.png", b"not an image")})
        assert [r.status_code for r in served] == [200] * len(paths)
        assert 400 <= bad.status_code < 500 and "error" in bad.json()
        local = run_cli("predict", tier.env["TLSERVE_MODEL_DIR"], *paths, "--json", "-k", "3")
        assert local.code == 0, local.err
        lines = [json.loads(line) for line in local.out.splitlines() if line.startswith("{")]
        assert [[t["label"] for t in r.json()["top"]] for r in served] == [[t["label"] for t in line["top"]] for line in lines]
        np.testing.assert_allclose([[t["probability"] for t in r.json()["top"]] for r in served],
                                   [[t["probability"] for t in line["top"]] for line in lines], atol=1e-5)
        stopping = time.monotonic()
        tier.docker("stop", cid, timeout=60)
        stop_s = time.monotonic() - stopping
        exit_code = tier.docker("inspect", "--format", "{{.State.ExitCode}}", cid).stdout.strip()
        print(f"container ready {ready_s:.1f} s after docker run; stopped in {stop_s:.1f} s (exit {exit_code})")
        assert stop_s < STOP_LIMIT_S and exit_code != "137"  # 137: killed, not stopped
    finally:
        tier.docker("rm", "-f", cid, check=False)


def _wait_ready(tier: Tier, cid: str, url: str, started: float) -> float:
    """Seconds from `docker run` to /readyz answering 200."""
    polls = 0
    while time.monotonic() - started < READY_TIMEOUT_S:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        polls += 1
        if polls % 10 == 0 and tier.docker("inspect", "--format", "{{.State.Running}}", cid).stdout.strip() != "true":
            pytest.fail(f"the container exited:\n{tier.docker('logs', cid, check=False).stderr[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"not ready {READY_TIMEOUT_S} s after docker run:\n{tier.docker('logs', cid, check=False).stderr[-3000:]}")
