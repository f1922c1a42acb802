"""Shared test helpers: run the CLI in-process (TensorFlow loads once per session)."""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

import container_tier

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# Tests never touch the user's BentoML store or working directory.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="tlserve-test-bentoml-")
os.environ["TLSERVE_HOME"] = tempfile.mkdtemp(prefix="tlserve-test-home-")
# Removed when this process ends (each xdist worker made its own pair), so runs do not pile up in /tmp.
for _home in (os.environ["BENTOML_HOME"], os.environ["TLSERVE_HOME"]):
    atexit.register(shutil.rmtree, _home, ignore_errors=True)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(capsys):
    """Call `tlserve ARGS...` through cli.main (the console script's own entry point)."""
    import cli  # noqa: PLC0415

    def run(*args: str | Path) -> CliResult:
        capsys.readouterr()
        code = 0
        try:
            cli.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture(scope="module")
def run_cli_module():
    """run_cli for module fixtures: output captured by redirecting the rich consoles' files."""
    import contextlib
    import io

    import cli

    def run(*args):
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code or 0
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture(scope="session")
def tlserve_bin() -> Path:
    """The installed console script, for tests that need a separate process."""
    exe = Path(sys.executable).with_name("tlserve")
    assert exe.exists(), f"tlserve console script not installed next to {sys.executable}"
    return exe


def cli_call(*args: str | Path) -> None:
    """Run `tlserve ARGS...` in-process for fixtures; fails the test on a non-zero exit."""
    import cli  # noqa: PLC0415

    try:
        cli.main([str(a) for a in args])
    except SystemExit as exc:
        if exc.code not in (0, None):
            pytest.fail(f"tlserve {' '.join(map(str, args))} exited {exc.code}")


def train_run(runs: Path, name: str, *, data: str = "synthetic", limit: int | None = None, classes: str | None = None,
              seed: int = 0, **options) -> Path:
    """Train a run through the library, `train(TrainConfig(...))`, for fixtures that only need a finished run.
    `seed` seeds the data split too, as `tlserve train --seed` does."""
    from training.config import DataConfig, TrainConfig  # noqa: PLC0415
    from training.fit.train import train  # noqa: PLC0415

    cfg = TrainConfig(data=DataConfig(spec=data, limit=limit, classes=classes, seed=seed), seed=seed, name=name, **options)
    train(cfg, runs, progress=False)
    return runs / name


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="session")
def cnn_run(runs_root) -> Path:
    """One small CNN trained on synthetic data, shared by every test that needs a finished run."""
    # --drop-leaks: the generated set holds a near copy or two across splits (one in 400 test images),
    # which would mark the run LEAKY in every table the tests read
    return train_run(runs_root, "cnn", backbone="cnn", epochs=4, drop_leaks=True)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def cnn_model(cnn_run, runs_root, models_root) -> Path:
    """The shared CNN run exported with every variant (SavedModel, ONNX fp32, fp16, int8)."""
    # The gate has its own tests (test_export_gate.py); here the int8 file must exist on any CPU, even one
    # where quantization costs this barely trained model more than the default limits.
    cli_call("export", "cnn", "--runs-dir", runs_root, "--models-dir", models_root, "--fp16", "--int8",
             "--max-accuracy-drop", "100", "--max-class-drop", "100")
    return models_root / "cnn"


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory) -> Path:
    """A few generated test images as PNG and JPEG files, in several modes."""
    from PIL import Image

    from training.data.sources import make_synthetic

    folder = tmp_path_factory.mktemp("images")
    x, y, names = make_synthetic(12, seed=123)
    for i in range(8):
        Image.fromarray(x[i]).save(folder / f"{i:02d}-{names[y[i]]}.png")
    Image.fromarray(x[8]).save(folder / "08-jpeg.jpg", quality=95)
    Image.fromarray(x[9]).convert("RGBA").save(folder / "09-rgba.png")
    Image.fromarray(x[10]).convert("P").save(folder / "10-palette.png")
    Image.fromarray(x[11]).convert("L").save(folder / "11-gray.png")
    return folder


SERVER_START_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def bentoml_server(args: list[str], env: dict[str, str], log: Path):
    """`bentoml serve ARGS` on 127.0.0.1 and a free port, ready when /readyz says so; its URL.
    Stopped with its process group, whatever the test did."""
    import httpx  # noqa: PLC0415

    port = free_port()
    bentoml = str(Path(sys.executable).with_name("bentoml"))
    with open(log, "w") as out:
        proc = subprocess.Popen([bentoml, "serve", *args, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"server not ready in {SERVER_START_TIMEOUT}s:\n{log.read_text()[-3000:]}")
        yield url
    finally:
        stop_group(proc, grace=30)


def pytest_configure(config):
    if not hasattr(config, "workerinput") and container_tier.wanted(config):  # xdist: the controller, once
        container_tier.start(config)
    config.addinivalue_line("markers", "fast: the fast tier (decisions, parsing, settings, contracts, boundaries)")
    config.addinivalue_line("markers", "slow: trains, exports or starts servers (everything not marked fast)")
    config.addinivalue_line("markers", "container: builds and runs the CPU image (scripts/container-tier.sh; "
                                       "`-m 'not container'` leaves it out)")


def pytest_unconfigure(config):
    container_tier.finish(config)


def pytest_collection_modifyitems(config, items):
    # A new test is in the full tier until someone shows it is fast: `pytest -m "not slow"` stays quick.
    for item in items:
        if item.get_closest_marker("fast") is None:
            item.add_marker(pytest.mark.slow)
    # The container tier last: xdist hands out files in this order, and by then the image made in the
    # background since the session began (container_tier.start) is ready, so no worker waits for it.
    items.sort(key=lambda item: item.get_closest_marker("container") is not None)


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM a server's whole process group, SIGKILL it if it has not exited after `grace` seconds."""
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
