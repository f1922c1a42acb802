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
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Optional

import numpy as np
from bentoml.exceptions import InvalidArgument, ServiceUnavailable

from serving.base import images
from serving.base.errors import UserError
from serving.settings import ServiceSettings, check_min_confidence, flag, score_threshold

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

IMAGE_ROUTES = {"/predict": ("image", False), "/predict_batch": ("images", True)}
OPTIONAL_FIELDS = {"top_k", "min_confidence", "abstain_ood", "ood_threshold"}
# /predict_batch's errors field: "request" (default) answers a request with one bad file with a 4xx
# for the whole request; "per-file" answers every file, a bad one with its own error.
BATCH_ERRORS_FIELD = "errors"
BATCH_ERRORS = ("request", "per-file")
ROUTES_HINT = ("the service answers POST /predict, POST /predict_batch, POST /infer, GET /metadata, "
               "GET /healthz, /livez, /readyz, /metrics and the API page at /")
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
            return await self.app(scope, receive, _json_errors(scope, send))
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
            upload = await self._images(scope, body, field_name, many)
            decoded, failed = await self._decode(upload.files, per_file=upload.per_file)
        except RequestError as exc:
            return await _json(send, exc.status, {"error": str(exc)})
        if self.state.classify is None:
            return await _json(send, 503, {"error": "model is still loading"})
        try:
            answer = (await self._counted(self.state.classify(list(decoded.values()), upload.top_k, batch=many,
                                                              min_confidence=upload.min_confidence, **upload.ood))
                      if decoded or not upload.per_file else None)
        except ServiceUnavailable as exc:  # the batching queue is over its latency bound
            return await _json(send, 503, {"error": str(exc)})
        except InvalidArgument as exc:  # a request the model cannot answer as asked (OOD fields, no score)
            return await _json(send, 400, {"error": str(exc)})
        if upload.per_file:
            model = {"model": self.state.metadata.get("name"), "version": self.state.metadata.get("version")}
            answer = per_file_answer([name for name, _ in upload.files], answer, failed, model)
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

    async def _images(self, scope: Scope, body: bytes, field_name: str, many: bool) -> Upload:
        """The request's fields checked and its files read: one rule for every field (each at most
        once, but the batch route's repeated `images`)."""
        from starlette.requests import Request  # noqa: PLC0415

        hint = f"send the image{'s' if many else ''} as multipart/form-data field '{field_name}'"
        if not body:
            raise RequestError(400, f"empty request; {hint}")
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("multipart/form-data"):
            raise RequestError(415, f"expected multipart/form-data, got '{content_type or 'no content type'}'; {hint}")
        _check_complete(body, content_type)
        try:
            form = await Request(scope, _replay(body)).form(max_files=MAX_BATCH_FILES, max_fields=8)
        except Exception as exc:  # python-multipart and Starlette raise several types for a malformed body
            raise RequestError(400, f"malformed multipart body ({exc}); {hint}") from None
        try:
            counts = Counter(key for key, _ in form.multi_items())
            allowed = {field_name} | OPTIONAL_FIELDS | ({BATCH_ERRORS_FIELD} if many else set())
            unknown = sorted(set(counts) - allowed)
            if unknown:
                raise RequestError(400, f"unknown field '{unknown[0]}'; {hint}")
            repeated = sorted(k for k, n in counts.items() if n > 1 and not (many and k == field_name))
            if repeated:
                also = " (one image per request on /predict; use /predict_batch for several)" if repeated[0] == "image" else ""
                raise RequestError(400, f"field '{repeated[0]}' given {counts[repeated[0]]} times; send each field once{also}")
            upload = Upload(top_k=_top_k(form.get("top_k")), min_confidence=_min_confidence(form.get("min_confidence")),
                            per_file=_per_file(form.get(BATCH_ERRORS_FIELD)), ood=_ood_fields(form))
            uploads = form.getlist(field_name)
            if not uploads:
                raise RequestError(400, f"no '{field_name}' field; {hint}")
            for n, item in enumerate(uploads):
                if isinstance(item, str):
                    raise RequestError(400, f"field '{field_name}' must be a file upload, not text")
                upload.files.append((item.filename or f"{field_name}[{n}]", await item.read()))
        finally:
            await form.close()
        return upload

    async def _decode(self, files: list[tuple[str, bytes]], *,
                      per_file: bool = False) -> tuple[dict[int, np.ndarray], dict[int, RequestError]]:
        """Each upload as a model-sized uint8 array ({upload index: array}), one at a time, so no two
        full-size images of a request are alive together; the request's pixels are bounded from the
        headers first. A bad file fails the request, or with `per_file` only its own entry
        ({upload index: error})."""
        input_hw = self.state.input_hw
        if input_hw is None:
            raise RequestError(503, "model is still loading")
        failed: dict[int, RequestError] = {}

        def fail(i: int, exc: images.ImageError) -> None:
            if not per_file:
                raise _image_error(exc) from None
            failed[i] = _image_error(exc)

        pixels: dict[int, int] = {}
        for i, (label, data) in enumerate(files):
            try:
                width, height = images.header_size(data, max_pixels=self.max_pixels, name=label)
                pixels[i] = width * height
            except images.ImageError as exc:
                fail(i, exc)
        if sum(pixels.values()) > self.max_request_pixels:
            raise RequestError(413, f"the images hold {sum(pixels.values()):,} pixels in all, over the per-request "
                                    f"limit of {self.max_request_pixels:,}; send fewer or smaller images per request")
        interpolation = self.state.metadata.get("input", {}).get("interpolation", images.DEFAULT_INTERPOLATION)
        loop = asyncio.get_running_loop()
        arrays: dict[int, np.ndarray] = {}
        for i, count in pixels.items():
            label, data = files[i]
            decode = functools.partial(images.load_array, data, input_hw, interpolation=interpolation,
                                       max_pixels=self.max_pixels, name=label)
            try:
                arrays[i] = (decode() if count <= INLINE_DECODE_PIXELS
                             else await loop.run_in_executor(self._decode_pool(), decode))
            except images.ImageError as exc:
                fail(i, exc)
        return arrays, failed

    async def _counted(self, call: Awaitable[Any]) -> Any:
        """Await a call on the model, counted in state.in_flight while it waits and runs."""
        self.state.in_flight += 1
        try:
            return await call
        finally:
            self.state.in_flight -= 1


@dataclass
class Upload:
    """An image route's request once its fields are checked: the files, still encoded, and the options."""
    top_k: int | None = None
    min_confidence: float | None = None
    per_file: bool = False  # /predict_batch with errors=per-file: a bad file fails its own entry only
    ood: dict[str, Any] = field(default_factory=dict)  # abstain_ood / ood_threshold, as classify's keywords
    files: list[tuple[str, bytes]] = field(default_factory=list)  # (file name, bytes) in upload order


def _top_k(value: Any) -> int | None:
    if value is not None and (not isinstance(value, str) or not value.strip().isdigit()
                              or not 1 <= int(value) <= 1000):
        raise RequestError(400, "top_k must be a whole number from 1 to 1000")
    return None if value is None else int(value)


def _min_confidence(value: Any) -> float | None:
    try:
        return check_min_confidence(value)  # the one check; a form field is a str (a file upload fails it)
    except UserError as exc:
        raise RequestError(400, str(exc)) from None


def _per_file(value: Any) -> bool:
    if value is None or value == BATCH_ERRORS[0]:
        return False
    if value == BATCH_ERRORS[1]:
        return True
    raise RequestError(400, f"{BATCH_ERRORS_FIELD} must be {' or '.join(BATCH_ERRORS)}, not {str(value)[:40]!r}")


def per_file_answer(names: list[str], answer: dict[str, Any] | None, failed: dict[int, Exception],
                    model: dict[str, Any]) -> dict[str, Any]:
    """/predict_batch with errors=per-file: one entry per upload, in upload order, each naming its file
    and holding either the answer or the reason that file was refused (with the status it alone
    would have had)."""
    answers = iter(answer["predictions"] if answer else [])
    entries = [{"file": name, "error": str(failed[i]), "status": getattr(failed[i], "status", 400)} if i in failed
               else {"file": name, **next(answers)} for i, name in enumerate(names)]
    rest = {k: v for k, v in answer.items() if k != "predictions"} if answer else model
    return {"predictions": entries, "failed": len(failed), **rest}


def _check_complete(body: bytes, content_type: str) -> None:
    """A multipart body must end with its closing delimiter, `--BOUNDARY--`: one without it was cut
    short on the way, and the parser would report whichever field it had not reached as missing."""
    from python_multipart.multipart import parse_options_header  # noqa: PLC0415 (Starlette's form parser)

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:
        raise RequestError(400, f"the multipart body is truncated: {len(body):,} bytes arrived without the closing "
                                f"boundary '--{boundary.decode('latin-1')}--'; send the whole form")


def _json_errors(scope: Scope, send: Send) -> Send:
    """`send` for the routes BentoML answers: an error it answers as plain text (404 for an unknown
    route, 405 for a method a route does not take) goes out as JSON {"error": ...}, as the guard's own do."""
    held: dict[str, Any] = {}

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400 and \
                dict(message.get("headers", [])).get(b"content-type", b"").startswith(b"text/plain"):
            held["start"], held["body"] = message, b""
            return
        if "start" not in held or message["type"] != "http.response.body":
            return await send(message)
        held["body"] += message.get("body", b"")
        if not message.get("more_body", False):
            status = held.pop("start")["status"]
            text = held.pop("body").decode("utf-8", "replace").strip() or HTTPStatus(status).phrase
            where = f"{scope['method']} {scope['path']}"
            await _json(send, status, {"error": f"{text}: {where}" + (f"; {ROUTES_HINT}" if status == 404 else "")})

    return wrapped


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
    wanted = 'expected JSON {"images": [N, H, W, 3] pixel array}'
    try:
        payload = json.loads(body or b"{}")
    except ValueError:
        raise RequestError(400, f"{wanted}; the body is not JSON") from None
    if not isinstance(payload, dict):
        kinds = {list: "an array", str: "a string", bool: "true/false", type(None): "null"}
        raise RequestError(400, f"{wanted}; got {kinds.get(type(payload), 'a number')}, not an object")
    if set(payload) != {"images"}:
        got = ", ".join(repr(k) for k in sorted(payload)[:8]) or "none"
        raise RequestError(400, f"{wanted}; got key(s) {got}, and the one key wanted is 'images'")
    try:
        array = np.asarray(payload["images"], dtype=np.float32)
    except (ValueError, TypeError):
        raise RequestError(400, f"{wanted}; 'images' is not an array of numbers (ragged or not numeric)") from None
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
