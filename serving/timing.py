"""`tlserve bench`: inference latency and throughput, in-process per runtime or end to end over HTTP.

Every result is stored under models/<name>/bench/ with the machine it came from, so figures
from different machines are never mixed silently. Every runtime is loaded through one loader
(sha256 checked first): serving.sessions.load for the onnxruntime rows of serving.base.formats, or
training.exported.loader.load, which training passes in with keras, tf-function and savedmodel too.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import numpy as np

from serving.base import formats, machine
from serving.base.contract import Contract, optional
from serving.base.errors import UserError
from serving.base.manifest import Manifest, ModelFolder
from serving.sessions import Loader

ONNX_RUNTIMES = tuple(f.runtime for f in formats.ONNX)
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SCHEMA = 1  # bench/<kind>-<time>.json


# ---- the stored result (serving.base.contract) --------------------------------------------------

@dataclass
class Result(Contract):
    """One runtime at one batch size, in-process."""
    runtime: str
    batch_size: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    images_per_sec: float
    provider: str
    threads: int | None


@dataclass(kw_only=True)
class HttpRow(Contract):
    """One concurrency level of the HTTP load test (latencies None when every request failed)."""
    concurrency: int
    requests: int
    errors: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None
    requests_per_sec: float | None
    overhead_ms_p50: float | None = optional()  # p50 above the in-process floor, when a MODEL gave one


@dataclass(kw_only=True)
class BenchResult(Contract):
    """models/<name>/bench/<kind>-<time>.json: one `tlserve bench`, with the machine it ran on."""
    schema: int = SCHEMA
    kind: str                                  # inprocess | http
    model: str | None = optional()             # absent: an HTTP bench without a MODEL (not stored)
    version: str | None = optional()
    created_at: str
    machine: dict[str, Any]
    versions: dict[str, str] | None = optional()

    SCHEMA = SCHEMA
    KIND = "bench result"


@dataclass(kw_only=True)
class InprocessBench(BenchResult):
    kind: str = "inprocess"
    results: list[Result]
    skipped: dict[str, str]                    # runtime -> why it was not measured


@dataclass(kw_only=True)
class HttpBench(BenchResult):
    kind: str = "http"
    url: str
    server: dict[str, Any]                     # the service's /metadata facts
    inprocess_onnx_p50_ms: float | None        # the floor, when a MODEL was given
    results: list[HttpRow]


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max()), "mean_ms": float(a.mean())}


def time_calls(fn: Callable[[], Any], *, warmup: int, iterations: int | None, duration: float | None) -> list[float]:
    """Milliseconds per call after `warmup` calls; stops at `iterations` or after `duration` seconds."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + (duration or 0)
    while True:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        if iterations is not None and len(samples) >= iterations:
            return samples
        if iterations is None and time.perf_counter() >= deadline and len(samples) >= 5:
            return samples


def bench_model(model_dir: Path, *, runtimes: tuple[str, ...] = ONNX_RUNTIMES, batch_sizes: tuple[int, ...] = (1, 8, 32),
                iterations: int | None = None, duration: float | None = 3.0, warmup: int = 5,
                threads: int | None = None, log: Callable[[str], None] = print,
                loader: Loader | None = None, known: tuple[str, ...] = ONNX_RUNTIMES,
                facts: Callable[[], dict[str, Any]] = machine.machine_facts) -> dict[str, Any]:
    """Time each runtime at each batch size in this process and store the result.

    `loader` loads a runtime by name (default serving.sessions.load: the onnxruntime rows; training.exported.loader
    passes its loader and `known` with keras, tf-function and savedmodel too), and `facts` is what the
    stored result says about the machine."""
    if loader is None:
        from serving.sessions import load as loader  # noqa: PLC0415
    manifest = Manifest.load(model_dir)
    for runtime in runtimes:
        formats.check_runtime(runtime, known)
    if any(b < 1 for b in batch_sizes):
        raise UserError("batch sizes must be at least 1")
    if iterations is not None and iterations < 1 or duration is not None and duration <= 0:
        raise UserError("--iterations and --duration must be positive")
    h, w = manifest.input.hw
    rng = np.random.default_rng(0)
    results, skipped = [], {}
    for runtime in runtimes:
        try:
            loaded = loader(model_dir, runtime, manifest=manifest, threads=threads)
        except formats.MissingFormat as missing:
            skipped[runtime] = str(missing)
            continue
        predict, provider, used_threads = loaded.predict, loaded.provider, loaded.threads
        for batch in batch_sizes:
            x = rng.uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
            samples = time_calls(lambda: predict(x), warmup=warmup, iterations=iterations, duration=duration)
            stats = percentiles(samples)
            result = Result(runtime, batch, len(samples), **stats, images_per_sec=batch * 1000 / stats["mean_ms"],
                            provider=provider, threads=used_threads)
            results.append(result)
            log(f"{runtime:12s} batch {batch:3d}: p50 {result.p50_ms:8.3f} ms  p99 {result.p99_ms:8.3f} ms  "
                f"{result.images_per_sec:9.1f} img/s")
    if not results:
        # Nothing requested exists: an empty result file would read as a benchmark that ran.
        raise UserError("nothing to measure: " + "; ".join(f"{r}: {why}" for r, why in skipped.items()))
    for runtime, why in skipped.items():
        log(f"skipped {runtime}: {why}")
    now = datetime.now(timezone.utc)
    stored = InprocessBench(model=manifest.name, version=manifest.version, created_at=_stamp(now), machine=facts(),
                            versions=machine.package_versions(), results=results, skipped=skipped)
    return _save(model_dir, stored, now)


def _stamp(now: datetime) -> str:
    return now.isoformat(timespec="seconds")


def _save(model_dir: Path, result: BenchResult, now: datetime) -> dict[str, Any]:
    """Store `result` under the model's bench/ folder; returns it as written, with its `path`."""
    path = result.write(ModelFolder(Path(model_dir)).bench_dir / f"{result.kind}-{now:%Y%m%d-%H%M%S}.json")
    return {**result.to_dict(), "path": str(path)}


# ---- over HTTP ------------------------------------------------------------------------------

def check_url(url: str, allow_remote: bool = True) -> str:
    """A running service's --url (bench and eval): http(s) with a host, its trailing / dropped; a load test
    (allow_remote False) stays on a loopback address."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"--url must look like http://127.0.0.1:3000, not '{url}'")
    if parsed.hostname not in LOOPBACK and not allow_remote:
        raise UserError(f"--url {parsed.hostname} is not a loopback address; load tests stay on this machine "
                        "unless you pass --allow-remote")
    return url.rstrip("/")


def sample_uploads(hw: tuple[int, int], n: int = 16, folder: Path | None = None) -> list[bytes]:
    """PNG uploads: images from `folder` if given, else generated shapes at the model's input size."""
    from PIL import Image  # noqa: PLC0415

    from serving.base import images  # noqa: PLC0415

    if folder is not None:
        files = sorted(p for p in Path(folder).rglob("*") if images.is_image_path(p))[:n]
        if not files:
            raise UserError(f"--images {folder}: no image files")
        return [p.read_bytes() for p in files]
    out = []
    for img in _shapes(n, hw, seed=7):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _shapes(n: int, hw: tuple[int, int], *, seed: int) -> np.ndarray:
    """n (H, W, 3) uint8 images: a bright disc, square or ring on a dark background with pixel noise.

    The colours, sizes and noise of training.data.sources's synthetic shapes (so PNGs of about the same size and
    decode cost), drawn here so that a load test needs neither training/ nor a dataset."""
    rng = np.random.default_rng(seed)
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        dx, dy = xx - rng.uniform(0.35, 0.65), yy - rng.uniform(0.35, 0.65)
        r = rng.uniform(0.18, 0.3)
        dist = np.sqrt(dx**2 + dy**2)
        mask = [dist < r, (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85), (dist < r) & (dist > r * 0.55)][i % 3]
        background, colour = rng.uniform(0, 110, 3), rng.uniform(130, 255, 3)
        pixels = np.where(mask[..., None], colour, background) + rng.normal(0, 12, (h, w, 3))
        out[i] = np.clip(pixels, 0, 255).astype(np.uint8)
    return out


async def _load(url: str, uploads: list[bytes], clients: int, requests: int, warmup: int, timeout: float,
                max_seconds: float) -> tuple[list[float], int, float]:
    """`clients` keep-alive connections posting uploads in turn: (latencies ms, errors, wall seconds).

    One event loop with aiohttp and multipart bodies encoded before the clock starts: the load
    generator shares the machine with the server, and a thread per client with a synchronous
    client measured about 1 ms of client CPU per request, enough to cap both servers alike."""
    import asyncio  # noqa: PLC0415

    import aiohttp  # noqa: PLC0415 (a bentoml dependency)
    from urllib3 import encode_multipart_formdata  # noqa: PLC0415

    bodies = [encode_multipart_formdata({"image": (f"{i}.png", data, "image/png")}) for i, data in enumerate(uploads)]
    latencies: list[float] = []
    errors = 0
    counter = iter(range(requests))

    async def post(session: aiohttp.ClientSession, i: int) -> bool:
        body, content_type = bodies[i % len(bodies)]
        try:
            async with session.post(url, data=body, headers={"Content-Type": content_type}) as r:
                await r.read()
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def client(session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal errors
        while time.monotonic() < deadline and (i := next(counter, None)) is not None:
            t0 = time.perf_counter()
            if await post(session, i):
                latencies.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        # Warm-up opens every connection, off the clock.
        await asyncio.gather(*(post(session, 0) for _ in range(max(warmup, clients))))
        start = time.perf_counter()
        deadline = time.monotonic() + max_seconds
        await asyncio.gather(*(client(session, deadline) for _ in range(clients)))
    return latencies, errors, time.perf_counter() - start


def inprocess_p50_ms(model_dir: Path, hw: tuple[int, int]) -> float:
    """The floor under any HTTP figure: onnxruntime fp32 p50 at batch 1, in this process."""
    from serving.sessions import load  # noqa: PLC0415

    model = load(model_dir, "onnx")
    x = np.random.default_rng(0).uniform(0, 255, (1, *hw, 3)).astype(np.float32)
    return percentiles(time_calls(lambda: model.predict(x), warmup=10, iterations=200, duration=None))["p50_ms"]


def bench_http(url: str, *, concurrency: tuple[int, ...] = (1, 8, 32), requests: int = 200, warmup: int = 10,
               timeout: float = 30.0, uploads: list[bytes] | None = None, log: Callable[[str], None] = print,
               model_dir: Path | None = None, max_seconds: float = 120.0) -> dict[str, Any]:
    """POST real image uploads to URL/predict from `c` concurrent clients; bounded by `requests` and `max_seconds`."""
    import asyncio  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    if requests < 1 or any(c < 1 for c in concurrency):
        raise UserError("--requests and --concurrency must be positive")
    try:
        meta = httpx.get(f"{url}/metadata", timeout=timeout).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise UserError(f"no tlserve service answering at {url} ({exc.__class__.__name__})") from None
    hw = (int(meta["input"]["shape"][1]), int(meta["input"]["shape"][2]))
    uploads = uploads or sample_uploads(hw)
    results = []
    for c in concurrency:
        latencies, errors, wall = asyncio.run(_load(f"{url}/predict", uploads, c, requests, warmup, timeout, max_seconds))
        stats = percentiles(latencies) if latencies else {k: None for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms")}
        row = HttpRow(concurrency=c, requests=len(latencies) + errors, errors=errors, **stats,
                      requests_per_sec=len(latencies) / wall if wall else None)
        results.append(row)
        log(f"concurrency {c:3d}: p50 {row.p50_ms or 0:8.3f} ms  p99 {row.p99_ms or 0:8.3f} ms  "
            f"{row.requests_per_sec or 0:8.1f} req/s  errors {errors}")
    floor = None
    if model_dir is not None:
        floor = inprocess_p50_ms(model_dir, hw)
        for row in results:
            row.overhead_ms_p50 = row.p50_ms - floor if row.p50_ms is not None else None
    server_keys = ("name", "version", "provider", "max_batch_size", "ort_spin", "lone_session")
    now = datetime.now(timezone.utc)
    result = HttpBench(created_at=_stamp(now), machine=machine.machine_facts(), url=url,
                       server={k: meta.get(k) for k in server_keys}, inprocess_onnx_p50_ms=floor, results=results)
    if model_dir is None:
        return result.to_dict()
    manifest = Manifest.load(model_dir)
    result.model, result.version, result.versions = manifest.name, manifest.version, machine.package_versions()
    return _save(model_dir, result, now)

