"""The service's settings: TLSERVE_* environment variables, read and checked in one place.

The service reads them when BentoML (or a bento's container) imports it; `tlserve serve` reads
them first, so a mistake is one line and exit code 2 rather than a traceback from the server.
TLSERVE_MODEL is not here: which model to serve is resolved by serving.base.manifest.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

from serving.base.errors import UserError
from serving.base.images import DEFAULT_MAX_PIXELS
from serving.sessions import DEVICES

ORT_SPIN_MODES = ("auto", "1", "0")


@dataclass(frozen=True)
class ServiceSettings:
    max_request_bytes: int = 8 * 2**20  # TLSERVE_MAX_REQUEST_BYTES: larger bodies get a 413
    max_pixels: int = DEFAULT_MAX_PIXELS  # TLSERVE_MAX_PIXELS: larger images are refused from their header
    # TLSERVE_MAX_REQUEST_PIXELS: all images of one request together, summed from their headers before
    # any decode (413 over it); bounds the decode work one request can cost (64 x 4 MP by default).
    max_request_pixels: int = 256_000_000
    # TLSERVE_BODY_TIMEOUT_S: seconds to wait for the next piece of a request body before a 408, so a
    # stalled upload is answered rather than held until BentoML's 60 s timeout.
    body_timeout_s: float = 5.0
    # TLSERVE_HEADER_TIMEOUT_S: seconds a connection may take to send a request's whole header
    # (from connecting, or from the previous answer on a kept-alive connection) before a 408 and
    # close: uvicorn has no such bound, so trickled headers would hold a connection for ever.
    header_timeout_s: float = 10.0
    max_batch: int = 32  # TLSERVE_MAX_BATCH: images per onnxruntime call
    # TLSERVE_MAX_LATENCY_MS: an upper bound, not a wait: a request queued this long for the model gets a 503.
    max_latency_ms: int = 1000
    # TLSERVE_ORT_SPIN: auto = batches on a session whose threads never busy-wait, a request served
    # alone on one that busy-waits during the call (serving/service.py says why); 1 = always, 0 = never.
    ort_spin: str = "auto"
    device: str = "auto"  # TLSERVE_DEVICE: auto | cpu | cuda
    workers: int = 1  # TLSERVE_WORKERS: BentoML worker processes
    # TLSERVE_MIN_CONFIDENCE: below this top-1 probability an answer says "abstained": true (top-k still
    # listed); a request's own min_confidence field overrides it. None: never abstain.
    min_confidence: float | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        env = os.environ if environ is None else environ
        ints = {field: _positive_int(env, f"TLSERVE_{field.upper()}", getattr(cls, field))
                for field in ("max_request_bytes", "max_pixels", "max_request_pixels", "max_batch", "max_latency_ms",
                              "workers")}
        seconds = {field: _positive_float(env, f"TLSERVE_{field.upper()}", getattr(cls, field))
                   for field in ("body_timeout_s", "header_timeout_s")}
        ort_spin = env.get("TLSERVE_ORT_SPIN", cls.ort_spin)
        if ort_spin not in ORT_SPIN_MODES:
            raise UserError(f"TLSERVE_ORT_SPIN must be one of {', '.join(ORT_SPIN_MODES)}, not {ort_spin!r}")
        device = env.get("TLSERVE_DEVICE", cls.device)
        if device not in DEVICES:
            raise UserError(f"TLSERVE_DEVICE must be one of {', '.join(DEVICES)}, not {device!r}")
        min_confidence = check_min_confidence(env.get("TLSERVE_MIN_CONFIDENCE") or None, "TLSERVE_MIN_CONFIDENCE")
        return cls(**ints, **seconds, ort_spin=ort_spin, device=device, min_confidence=min_confidence)


def check_min_confidence(raw: object, name: str = "min_confidence") -> float | None:
    """The one check of every min_confidence (TLSERVE_MIN_CONFIDENCE, a request's form field, an in-process
    call): None when not given, else the threshold, or one UserError line naming `name` (the guard answers
    it as a 400, the service's endpoints as BentoML's InvalidArgument)."""
    if raw is None:
        return None
    value = confidence_threshold(raw) if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else None
    if value is None:
        raise UserError(f"{name} must be a probability between 0 and 1 (both excluded), not {str(raw)[:40]!r}")
    return value


def confidence_threshold(raw: str | float) -> float | None:
    """A confidence threshold strictly between 0 and 1, or None when `raw` is not one: 0 would never
    abstain and 1 would always, so both are mistakes rather than settings."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 < value < 1 else None


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{name} must be a positive whole number, not {raw!r}")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value
