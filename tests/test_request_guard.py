"""The request guard on its own: an ASGI app driven directly, with the state a service would hand it."""
from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image

from serving.guard import GuardState, RequestGuard

pytestmark = pytest.mark.fast


async def _downstream(scope, receive, send):  # BentoML's app behind the guard
    await send({"type": "http.response.start", "status": 299, "headers": []})
    await send({"type": "http.response.body", "body": b"passed on"})


def _call(guard: RequestGuard, method: str, path: str, body: bytes = b"", content_type: str = "") -> tuple[int, bytes]:
    headers = [(b"content-length", str(len(body)).encode())]
    if content_type:
        headers.append((b"content-type", content_type.encode()))
    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    sent: list[dict] = []
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def _multipart(field: str, data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_each_guard_answers_from_the_state_it_was_given():
    loading, loaded = GuardState(), GuardState()
    calls = []

    async def classify(decoded, top_k, *, batch, min_confidence=None):
        calls.append([a.shape for a in decoded])
        assert loaded.in_flight == 1  # counted while the model works on it
        return {"top": [{"label": "red", "probability": 1.0}]}

    loaded.input_hw, loaded.metadata, loaded.classify = (8, 8), {"name": "m"}, classify
    cold, warm = RequestGuard(_downstream, loading), RequestGuard(_downstream, loaded)

    assert _call(cold, "GET", "/metadata")[0] == 503
    assert json.loads(_call(warm, "GET", "/metadata")[1]) == {"name": "m"}
    body, kind = _multipart("image", _png((20, 10)))
    assert _call(cold, "POST", "/predict", body, kind)[0] == 503
    status, answer = _call(warm, "POST", "/predict", body, kind)
    assert status == 200 and json.loads(answer)["top"][0]["label"] == "red"
    assert calls == [[(8, 8, 3)]] and loaded.in_flight == 0  # decoded straight to the state's input size
    assert _call(warm, "GET", "/docs") == (299, b"passed on")


def test_infer_shape_is_checked_against_the_given_state():
    state = GuardState(input_hw=(4, 4))
    guard = RequestGuard(_downstream, state)
    wrong = json.dumps({"images": np.zeros((1, 5, 5, 3)).tolist()}).encode()
    status, body = _call(guard, "POST", "/infer", wrong, "application/json")
    assert status == 400 and "(N, 4, 4, 3)" in json.loads(body)["error"]
    right = json.dumps({"images": np.zeros((2, 4, 4, 3)).tolist()}).encode()
    assert _call(guard, "POST", "/infer", right, "application/json") == (299, b"passed on")


def test_an_image_over_the_pixel_limit_is_413_by_its_type():
    guard = RequestGuard(_downstream, GuardState(input_hw=(8, 8), metadata={"name": "m"}), max_pixels=100)
    body, kind = _multipart("image", _png((20, 10)))
    status, answer = _call(guard, "POST", "/predict", body, kind)
    assert status == 413 and "a.png: 20x10" in json.loads(answer)["error"]
