"""`tlserve build`'s image: the device kinds, and a bento built into an image by the engine at hand.

BentoML builds it (`bentoml containerize --backend ENGINE`); this module picks the engine, keeps the
build's output in a log, and measures what came out. A failed or interrupted build leaves no image
under the tag it was given.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from serving.base.errors import UserError, choose


@dataclass(frozen=True)
class ImageKind:
    """One kind of service image: the onnxruntime it carries and what running it needs."""
    runtime: str  # the distribution in place of requirements.txt's onnxruntime, at the same version
    run_flags: str  # added to `docker run`


# The one list of device kinds `tlserve build --device` takes. The GPU wheels bring CUDA and cuDNN
# (about 2.7 GB): the CPU image has none of them.
IMAGE_KINDS = {
    "cpu": ImageKind("onnxruntime", ""),
    "gpu": ImageKind("onnxruntime-gpu[cuda,cudnn]", "--gpus all"),
}


@dataclass(frozen=True)
class Engine:
    """A container engine that builds (as BentoML's backend of the same name) and runs images."""
    probe: tuple[str, ...]  # succeeds when the engine can build now
    start_hint: str  # how to start it when it is installed but does not answer


# In the order `--engine auto` tries them.
ENGINES = {
    "docker": Engine(("version", "--format", "{{.Server.Version}}"),
                     "start its daemon (sudo systemctl start docker) or point DOCKER_HOST at one"),
    "podman": Engine(("info", "--format", "{{.Host.Arch}}"), "check `podman info`"),
}
ENGINE_CHOICES = ("auto", *ENGINES)
INSTALL_HINT = ("install Docker (Debian/Ubuntu: sudo apt-get install docker.io) or Podman and start it, "
                "or build the bento alone with --no-image")
PROBE_TIMEOUT_S = 20
BUILD_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Image:
    tag: str
    engine: str
    size_bytes: int
    run_command: str


def find_engine(choice: str = "auto") -> str:
    """The engine to build with: `choice`, or the first of ENGINES that answers. One line naming how to
    install or start one when none can build."""
    choose("--engine", choice, ENGINE_CHOICES)
    names = list(ENGINES) if choice == "auto" else [choice]
    installed = [name for name in names if shutil.which(name)]
    for name in installed:
        if _answers(name):
            return name
    if installed:
        name = installed[0]
        raise UserError(f"{name} is installed but cannot build: {ENGINES[name].start_hint}; or build the bento "
                        "alone with --no-image")
    raise UserError(f"no container engine found ({' or '.join(names)}): {INSTALL_HINT}")


def _answers(name: str) -> bool:
    try:
        return subprocess.run([name, *ENGINES[name].probe], capture_output=True,
                              timeout=PROBE_TIMEOUT_S).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_image(bentoml: str, bento_tag: str, engine: str, run_flags: str, network: str | None = None) -> Image:
    """Build the bento's image (with the `bentoml` command at that path), tagged as the bento; its size and
    the command that runs it."""
    log = Path(tempfile.gettempdir()) / f"tlserve-build-{bento_tag.replace(':', '-')}.log"
    command = [bentoml, "containerize", bento_tag, "--backend", engine, "--image-tag", bento_tag]
    if network:
        command += ["--opt", f"network={network}"]
    built = False
    try:
        with open(log, "w") as out:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=_build_env(engine),
                                  timeout=BUILD_TIMEOUT_S).returncode
        if code != 0:
            raise UserError(f"the image build failed (exit {code}); its log: {log}")
        size = _size(engine, bento_tag)
        if size is None:
            raise UserError(f"the image build left no image {bento_tag}; its log: {log}")
        built = True
    except subprocess.TimeoutExpired:
        raise UserError(f"the image build took over {BUILD_TIMEOUT_S} s and was stopped; its log: {log}") from None
    finally:
        if not built:
            remove_image(engine, bento_tag)
    log.unlink(missing_ok=True)
    flags = f" {run_flags}" if run_flags else ""
    return Image(bento_tag, engine, size, f"{engine} run --rm{flags} -p 3000:3000 {bento_tag}")


def _build_env(engine: str) -> dict[str, str]:
    """BentoML asks Docker for BuildKit, which the docker client runs through its buildx plugin; a
    client without the plugin refuses, so the build falls back to the classic builder there."""
    env = dict(os.environ)
    if engine == "docker" and "DOCKER_BUILDKIT" not in env:
        has_buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
        if not has_buildx:
            env["DOCKER_BUILDKIT"] = "0"
    return env


def _size(engine: str, tag: str) -> int | None:
    out = subprocess.run([engine, "image", "inspect", "--format", "{{.Size}}", tag], capture_output=True, text=True)
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip().isdigit() else None


def remove_image(engine: str, tag: str) -> None:
    """Remove `tag` if an image has it (a build stopped after tagging); nothing when none has."""
    if _size(engine, tag) is not None:
        subprocess.run([engine, "image", "rm", "-f", tag], capture_output=True)

