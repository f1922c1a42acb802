"""A bound on the header phase of each HTTP request, below the ASGI layer.

uvicorn has no timeout on a request's headers (its issue #157 lists one as never done):
`timeout_keep_alive` covers only the idle time between requests and is cancelled by the first byte of
the next one, so a client that trickles a header a byte at a time holds its connection for ever, and
BentoML 1.4 exposes no other server setting (`bentoml serve --timeout-keep-alive` is that same
timer). The request guard cannot help: ASGI middleware first runs once the headers are complete. So
the worker's HTTP protocol is uvicorn's own (h11 or httptools, whichever uvicorn picks) with a timer
that starts when a connection opens, or when the previous answer on a kept-alive connection is
complete, and that stops when the protocol has parsed the next request's headers; when it fires
first the connection gets a 408 with a JSON body and is closed.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Read by the protocol class, set by install() in the worker before uvicorn builds its protocols.
_HEADER_TIMEOUT_S = [10.0]


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": f"request headers not complete within {seconds:g} s; send the whole header "
                                "at once"}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with a deadline for each request's headers. Both of uvicorn's
    implementations set `self.cycle` to a new object once a request's headers are parsed, which is
    how this class tells that the header phase is over without parsing anything itself."""

    _header_timer: asyncio.TimerHandle | None = None
    _waiting_since_cycle: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_timer is not None and self.cycle is not self._waiting_since_cycle:
            self._cancel_header_timer()  # the headers are in: the body has the guard's own timeout

    def on_response_complete(self) -> None:
        self._arm_header_timer()  # before super(): it may start a pipelined request's cycle at once
        super().on_response_complete()
        if self.cycle is not self._waiting_since_cycle:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._waiting_since_cycle = self.cycle
        self._header_timer = self.loop.call_later(_HEADER_TIMEOUT_S[0], self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.cycle is not self._waiting_since_cycle or self.transport.is_closing() \
                or self.transport.get_protocol() is not self:  # headers done, closed, or upgraded (a WebSocket)
            return
        # Written as raw bytes: no request was parsed, so the protocol's own writer has nothing to answer.
        self.transport.write(_timeout_response(_HEADER_TIMEOUT_S[0]))
        self.transport.close()


def install(header_timeout_s: float) -> None:
    """Make HeaderTimeoutProtocol uvicorn's "auto" HTTP protocol in this process. BentoML's worker
    builds its uvicorn.Config with the default http="auto" after importing the service, and uvicorn
    looks the name up in this table only when the server starts."""
    import uvicorn.config  # noqa: PLC0415

    _HEADER_TIMEOUT_S[0] = header_timeout_s
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:HeaderTimeoutProtocol"
