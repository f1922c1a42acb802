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


# --- one rule for every field, truncated bodies, /infer's keys, BentoML's plain-text errors (issue 29) ---


def _form(parts: list[tuple[str, str | bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    """A multipart body: text fields as given, bytes as file uploads."""
    body = b""
    for name, value in parts:
        if isinstance(value, bytes):
            body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n"
                     "Content-Type: image/png\r\n\r\n").encode() + value + b"\r\n"
        else:
            body += f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode()
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _loaded_guard() -> RequestGuard:
    async def classify(decoded, top_k, *, batch, min_confidence=None):
        top, model = [{"label": "red", "probability": 1.0}], {"model": "m", "version": "1"}
        return {"predictions": [{"top": top}] * len(decoded), **model} if batch else {"top": top, **model}

    return RequestGuard(_downstream, GuardState(input_hw=(8, 8), metadata={"name": "m", "version": "1"}, classify=classify))


def test_a_repeated_field_is_400_naming_it_whichever_field_it_is():
    guard, png = _loaded_guard(), _png((10, 10))
    for route, parts, field in [
        ("/predict", [("image", png), ("top_k", "1"), ("top_k", "2")], "top_k"),
        ("/predict", [("image", png), ("min_confidence", "0.5"), ("min_confidence", "0.6")], "min_confidence"),
        ("/predict", [("image", png), ("image", png)], "image"),
        ("/predict_batch", [("images", png), ("top_k", "1"), ("top_k", "1")], "top_k"),
        ("/predict_batch", [("images", png), ("errors", "per-file"), ("errors", "per-file")], "errors"),
    ]:
        status, answer = _call(guard, "POST", route, *_form(parts))
        assert status == 400 and f"field '{field}' given 2 times" in json.loads(answer)["error"], (route, field, answer)
    status, answer = _call(guard, "POST", "/predict_batch", *_form([("images", png), ("images", png), ("top_k", "1")]))
    assert status == 200 and len(json.loads(answer)["predictions"]) == 2  # the batch route's own repeated field


def test_a_truncated_multipart_body_says_so():
    body, kind = _form([("image", _png((10, 10)))])
    for cut in (body[: len(body) // 2], body[:-10]):  # cut in the file, and cut in the closing boundary
        status, answer = _call(_loaded_guard(), "POST", "/predict", cut, kind)
        error = json.loads(answer)["error"]
        assert status == 400 and "truncated" in error and "no 'image' field" not in error, error


def test_infer_names_the_keys_it_got_and_the_one_it_wants():
    guard = RequestGuard(_downstream, GuardState(input_hw=(4, 4)))
    status, answer = _call(guard, "POST", "/infer", json.dumps({"imgs": [1], "extra": 2}).encode(), "application/json")
    error = json.loads(answer)["error"]
    assert status == 400 and "'imgs'" in error and "'extra'" in error and "'images'" in error and "()" not in error
    for body, said in ((b"[1, 2]", "got an array"), (b"{not json", "not JSON"), (b'{"images": "abc"}', "not an array of numbers"), (b'{"images": [1, 2]}', "got (2,)")):
        status, answer = _call(guard, "POST", "/infer", body, "application/json")
        assert status == 400 and said in json.loads(answer)["error"], (body, answer)


def test_plain_text_errors_from_behind_the_guard_become_json():
    async def bentoml_404(scope, receive, send):  # what Starlette answers for a route it does not have
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"9")]})
        await send({"type": "http.response.body", "body": b"Not Found"})

    status, answer = _call(RequestGuard(bentoml_404, GuardState()), "GET", "/no-such-route")
    error = json.loads(answer)["error"]
    assert status == 404 and "GET /no-such-route" in error and "POST /predict" in error


def test_predict_batch_per_file_errors_keep_the_good_files():
    guard, png = _loaded_guard(), _png((10, 10))
    parts = [("images", png), ("images", b"not an image"), ("images", png)]
    status, answer = _call(guard, "POST", "/predict_batch", *_form(parts))
    assert status == 400  # the default: one bad file fails the request, as before
    status, answer = _call(guard, "POST", "/predict_batch", *_form([*parts, ("errors", "per-file")]))
    body = json.loads(answer)
    assert status == 200 and body["failed"] == 1 and body["model"] == "m"
    assert [("top" in p, "error" in p) for p in body["predictions"]] == [(True, False), (False, True), (True, False)]
    assert body["predictions"][1]["status"] == 400 and "not a readable image" in body["predictions"][1]["error"]
    status, answer = _call(guard, "POST", "/predict_batch", *_form([("images", png), ("errors", "some")]))
    assert status == 400 and "per-file" in json.loads(answer)["error"]
