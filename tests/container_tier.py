"""The container tier's preparation (scripts/container-tier.sh up/down), started early and waited for late.

Making an engine, a base image and the CPU image takes minutes (a fresh machine installs docker.io
and runs debootstrap), so pytest starts it in the background when the session begins, if the tier's
tests are among those selected, and the rest of the suite runs meanwhile; the tier's test file is
scheduled last and waits for it. With xdist the controller starts it (workers inherit STATE_ENV).
"""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "container-tier.sh"
TIER_FILE = Path(__file__).with_name("test_container.py")
STATE_ENV = "TLSERVE_CONTAINER_STATE"
MARKS = {"container", "slow"}  # what the tier's tests carry, for -m
# A fresh machine installs docker.io, makes the base from Debian's packages and builds the image.
PREPARE_TIMEOUT_S = 1800


def wanted(config: pytest.Config) -> bool:
    """Whether this session selects the tier: its file is under the paths given and -m keeps it
    (-k is not looked at: a session that -k leaves it out only made it for nothing)."""
    if STATE_ENV in os.environ or config.getoption("collectonly"):  # made by the caller, or nothing runs
        return False
    markexpr = config.getoption("markexpr", "")
    if markexpr:
        from _pytest.mark.expression import Expression  # noqa: PLC0415 (what -m itself evaluates)

        if not Expression.compile(markexpr).evaluate(lambda name: name in MARKS):
            return False
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [TIER_FILE.parent]
    return any(TIER_FILE == p or p in TIER_FILE.parents for p in paths)


def start(config: pytest.Config) -> None:
    state = Path(tempfile.mkdtemp(prefix="tlserve-container."))  # short: the engine's socket lives in it
    with open(state / "up.log", "w") as log:
        config._tlserve_tier = (state, subprocess.Popen(["bash", str(SCRIPT), "up", str(state)], stdout=log,
                                                         stderr=subprocess.STDOUT, start_new_session=True))
    os.environ[STATE_ENV] = str(state)


def finish(config: pytest.Config) -> None:
    """Stop `up` if it still runs and take away all it made (the cached base rootfs stays)."""
    state, proc = getattr(config, "_tlserve_tier", (None, None))
    if state is None:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    subprocess.run(["bash", str(SCRIPT), "down", str(state)], capture_output=True, timeout=600)
    os.environ.pop(STATE_ENV, None)


def wait_ready(state: Path) -> dict[str, str]:
    """The variables `up` wrote (DOCKER_HOST, TLSERVE_BASE_IMAGE, TLSERVE_MODEL_DIR) once it is ready;
    the test fails with its log when it failed, ended, or took too long."""
    deadline = time.monotonic() + PREPARE_TIMEOUT_S
    while not (state / "ready").exists():
        failed = state / "failed"
        reason = failed.read_text() if failed.exists() else None
        if reason is None and not _alive(state / "up.pid") and not (state / "ready").exists():
            reason = "ended without saying ready"
        if reason is None and time.monotonic() > deadline:
            reason = f"not ready in {PREPARE_TIMEOUT_S} s"
        if reason:
            log = state / "up.log"
            pytest.fail(f"scripts/container-tier.sh up: {reason}\n{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(2)
    return dict(line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line)


def _alive(pid_file: Path) -> bool:
    """Whether the `up` that wrote pid_file still runs (no file yet: it is starting)."""
    try:
        os.kill(int(pid_file.read_text()), 0)
    except FileNotFoundError:
        return True
    except (ProcessLookupError, ValueError):
        return False
    return True
