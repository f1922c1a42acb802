"""`tlserve serve` as processes: a killed server takes its workers with it, a worker's death is
logged, and a port held by a left-behind worker is named. Everything on 127.0.0.1, bounded in time."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import free_port

START_TIMEOUT = 120
GONE_TIMEOUT = 10


def _can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(procs, timeout=10)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
        with suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"server not ready in {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def _tlserve(tlserve_bin: Path, model: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str, list[psutil.Process]]]:
    """`tlserve serve` until ready: (its process, its URL, every process of its tree seen so far,
    which the test may extend). Whatever is left of them is killed at the end."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([str(tlserve_bin), "serve", str(model), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    tree = [psutil.Process(proc.pid)]
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        tree += tree[0].children(recursive=True)
        yield proc, url, tree
    finally:
        # The workers are in sessions of their own (circus setsid()s them): killpg would miss them.
        with suppress(psutil.NoSuchProcess):
            tree += tree[0].children(recursive=True)
        _kill_all(tree)
        proc.wait(timeout=10)


def _workers(top: psutil.Process) -> list[psutil.Process]:
    return [p for p in top.children(recursive=True) if "_bentoml_impl.worker.service" in p.cmdline()]


def test_killing_the_server_takes_its_workers_and_frees_the_port(cnn_model, tlserve_bin, run_cli, tmp_path):
    with _tlserve(tlserve_bin, cnn_model, tmp_path / "server.log") as (proc, url, tree):
        workers = _workers(tree[0])
        assert workers, f"no BentoML worker under the server: {[p.cmdline() for p in tree]}"
        port = int(url.rsplit(":", 1)[1])
        again = run_cli("serve", cnn_model, "--port", str(port))  # while it runs: the server is named
        assert again.code == 2 and f"held by a running tlserve server, pid {proc.pid}; its worker is pid" in again.err
        proc.kill()  # kill -9: no chance to stop its workers
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree[1:], timeout=GONE_TIMEOUT)
        assert not alive, f"left behind: {[(p.pid, p.cmdline()) for p in alive]}\n{(tmp_path / 'server.log').read_text()}"
        assert _can_bind(port)


def test_a_dead_worker_is_logged_and_replaced(cnn_model, tlserve_bin, tmp_path):
    log = tmp_path / "server.log"
    with _tlserve(tlserve_bin, cnn_model, log) as (proc, url, tree):
        [worker] = _workers(tree[0])
        worker.kill()
        deadline = time.monotonic() + 30
        while f"worker pid {worker.pid}" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert re.search(rf"worker pid {worker.pid} \S+ died \(signal 9, SIGKILL\); the supervisor is starting a new one",
                         text), text
        time.sleep(1)  # the old worker's socket may still answer for a moment: wait for the new one
        _wait_ready(url, proc, log, timeout=60)
        assert any(w.pid != worker.pid for w in _workers(tree[0]))
        tree += _workers(tree[0])


def test_a_worker_whose_supervisor_is_already_gone_exits(tmp_path):
    """The race prctl leaves open: the supervisor dies before the worker arms the signal."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=10)  # a pid that is no one's parent now
    code = textwrap.dedent("""
        import time, bentoml
        from serving.lifecycle import supervise_parent
        bentoml.server_context.worker_index = 1
        supervise_parent()
        time.sleep(30)
    """)
    env = {**os.environ, "TLSERVE_SUPERVISOR_PID": str(gone.pid)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGTERM, result.stderr
    assert f"its supervisor (pid {gone.pid}) is gone" in result.stderr


def test_without_prctl_the_watch_thread_ends_an_orphan(tmp_path):
    """The fallback (macOS, or prctl refused): the thread that polls the parent pid."""
    child = textwrap.dedent("""
        import time, bentoml, serving.lifecycle as lc
        lc.set_parent_death_signal = lambda sig: False
        bentoml.server_context.worker_index = 1
        lc.supervise_parent(0.2)
        print("armed", flush=True)
        time.sleep(30)
    """)
    # A parent that starts the "worker", waits until it watches, and exits.
    parent = textwrap.dedent(f"""
        import subprocess, sys
        with open({str(tmp_path / "worker.log")!r}, "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout.readline().strip() == "armed"
        print(proc.pid, flush=True)
    """)
    made = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    orphan = int(made.stdout.split()[-1])
    try:
        gone, alive = psutil.wait_procs([psutil.Process(orphan)], timeout=GONE_TIMEOUT)
        assert not alive
        assert f"tlserve worker pid {orphan}: its supervisor" in (tmp_path / "worker.log").read_text()
    except psutil.NoSuchProcess:
        pass  # already gone before we looked: what the test wants
    finally:
        with suppress(psutil.NoSuchProcess):
            psutil.Process(orphan).kill()


ECHO_SERVICE = """
import bentoml

@bentoml.service
class Echo:
    @bentoml.api
    def ping(self) -> str:
        return "pong"
"""

# Binds a port, hands it to a BentoML worker as its supervisor would, and exits: the worker is
# then what a killed server used to leave behind (it is not tlserve's, so nothing stops it).
ORPHAN_MAKER = """
import socket, subprocess, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen()
p = subprocess.Popen([sys.executable, "-m", "_bentoml_impl.worker.service", "echo_svc:Echo", "--fd", str(s.fileno()),
                      "--worker-id", "1"], pass_fds=[s.fileno()], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(s.getsockname()[1], p.pid)
"""


def test_serve_names_an_orphaned_worker_holding_the_port(cnn_model, run_cli, tmp_path):
    (tmp_path / "echo_svc.py").write_text(ECHO_SERVICE)
    made = subprocess.run([sys.executable, "-c", ORPHAN_MAKER], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    port, pid = map(int, made.stdout.split())
    try:
        assert psutil.Process(pid).ppid() != os.getpid()
        result = run_cli("serve", cnn_model, "--port", str(port))
        assert result.code == 2, result
        assert f"port {port} is held by an orphaned BentoML worker (pid {pid}); stop it with: kill {pid}" in result.err
        assert len(result.err.strip().splitlines()) == 1
    finally:
        with suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()


def test_serve_names_the_process_holding_the_port(cnn_model, run_cli, tmp_path):
    listener = subprocess.Popen([sys.executable, "-c", "import socket, sys, time\n"
                                 "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
                                 "print(s.getsockname()[1], flush=True); time.sleep(60)"],
                                stdout=subprocess.PIPE, text=True)
    try:
        port = int(listener.stdout.readline())
        result = run_cli("serve", cnn_model, "--port", str(port))
        assert result.code == 2
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use (held by pid {listener.pid}: python" in result.err
        assert len(result.err.strip().splitlines()) == 1
    finally:
        listener.kill()
        listener.wait(timeout=10)
