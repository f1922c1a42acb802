"""Server process lifecycle: workers that die with their supervisor, deaths that are logged,
and who holds a port.

`tlserve serve` execs `python -m serving.lifecycle serve ...` (same pid), which runs `bentoml serve`
in-process: BentoML's supervisor, a circus arbiter, runs in that process's main thread and spawns
each worker (`python -m _bentoml_impl.worker.service ...`, in a session of its own). So:
- a worker must notice its supervisor's death itself: nothing else stops it (`supervise_parent`);
- only the supervisor knows how a worker ended: a circus `after_reap` hook logs it (`supervise`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

# `tlserve serve` sets this to its own pid before exec: the supervisor keeps that pid, so a worker
# can tell "my parent is gone" even if it went before the worker could look (see supervise_parent).
SUPERVISOR_PID_ENV = "TLSERVE_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 1.0  # how often the fallback thread looks at the parent pid
GRACE_S = 10.0  # a worker told to stop that has not stopped after this long is ended without ceremony
WORKER_MODULE = "_bentoml_impl.worker.service"


def _log() -> logging.Logger:
    # Fetched when used: BentoML's logging setup disables loggers that already exist when it runs.
    return logging.getLogger("tlserve.lifecycle")


# ---- in the worker ----------------------------------------------------------------------


def supervisor_pid() -> int:
    """The pid this worker's parent must have: the one `tlserve serve` recorded, else (plain
    `bentoml serve`) the parent it has now."""
    raw = os.environ.get(SUPERVISOR_PID_ENV, "")
    return int(raw) if raw.isdigit() else os.getppid()


def set_parent_death_signal(sig: signal.Signals) -> bool:
    """Linux: have the kernel send `sig` to this process when the thread that forked it exits.
    The arbiter forks workers from its main thread, so that is when the supervisor dies.
    False where prctl is missing (macOS, Windows) or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def supervise_parent(poll_s: float = POLL_S) -> None:
    """In a BentoML worker: stop when the supervisor dies, instead of serving on as an orphan
    that holds the port. Call from the worker's main thread (the parent-death signal belongs to
    the calling thread and is not sent once that thread has exited); runs once per process."""
    import bentoml  # noqa: PLC0415

    if bentoml.server_context.worker_index is None:
        return  # the service built outside a BentoML worker (a test, a script): its parent is no supervisor
    expected = supervisor_pid()
    signalled = threading.current_thread() is threading.main_thread() and set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != expected:  # the supervisor died before prctl: no signal is coming
        _leave(expected, signalled=False)
        return
    # Second layer, and the only one without prctl: look at the parent pid every poll_s.
    threading.Thread(target=_watch_parent, args=(expected, poll_s, signalled),
                     name="tlserve-parent-watch", daemon=True).start()


def _watch_parent(expected: int, poll_s: float, signalled: bool) -> None:
    while os.getppid() == expected:
        time.sleep(poll_s)
    _leave(expected, signalled=signalled)


def _leave(supervisor: int, *, signalled: bool) -> None:
    """Shut down as on a TERM from the supervisor (uvicorn's graceful exit), then for sure."""
    _log().warning("tlserve worker pid %d: its supervisor (pid %d) is gone; shutting down", os.getpid(), supervisor)
    if not signalled:  # the kernel has already sent TERM when the parent-death signal was set
        os.kill(os.getpid(), signal.SIGTERM)
    deadline = threading.Timer(GRACE_S, os._exit, args=(1,))
    deadline.daemon = True  # a clean exit does not wait for it
    deadline.start()


# ---- in the supervisor ------------------------------------------------------------------


def describe_exit(exit_code: int | None) -> str:
    """circus's exit code of a reaped process: -N for signal N (as Popen.returncode)."""
    if exit_code is None:
        return "exit status unknown"
    if exit_code < 0:
        try:
            return f"signal {-exit_code}, {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def report_worker_exit(watcher: Any, process_pid: int, exit_code: int | None = None, **_: Any) -> bool:
    """circus `after_reap` hook: circus restarts a dead worker but logs its death only at DEBUG."""
    if watcher.is_stopping() or watcher.is_stopped():
        return True  # a shutdown: circus stopped the worker itself
    then = "the supervisor is starting a new one" if watcher.respawn else "not restarted (respawn is off in a container)"
    _log().warning("worker pid %d (%s) died (%s); %s", process_pid, watcher.name, describe_exit(exit_code), then)
    return True


def _with_reap_hook(create_watcher: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(create_watcher)
    def create(*args: Any, **kwargs: Any) -> Any:
        hooks = dict(kwargs.pop("hooks", None) or {})
        hooks.setdefault("after_reap", (report_worker_exit, True))  # True: a failing hook is logged, not fatal
        return create_watcher(*args, hooks=hooks, **kwargs)
    return create


def supervise(argv: list[str]) -> None:
    """`bentoml serve ARGV` in this process, its circus watchers given the after_reap hook.
    BentoML builds every watcher through bentoml.serving.create_watcher, imported when serving
    starts, so wrapping that function is the one place to pass circus `hooks=`."""
    import bentoml.serving  # noqa: PLC0415
    from bentoml_cli.cli import cli  # noqa: PLC0415 (what the `bentoml` console script runs)

    bentoml.serving.create_watcher = _with_reap_hook(bentoml.serving.create_watcher)
    cli.main(args=["serve", *argv], prog_name="bentoml")


# ---- who holds a port ---------------------------------------------------------------------


@dataclass(frozen=True)
class PortHolder:
    pid: int
    command: str  # the command line, shortened for one line of output
    kind: str  # "tlserve worker", "BentoML worker" or "process"
    orphaned: bool  # a worker whose supervisor is gone (re-parented to PID 1 or a subreaper)
    parent: int | None = None


def port_holders(port: int) -> list[PortHolder]:
    """The processes listening on TCP `port` (a BentoML server's workers share one socket; its
    supervisor lets go of it once they are started). Empty when the system will not say (other
    users' processes, macOS without root)."""
    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    except (psutil.AccessDenied, OSError):
        return []
    return [h for h in map(_describe, sorted(pids)) if h is not None]


def _describe(pid: int) -> PortHolder | None:
    try:
        proc = psutil.Process(pid)
        cmdline = proc.cmdline()
        parent = proc.parent()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return PortHolder(pid, "", "process", False)
    try:
        parent_cmd = " ".join(parent.cmdline()) if parent is not None else ""
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        parent_cmd = ""  # a parent we may not look at is no BentoML supervisor of ours
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(cmdline)) or f"pid {pid}"
    if WORKER_MODULE not in cmdline:
        return PortHolder(pid, _shorten(command), "process", False)
    tlserve = "serving.service:ImageClassifier" in cmdline or "tlserve" in cmdline
    # A live supervisor is `bentoml serve` or `serving.lifecycle` (PID 1 itself in a container);
    # any other parent, init or a subreaper, adopted the worker when its supervisor died.
    orphaned = not ("bentoml" in parent_cmd or "serving.lifecycle" in parent_cmd)
    return PortHolder(pid, _shorten(command), "tlserve worker" if tlserve else "BentoML worker", orphaned,
                      parent.pid if parent is not None else None)


def _shorten(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())  # a `python -c` program has newlines; the error is one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    # Imported by name so that BentoML, loading serving.service, finds the same module, not __main__.
    from serving.lifecycle import supervise as _supervise

    if sys.argv[1:2] != ["serve"]:
        sys.exit("usage: python -m serving.lifecycle serve SERVICE [bentoml serve options]")
    _supervise(sys.argv[2:])
