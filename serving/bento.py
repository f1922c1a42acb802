"""`tlserve serve` and `tlserve build`: thin wrappers over `bentoml serve` and `bentoml build`."""
from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

import yaml

from serving.base.errors import UserError
from serving.containers import IMAGE_KINDS
from serving.lifecycle import SUPERVISOR_PID_ENV, port_holders
from serving.base.manifest import Manifest, resolve_model
from serving.settings import ServiceSettings

SERVICE = "serving.service:ImageClassifier"
ROOT = Path(__file__).resolve().parents[1]
BENTOFILE = ROOT / "bentofile.yaml"
REQUIREMENTS = ROOT / "serving" / "requirements.txt"


def bentoml_exe() -> str:
    exe = Path(sys.executable).with_name("bentoml")
    if exe.exists():
        return str(exe)
    found = shutil.which("bentoml")
    if found is None:
        raise UserError("the bentoml command is not installed next to this Python")
    return found


def serve_command(model_dir: Path, host: str, port: int, workers: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment that this process execs to become the server: `bentoml serve`
    run by serving.lifecycle, which adds a log line for each worker that dies (see there)."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    bentoml_exe()  # a missing BentoML is one line here
    env = {**os.environ, "TLSERVE_MODEL": str(Path(model_dir).resolve()), "TLSERVE_WORKERS": str(workers),
           # exec keeps this pid: workers check that their parent still has it (serving/lifecycle.py)
           SUPERVISOR_PID_ENV: str(os.getpid())}
    # a bad TLSERVE_* setting is one line here, not a traceback from the server
    ServiceSettings.from_env(env).check_model(Manifest.load(model_dir))
    _check_address(host, port)
    return [sys.executable, "-m", "serving.lifecycle", "serve", SERVICE, "--host", host, "--port", str(port)], env


def exec_serve(model_ref: str, models_dir: Path | None, host: str, port: int, workers: int,
               ready: Callable[[Path, str], None]) -> NoReturn:
    """Check everything, call `ready(model_dir, url)` (the caller's one chance to print), then become the
    server: signals (Ctrl-C, a supervisor's TERM) reach BentoML directly, and this pid is the supervisor's,
    which its workers watch (serving/lifecycle.py)."""
    model_dir = resolve_model(model_ref, models_dir)
    command, env = serve_command(model_dir, host, port, workers)
    ready(model_dir, f"http://{host}:{port}")
    sys.stdout.flush()
    os.execve(command[0], command, env)


def _check_address(host: str, port: int) -> None:
    """Bind and release the address BentoML is about to listen on: a port in use or a host that
    is not this machine's is one line here; from BentoML's process manager it is a traceback.
    Another process could still take the port in between; then BentoML reports it."""
    if not 0 < port < 65536:
        raise UserError(f"--port must be between 1 and 65535, not {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UserError(_port_in_use(host, port, exc.strerror)) from None
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _port_in_use(host: str, port: int, reason: str) -> str:
    """The error line for a port in use, naming who holds it: above all a worker left behind by a
    killed server, which serves on, re-parented to PID 1, with nothing pointing at it."""
    holders = port_holders(port)
    orphans = [h for h in holders if h.orphaned]
    if orphans:
        pids = " ".join(str(h.pid) for h in orphans)
        who = f"an orphaned {orphans[0].kind} (pid {pids})" if len(orphans) == 1 else f"orphaned {orphans[0].kind}s (pids {pids})"
        return f"port {port} is held by {who}; stop it with: kill {pids}"
    line = f"cannot listen on {host}:{port}: {reason}"
    if not holders:
        return line
    first = holders[0]
    if first.kind != "process" and first.parent is not None:
        return f"{line} (held by a running {first.kind.split()[0]} server, pid {first.parent}; its worker is pid {first.pid})"
    return f"{line} (held by pid {first.pid}: {first.command})" if first.command else f"{line} (held by pid {first.pid})"


def requirements_for(kind: str) -> str:
    """serving/requirements.txt with its onnxruntime line made the device kind's runtime (same pin)."""
    from packaging.requirements import InvalidRequirement, Requirement  # noqa: PLC0415 (a bentoml dependency)

    lines = []
    for line in REQUIREMENTS.read_text().splitlines():
        try:
            req = Requirement(line)
        except InvalidRequirement:  # a comment or a blank line
            req = None
        lines.append(f"{IMAGE_KINDS[kind].runtime}{req.specifier}" if req and req.name == "onnxruntime" else line)
    return "\n".join(lines) + "\n"


def build(model_ref: str, models_dir: Path | None = None, *, kind: str = "cpu",
          base_image: str | None = None) -> tuple[str, str]:
    """Build a bento carrying the model, named tlserve-KIND, with that device kind's requirements;
    returns (bento tag, build output)."""
    if not BENTOFILE.is_file():
        raise UserError(f"{BENTOFILE} not found: `tlserve build` runs from a tlserve source checkout")
    manifest = Manifest.load(resolve_model(model_ref, models_dir))
    tag = manifest.bentoml_tag
    if not tag:
        raise UserError(f"model '{model_ref}' was exported with --no-register; export it again to register it")
    # In the build context: BentoML takes a requirements file by a path relative to it.
    with tempfile.TemporaryDirectory(prefix="tlserve-build-", dir=ROOT) as tmp:
        generated = Path(tmp) / "bentofile.yaml"
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(requirements_for(kind))
        yaml.safe_dump(_bentofile(tag, manifest.name, kind, requirements, base_image), generated.open("w"),
                       sort_keys=False)
        result = subprocess.run([bentoml_exe(), "build", "-f", str(generated), str(ROOT), "--output", "tag"],
                                capture_output=True, text=True, env={**os.environ, "TLSERVE_MODEL": tag}, cwd=ROOT,
                                timeout=600)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise UserError(f"bentoml build failed: {tail[0]}")
    match = re.search(r"__tag__:(\S+)", result.stdout) or re.search(r"(tlserve-[a-z]+:[a-z0-9]+)", result.stdout)
    if not match:
        raise UserError(f"bentoml build printed no bento tag: {result.stdout.strip()[-200:]}")
    return match.group(1), result.stdout


def _bentofile(model_tag: str, model_name: str, kind: str, requirements: Path, base_image: str | None) -> dict:
    """bentofile.yaml for one model and device kind."""
    config = yaml.safe_load(BENTOFILE.read_text())
    config["name"] = f"{config['name']}-{kind}"
    config["models"] = [model_tag]
    config["envs"] = [e for e in config.get("envs", []) if e.get("name") != "TLSERVE_MODEL"] + [
        {"name": "TLSERVE_MODEL", "value": model_tag}]
    config.setdefault("labels", {}).update(model=model_name, device=kind)
    config["python"]["requirements_txt"] = str(requirements.relative_to(ROOT))
    if base_image:
        config["docker"] = {"base_image": base_image}
    return config
