"""Upload limits: pixels per request, a stalled body, and decoding large images straight to the model's size."""
from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from conftest import bentoml_server
from serving.base import images
from serving.base.errors import UserError

MAX_REQUEST_PIXELS = 30_000_000  # three 3000x3000 images pass, two 4000x4000 do not
BODY_TIMEOUT_S = 1
HEADER_TIMEOUT_S = 1
SLOW_CLIENTS = 40  # connections that trickle a header and never finish it


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("limits-server") / "server.log"


@pytest.fixture(scope="module")
def server(cnn_model, server_log):
    env = {"TLSERVE_MODEL": str(cnn_model), "TLSERVE_MAX_REQUEST_PIXELS": str(MAX_REQUEST_PIXELS),
           "TLSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S), "TLSERVE_MAX_REQUEST_BYTES": str(64 * 2**20),
           "TLSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S)}
    with bentoml_server(["serving.service:ImageClassifier"], env, server_log) as url:
        yield url


def _encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose pixel data is cut short: only a decode would notice."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Photo-like pixels: random structure at several scales (roughly 1/f) plus sensor noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 3))
    for cells, amplitude in ((4, 60), (12, 30), (48, 15), (200, 8)):
        coarse = Image.fromarray(rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8))
        out += (np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), float) - 128) * amplitude / 128
    return np.clip(128 + out + rng.normal(0, 6, out.shape), 0, 255).astype(np.uint8)


def _small_png() -> bytes:
    return _encode(Image.new("RGB", (32, 32), (90, 140, 200)))


# --- serving/base/images.py --------------------------------------------------------------------------------------


def _full_resolution_resize(data: bytes, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """What load_array returned before: the whole image decoded, then one resize."""
    full = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(full.resize((size[1], size[0]), images.INTERPOLATIONS[interpolation]))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "area", "lanczos"])
def test_large_png_is_reduced_close_to_a_full_resolution_resize(monkeypatch, interpolation):
    data = _encode(Image.fromarray(_photo(2400, 3000)))
    reduced = []
    original_reduce = Image.Image.reduce
    monkeypatch.setattr(Image.Image, "reduce", lambda self, *a, **k: reduced.append(self.size) or original_reduce(self, *a, **k))
    pixels = images.load_array(data, (32, 32), interpolation=interpolation)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    assert reduced, "a 3000x2400 image for a 32x32 model should be reduced before its final resize"
    diff = np.abs(pixels.astype(int) - _full_resolution_resize(data, (32, 32), interpolation).astype(int))
    assert diff.mean() < 2, diff.mean()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "area", "lanczos"])
def test_large_jpeg_is_decoded_scaled_down_close_to_a_full_resolution_resize(monkeypatch, interpolation):
    data = _encode(Image.fromarray(_photo(2400, 3000, seed=1)), "JPEG", quality=90)
    decoded_sizes = []
    original_load = JpegImagePlugin.JpegImageFile.load
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load",
                        lambda self: decoded_sizes.append(self.size) or original_load(self))
    pixels = images.load_array(data, (32, 32), interpolation=interpolation)
    # DCT scaling by 1/8 keeps 375x300, still over 4x the 32x32 target
    assert set(decoded_sizes) == {(375, 300)}
    diff = np.abs(pixels.astype(int) - _full_resolution_resize(data, (32, 32), interpolation).astype(int))
    assert diff.mean() < 2, diff.mean()


@pytest.mark.fast
def test_small_images_are_resized_as_before():
    """Under REDUCING_GAP x the target nothing changes: the same single resize as a full decode."""
    for fmt in ("PNG", "JPEG"):
        data = _encode(Image.fromarray(_photo(100, 120, seed=2)), fmt)
        np.testing.assert_array_equal(images.load_array(data, (32, 32)), _full_resolution_resize(data, (32, 32), "bilinear"))


@pytest.mark.fast
def test_too_large_is_refused_from_the_header():
    bomb = _png_header_only(8000, 6000)  # no pixel data to decode: refused before any decode
    with pytest.raises(images.ImageTooLarge, match="8000x6000 is larger than the 40,000,000-pixel limit"):
        images.header_size(bomb, max_pixels=40_000_000, name="bomb.png")
    with pytest.raises(images.ImageTooLarge):
        images.load_array(bomb, (32, 32), max_pixels=40_000_000)
    assert images.header_size(bomb, max_pixels=50_000_000) == (8000, 6000)
    with pytest.raises(images.ImageError) as not_image:
        images.header_size(b"not an image")
    assert not isinstance(not_image.value, images.ImageTooLarge)


# --- settings ------------------------------------------------------------------------------------------------


@pytest.mark.fast
def test_upload_settings_are_checked():
    from serving.settings import ServiceSettings

    defaults = ServiceSettings.from_env({})
    assert defaults.max_request_pixels == 256_000_000 and defaults.body_timeout_s == 5
    custom = ServiceSettings.from_env({"TLSERVE_BODY_TIMEOUT_S": "0.5", "TLSERVE_MAX_REQUEST_PIXELS": "1000"})
    assert custom.body_timeout_s == 0.5 and custom.max_request_pixels == 1000
    for name, bad in [("TLSERVE_BODY_TIMEOUT_S", v) for v in ("0", "-1", "soon", "nan", "inf", "")] + \
                     [("TLSERVE_MAX_REQUEST_PIXELS", v) for v in ("0", "-5", "1.5", "lots")]:
        with pytest.raises(UserError) as exc:
            ServiceSettings.from_env({name: bad})
        assert name in str(exc.value) and "\n" not in str(exc.value), (name, bad)


# --- the real server -----------------------------------------------------------------------------------------


def test_too_many_pixels_per_request_is_413_before_any_decode(server, server_log):
    # Each image is under the per-image limit (40 MP); together 32 MP is over the request's 30 MP. The pixel
    # data is cut short, so a decode would answer 400: a 413 shows the sum was checked from the headers.
    files = [("images", (f"{n}.png", _png_header_only(4000, 4000), "image/png")) for n in range(2)]
    r = httpx.post(f"{server}/predict_batch", files=files, timeout=30)
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert "32,000,000 pixels" in r.json()["error"] and "30,000,000" in r.json()["error"]
    ok = httpx.post(f"{server}/predict", files={"image": ("ok.png", _small_png())}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert "Traceback" not in server_log.read_text()


def test_stalled_body_is_408_within_seconds(server, server_log):
    host, port = server.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(head + b"--x\r\nabcd")  # 10 of the 100,000 bytes announced, then nothing
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    elapsed = time.monotonic() - started
    status = int(answer.split(b" ", 2)[1])
    assert status == 408, answer[:300]
    assert elapsed < BODY_TIMEOUT_S + 4, elapsed
    assert "no request body data" in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    ok = httpx.post(f"{server}/predict", files={"image": ("ok.png", _small_png())}, timeout=30)
    assert ok.status_code == 200, ok.text
    assert "Traceback" not in server_log.read_text()


def test_partial_headers_are_closed_within_the_bound(server, server_log):
    """Slow-header clients (each trickling a header line every 0.3 s, which resets uvicorn's keep-alive
    timer) get a 408 and a closed connection once TLSERVE_HEADER_TIMEOUT_S has passed (issue 29)."""
    host, port = server.removeprefix("http://").split(":")
    sockets = [socket.create_connection((host, int(port)), timeout=1) for _ in range(SLOW_CLIENTS)]
    started = time.monotonic()
    answers: dict[int, bytes] = {}
    try:
        for sock in sockets:
            sock.sendall(f"GET /metadata HTTP/1.1\r\nHost: {host}\r\n".encode())
            sock.setblocking(False)
        while len(answers) < len(sockets) and time.monotonic() - started < HEADER_TIMEOUT_S + 5:
            time.sleep(0.3)
            for n, sock in enumerate(sockets):
                if n in answers:
                    continue
                try:
                    chunk = sock.recv(4096)
                except BlockingIOError:  # nothing from the server yet: one more header line
                    with contextlib.suppress(OSError):
                        sock.sendall(b"X-Slow: 1\r\n")
                    continue
                except OSError:  # reset after the server closed it
                    chunk = b"(reset)"
                answers[n] = chunk or b"(closed)"
        elapsed = time.monotonic() - started
    finally:
        for sock in sockets:
            sock.close()
    assert len(answers) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(answers)} slow connections still open after {elapsed:.1f} s"
    assert elapsed < HEADER_TIMEOUT_S + 3, elapsed
    timed_out = [a for a in answers.values() if a.startswith(b"HTTP/1.1 408")]
    assert timed_out and b"request headers not complete" in timed_out[0], answers
    with httpx.Client(timeout=30) as client:  # a client that sends its header at once is served, kept alive or not
        assert client.get(f"{server}/metadata").status_code == 200
        time.sleep(HEADER_TIMEOUT_S + 0.5)
        assert client.get(f"{server}/metadata").status_code == 200
    assert "Traceback" not in server_log.read_text()


def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_large_images_predict_like_their_resized_copies(server, sample_images):
    """3000x3000 uploads, decoded and reduced in the server's decode thread, against the same pictures
    resized at full resolution on the client: the same top-1 and close probabilities."""
    meta = httpx.get(f"{server}/metadata", timeout=10).json()
    h, w = meta["input"]["shape"][1:3]
    rng = np.random.default_rng(3)
    large, small = [], []
    for n, path in enumerate(sorted(sample_images.iterdir())[:3]):
        picture = Image.open(path).convert("RGB").resize((3000, 3000), Image.Resampling.BICUBIC)
        noisy = np.clip(np.asarray(picture, np.int16) + rng.integers(-4, 5, (3000, 3000, 3)), 0, 255).astype(np.uint8)
        picture = Image.fromarray(noisy)
        fmt = "JPEG" if n % 2 else "PNG"
        data = _encode(picture, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        large.append(("images", (f"{n}.{fmt.lower()}", data)))
        resized = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((w, h), Image.Resampling.BILINEAR))
        small.append(("images", (f"{n}-small.png", _encode(Image.fromarray(resized)))))
    got = httpx.post(f"{server}/predict_batch", files=large, data={"top_k": "1000"}, timeout=60)
    want = httpx.post(f"{server}/predict_batch", files=small, data={"top_k": "1000"}, timeout=60)
    assert got.status_code == 200 and want.status_code == 200, (got.text, want.text)
    for g, e in zip(got.json()["predictions"], want.json()["predictions"]):
        assert g["top"][0]["label"] == e["top"][0]["label"]
        probs = {t["label"]: t["probability"] for t in e["top"]}
        assert max(abs(t["probability"] - probs[t["label"]]) for t in g["top"]) < 0.05
