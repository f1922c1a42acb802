"""One /predict_batch of 64 large images: the worker's peak memory, and small requests served meanwhile.

    .venv/bin/python benchmarks/batch_memory.py [MODEL_DIR] [--images 64] [--side 6000]

Without MODEL_DIR it trains and exports a tiny CNN on synthetic data once (benchmarks/.work/).
It starts the real service on 127.0.0.1 (request byte and pixel limits raised so the batch is
accepted), times 300 small /predict requests on the idle server, then sends ONE /predict_batch of
single-colour side x side PNGs while another thread keeps sending small /predict requests. A third
thread samples the RSS of the server's processes every 20 ms. Prints the peak worker RSS (target
under 1 GB), the idle p50, the small requests' p50 and max during the batch (target within 2x of
idle), and the batch's status and time.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import psutil
from PIL import Image

from http_overhead import free_port, start, stop  # the server start and stop the other HTTP benchmark uses

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / ".work"
BIN = Path(sys.executable).parent
TIMEOUT_S = 300  # the heavy request; small ones get 30 s


def tiny_model() -> Path:
    """A 1-epoch CNN on synthetic data, trained and exported by the CLI once, reused afterwards."""
    model = WORK / "models" / "batch-memory-cnn"
    if not (model / "manifest.json").is_file():
        env = {**os.environ, "TLSERVE_HOME": str(WORK), "TF_USE_LEGACY_KERAS": "1"}
        for args in (["train", "--data", "synthetic", "-b", "cnn", "--epochs", "1", "--name", "batch-memory-cnn",
                      "--runs-dir", str(WORK / "runs")],
                     ["export", "batch-memory-cnn", "--runs-dir", str(WORK / "runs"), "--models-dir", str(WORK / "models"),
                      "--overwrite", "--no-register"]):
            subprocess.run([str(BIN / "tlserve"), *args], env=env, check=True, timeout=1800)
    return model


def single_colour_png(side: int, colour: tuple[int, int, int]) -> bytes:
    """A side x side RGB PNG of one colour, written row by row (Pillow would first build the 108 MB image)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    row = b"\0" + bytes(colour) * side
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def small_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 80, 40)).save(buf, "PNG")
    return buf.getvalue()


class RssSampler(threading.Thread):
    """Max RSS of each process under the server's root process, sampled until stopped."""

    def __init__(self, root_pid: int, every_s: float = 0.02):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop = psutil.Process(root_pid), every_s, threading.Event()
        self.peak: dict[int, int] = {}
        self.names: dict[int, str] = {}

    def current(self) -> dict[int, int]:
        out = {}
        for proc in self.root.children(recursive=True):
            try:
                out[proc.pid] = proc.memory_info().rss
                self.names.setdefault(proc.pid, " ".join(proc.cmdline()[-4:])[-60:])
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, rss in self.current().items():
                self.peak[pid] = max(rss, self.peak.get(pid, 0))
            time.sleep(self.every_s)


def predict_small(client: httpx.Client, url: str, data: bytes) -> float:
    started = time.perf_counter()
    r = client.post(f"{url}/predict", files={"image": ("small.png", data)}, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"small /predict answered {r.status_code}: {r.text[:200]}")
    return (time.perf_counter() - started) * 1000


def serve(model: Path, url: str, images: int, side: int) -> subprocess.Popen:
    """The service at `url` (127.0.0.1), ready, its limits raised to take the whole batch in one request."""
    env = {"TLSERVE_MODEL": str(model), "TLSERVE_MAX_REQUEST_BYTES": str(256 * 2**20),
           "TLSERVE_MAX_REQUEST_PIXELS": str(images * side**2)}
    return start([str(BIN / "bentoml"), "serve", "serving.service:ImageClassifier", "--host", "127.0.0.1",
                  "--port", url.rsplit(":", 1)[1]], env, url, "/readyz")


def during_batch(url: str, batch: list, small: bytes, sampler: RssSampler) -> tuple[list[float], list[str], dict]:
    """Send the heavy batch and, while it runs, small /predict requests every 10 ms; the server's RSS is
    sampled throughout. (latencies of small requests that overlapped it end to end, failures, the batch's answer)"""
    during: list[float] = []
    failed: list[str] = []  # small requests that timed out or failed during the batch
    heavy: dict[str, float] = {}
    heavy_done = threading.Event()

    def send_heavy() -> None:
        started = time.perf_counter()
        try:
            r = httpx.post(f"{url}/predict_batch", files=batch, timeout=TIMEOUT_S)
            heavy["status"] = r.status_code
            heavy["answers"] = len(r.json().get("predictions", [])) if r.status_code == 200 else 0
        except httpx.HTTPError as exc:
            heavy["status"], heavy["error"] = -1, str(exc)
        heavy["seconds"] = time.perf_counter() - started
        heavy_done.set()

    def send_small() -> None:
        with httpx.Client() as client:
            while not heavy_done.is_set():
                started = time.perf_counter()
                try:
                    ms = predict_small(client, url, small)
                except (httpx.HTTPError, SystemExit) as exc:
                    failed.append(f"{exc.__class__.__name__}: {exc}"[:120])
                    continue
                if not heavy_done.is_set():  # only requests that overlapped the batch end to end
                    during.append(ms)
                time.sleep(max(0.0, 0.01 - (time.perf_counter() - started)))

    sampler.start()
    threads = [threading.Thread(target=send_heavy), threading.Thread(target=send_small)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S + 30)
    sampler.stop.set()
    sampler.join(5)
    return during, failed, heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=6000)
    args = parser.parse_args()
    model = (args.model_dir or tiny_model()).resolve()
    colours = [((37 * i) % 256, (91 * i) % 256, (53 * i) % 256) for i in range(8)]
    pngs = {c: single_colour_png(args.side, c) for c in colours}  # 8 colours, each file repeated
    batch = [("images", (f"{n}.png", pngs[colours[n % len(colours)]], "image/png")) for n in range(args.images)]
    body_mb = sum(len(f[1][1]) for f in batch) / 2**20
    small = small_png()

    url = f"http://127.0.0.1:{free_port()}"
    proc = serve(model, url, args.images, args.side)
    try:
        sampler = RssSampler(proc.pid)
        with httpx.Client() as client:
            for _ in range(20):
                predict_small(client, url, small)  # warm-up
            # Enough idle samples for a steady median: this VM's idle latency moves by 2x between runs of 30.
            idle = [predict_small(client, url, small) for _ in range(300)]
        rss_before = sampler.current()
        during, failed, heavy = during_batch(url, batch, small, sampler)
    finally:
        stop(proc)

    top = max(sampler.peak, key=sampler.peak.__getitem__)  # the worker: the process that loads the model
    idle_p50 = statistics.median(idle)
    print(f"model {model.name}; batch: {args.images} single-colour {args.side}x{args.side} PNGs, {body_mb:.1f} MB body, "
          f"{args.images * args.side**2 / 1e6:,.0f} megapixels")
    print("server processes, RSS before -> peak during the batch:")
    for pid in sorted(sampler.peak):
        print(f"  pid {pid:>7}  {rss_before.get(pid, 0) / 2**20:7.0f} MB -> {sampler.peak[pid] / 2**20:7.0f} MB  "
              f"{sampler.names.get(pid, '')}")
    print(f"peak worker RSS: {sampler.peak[top] / 2**20:.0f} MB (target < 1024 MB)")
    print(f"idle small /predict p50 over {len(idle)}: {idle_p50:.2f} ms")
    if during:
        print(f"small /predict during the batch ({len(during)} requests): p50 {statistics.median(during):.2f} ms "
              f"({statistics.median(during) / idle_p50:.2f}x idle, target <= 2x), max {max(during):.2f} ms")
    else:
        print("small /predict during the batch: none completed while it ran")
    if failed:
        print(f"small /predict failures during the batch: {len(failed)}, first: {failed[0]}")
    print(f"heavy /predict_batch: status {heavy.get('status')}, {heavy.get('answers', 0)} answers, "
          f"{heavy.get('seconds', float('nan')):.2f} s{'; ' + heavy['error'] if 'error' in heavy else ''}")


if __name__ == "__main__":
    main()
