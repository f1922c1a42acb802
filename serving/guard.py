"""Request checks in front of BentoML's endpoints: every client mistake is a 4xx JSON answer.

BentoML 1.4 validates a request while parsing it, outside the endpoint: a
non-image upload, an unknown multipart field or JSON where a file belongs comes
back as a 500 or as a 400 logged at ERROR with a traceback, there is no request
size limit, and a JSON body holding a URL makes the server download it. This
ASGI middleware sees each image request first: it bounds the body, parses the
multipart form, checks the field names and decodes every image once with
serving.base.images (bombs refused by header), straight to the model's input size.

It then answers the request itself with the service's `classify`, the same function the
endpoints call, rather than passing it on to BentoML's endpoint layer, which would parse and spool
the upload again: about a third of the server's time for a 32x32 upload (docs/decisions.md, "The
guard answers the image routes"). BentoML's own middleware (metrics, tracing, access log,
concurrency limit) sits outside this one and still sees every request; the endpoints stay declared,
so the OpenAPI page and BentoML's clients describe and call the same routes.
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable

from serving.base import images
from serving.settings import ServiceSettings, confidence_threshold, flag, score_threshold

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

IMAGE_ROUTES = {"/predict": ("image", False), "/predict_batch": ("images", True)}
OPTIONAL_FIELDS = {"top_k", "min_confidence", "abstain_ood", "ood_threshold"}
MAX_BATCH_FILES = 64
# Images up to this many pixels (by header) decode on the event loop, larger ones on a thread: a hop
# to the thread costs more than decoding a small image (docs/decisions.md, "Small images decode inline").
INLINE_DECODE_PIXELS = 256 * 256


@dataclass
class GuardState:
    """What the guard needs from the service, handed to both by serving/service.py: the guard is
    created before the model loads, and the service fills this in once it has."""
    input_hw: tuple[int, int] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The service's classify(decoded images, top_k, batch=..., min_confidence=...) -> the JSON answer;
    # None until loaded.
    classify: Optional[Callable[..., Awaitable[dict[str, Any]]]] = None
    # Requests now waiting for or running on the model (uploads still arriving or decoding are not
    # counted): the batching thread reads it to tell a request served alone from one on a busy server.
    in_flight: int = 0



class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestGuard:
    def __init__(self, app, state: GuardState, max_bytes: int = ServiceSettings.max_request_bytes,
                 max_pixels: int = ServiceSettings.max_pixels,
                 max_request_pixels: int = ServiceSettings.max_request_pixels,
                 body_timeout_s: float = ServiceSettings.body_timeout_s):
        self.app, self.state, self.max_bytes, self.max_pixels = app, state, max_bytes, max_pixels
        self.max_request_pixels, self.body_timeout_s = max_request_pixels, body_timeout_s
        self._decoder: ThreadPoolExecutor | None = None

    def _decode_pool(self) -> ThreadPoolExecutor:
        """One thread for large images, created on first use: a heavy request takes one core at most,
        and as each request waits for its image before sending the next, another request's image
        waits behind one decode, not behind a whole batch. Pillow releases the GIL while it decodes."""
        if self._decoder is None:
            self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tlserve-decode",
                                               initializer=_yield_cpu)
        return self._decoder

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path in ("/metadata", "/metadata/"):
            if method != "GET":
                return await _json(send, 405, {"error": "use GET /metadata"})
            if not self.state.metadata:
                return await _json(send, 503, {"error": "model is still loading"})
            return await _json(send, 200, self.state.metadata)
        if path not in IMAGE_ROUTES and path != "/infer":
            return await self.app(scope, receive, send)
        if method != "POST":
            return await _json(send, 405, {"error": f"use POST {path}"})
        return await self._handle(scope, receive, send, path)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        try:
            body = await self._read_body(scope, receive)
            if path == "/infer":
                _check_infer(body, self.state.input_hw)
                return await self._counted(self.app(scope, _replay(body, receive), send))
            field_name, many = IMAGE_ROUTES[path]
            decoded, top_k, min_confidence, ood = await self._images(scope, body, field_name, many)
        except RequestError as exc:
            return await _json(send, exc.status, {"error": str(exc)})
        if self.state.classify is None:
            return await _json(send, 503, {"error": "model is still loading"})
        try:
            answer = await self._counted(self.state.classify(decoded, top_k, batch=many, min_confidence=min_confidence,
                                                             **ood))
        except ServiceUnavailable as exc:  # the batching queue is over its latency bound
            return await _json(send, 503, {"error": str(exc)})
        except InvalidArgument as exc:  # a request the model cannot answer as asked (OOD fields, no score)
            return await _json(send, 400, {"error": str(exc)})
        await _json(send, 200, answer)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise RequestError(413, f"request of {int(declared):,} bytes is over the {self.max_bytes:,}-byte limit")
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"no request body data for {self.body_timeout_s:g} s; "
                                        "send the whole body the Content-Length announces") from None
            if message["type"] == "http.disconnect":
                raise RequestError(400, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestError(413, f"request is over the {self.max_bytes:,}-byte limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _images(self, scope: Scope, body: bytes, field_name: str,
                      many: bool) -> tuple[list, int | None, float | None, dict[str, Any]]:
        from starlette.requests import Request  # noqa: PLC0415

        hint = f"send the image{'s' if many else ''} as multipart/form-data field '{field_name}'"
        if not body:
            raise RequestError(400, f"empty request; {hint}")
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(415, f"expected multipart/form-data, got '{content_type or 'no content type'}'; {hint}")
        try:
            form = await Request(scope, _replay(body)).form(max_files=MAX_BATCH_FILES, max_fields=8)
        except Exception as exc:  # python-multipart and Starlette raise several types for a malformed body
            raise RequestError(400, f"malformed multipart body ({exc}); {hint}") from None
        try:
            unknown = sorted(set(form.keys()) - {field_name} - OPTIONAL_FIELDS)
            if unknown:
                raise RequestError(400, f"unknown field '{unknown[0]}'; {hint}")
            top_k = form.get("top_k")
            if top_k is not None and (not isinstance(top_k, str) or not top_k.strip().isdigit()
                                      or not 1 <= int(top_k) <= 1000):
                raise RequestError(400, "top_k must be a whole number from 1 to 1000")
            min_confidence = form.get("min_confidence")
            if min_confidence is not None:
                threshold = confidence_threshold(min_confidence) if isinstance(min_confidence, str) else None
                if threshold is None:
                    raise RequestError(400, f"min_confidence must be a probability between 0 and 1 (both excluded), "
                                            f"not {str(min_confidence)[:40]!r}")
                min_confidence = threshold
            ood = _ood_fields(form)
            uploads = form.getlist(field_name)
            if not uploads:
                raise RequestError(400, f"no '{field_name}' field; {hint}")
            if len(uploads) > 1 and not many:
                raise RequestError(400, "one image per request on /predict; use /predict_batch for several")
            files = []
            for n, upload in enumerate(uploads):
                if isinstance(upload, str):
                    raise RequestError(400, f"field '{field_name}' must be a file upload, not text")
                files.append((upload.filename or f"{field_name}[{n}]", await upload.read()))
        finally:
            await form.close()
        return await self._decode(files), int(top_k) if top_k is not None else None, min_confidence, ood

    async def _decode(self, files: list[tuple[str, bytes]]) -> list[np.ndarray]:
        """Each upload as a model-sized uint8 array, one at a time, so no two full-size images of a
        request are alive together; the request's pixels are bounded from the headers first."""
        input_hw = self.state.input_hw
        if input_hw is None:
            raise RequestError(503, "model is still loading")
        try:
            sizes = [images.header_size(data, max_pixels=self.max_pixels, name=label) for label, data in files]
        except images.ImageError as exc:
            raise _image_error(exc) from None
        pixels = [width * height for width, height in sizes]
        if sum(pixels) > self.max_request_pixels:
            raise RequestError(413, f"the images hold {sum(pixels):,} pixels in all, over the per-request limit "
                                    f"of {self.max_request_pixels:,}; send fewer or smaller images per request")
        interpolation = self.state.metadata.get("input", {}).get("interpolation", images.DEFAULT_INTERPOLATION)
        loop = asyncio.get_running_loop()
        arrays = []
        for (label, data), count in zip(files, pixels):
            decode = functools.partial(images.load_array, data, input_hw, interpolation=interpolation,
                                       max_pixels=self.max_pixels, name=label)
            try:
                arrays.append(decode() if count <= INLINE_DECODE_PIXELS
                              else await loop.run_in_executor(self._decode_pool(), decode))
            except images.ImageError as exc:
                raise _image_error(exc) from None
        return arrays

    async def _counted(self, call: Awaitable[Any]) -> Any:
        """Await a call on the model, counted in state.in_flight while it waits and runs."""
        self.state.in_flight += 1
        try:
            return await call
        finally:
            self.state.in_flight -= 1


def _ood_fields(form) -> dict[str, Any]:
    """The request's abstain_ood (true/false) and ood_threshold (a positive score), as classify's keywords."""
    out: dict[str, Any] = {}
    raw = form.get("abstain_ood")
    if raw is not None:
        out["abstain_ood"] = flag(raw) if isinstance(raw, str) else None
        if out["abstain_ood"] is None:
            raise RequestError(400, f"abstain_ood must be true or false, not {str(raw)[:40]!r}")
    raw = form.get("ood_threshold")
    if raw is not None:
        out["ood_threshold"] = score_threshold(raw) if isinstance(raw, str) else None
        if out["ood_threshold"] is None:
            raise RequestError(400, f"ood_threshold must be a positive number (an OOD score), not {str(raw)[:40]!r}")
    return out


def _yield_cpu() -> None:
    """Linux's nice value is per thread: the decode thread gives way to the event loop and onnxruntime
    (small requests' p50 during a large-image batch: 5.3 ms -> 3.9 ms; docs/decisions.md)."""
    if sys.platform == "linux":
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 19)
        except OSError:  # an initializer that raises would break the pool; equal priority still works
            pass


def _image_error(exc: images.ImageError) -> RequestError:
    return RequestError(413 if isinstance(exc, images.ImageTooLarge) else 400, str(exc))


def _check_infer(body: bytes, hw: tuple[int, int] | None) -> None:
    """The batchable /infer API concatenates callers' arrays: one wrong shape would fail everyone's batch."""
    try:
        payload = json.loads(body or b"{}")
        array = np.asarray(payload.get("images"), dtype=np.float32)
    except (ValueError, TypeError, AttributeError):
        raise RequestError(400, "expected JSON {\"images\": [N, H, W, 3] pixel array}") from None
    if array.ndim != 4 or (hw is not None and array.shape[1:] != (*hw, 3)) or len(array) == 0:
        expected = f"(N, {hw[0]}, {hw[1]}, 3)" if hw else "(N, H, W, 3)"
        raise RequestError(400, f"images must have shape {expected}, got {tuple(array.shape)}")


def _replay(body: bytes, then: Receive | None = None) -> Receive:
    """Hand the buffered body on once; afterwards wait on the real channel (for a disconnect)."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await then() if then is not None else {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
