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
from serving.base.manifest import Manifest
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
    # TLSERVE_ABSTAIN_OOD: 1 makes an answer whose OOD score is over the threshold abstain too (a request's
    # abstain_ood field overrides it); its "in_distribution" is given either way.
    abstain_ood: bool = False
    # TLSERVE_OOD_THRESHOLD: scores above it are out of distribution; None: the one the export set on the
    # validation split (the manifest's ood.threshold). A request's ood_threshold overrides both.
    ood_threshold: float | None = None
    # TLSERVE_DRIFT_WINDOW: /metrics' drift statistics compare the last this many answers with the reference.
    drift_window: int = 1000

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServiceSettings:
        env = os.environ if environ is None else environ
        ints = {field: _positive_int(env, f"TLSERVE_{field.upper()}", getattr(cls, field))
                for field in ("max_request_bytes", "max_pixels", "max_request_pixels", "max_batch", "max_latency_ms",
                              "workers", "drift_window")}
        seconds = {field: _positive_float(env, f"TLSERVE_{field.upper()}", getattr(cls, field))
                   for field in ("body_timeout_s", "header_timeout_s")}
        ort_spin = env.get("TLSERVE_ORT_SPIN", cls.ort_spin)
        if ort_spin not in ORT_SPIN_MODES:
            raise UserError(f"TLSERVE_ORT_SPIN must be one of {', '.join(ORT_SPIN_MODES)}, not {ort_spin!r}")
        device = env.get("TLSERVE_DEVICE", cls.device)
        if device not in DEVICES:
            raise UserError(f"TLSERVE_DEVICE must be one of {', '.join(DEVICES)}, not {device!r}")
        min_confidence = check_min_confidence(env.get("TLSERVE_MIN_CONFIDENCE") or None, "TLSERVE_MIN_CONFIDENCE")
        abstain_ood = flag(env.get("TLSERVE_ABSTAIN_OOD", "0"))
        if abstain_ood is None:
            raise UserError(f"TLSERVE_ABSTAIN_OOD must be 1 or 0 (true or false), not {env['TLSERVE_ABSTAIN_OOD']!r}")
        ood_threshold = _optional(env, "TLSERVE_OOD_THRESHOLD", score_threshold, "a positive number (an OOD score)")
        return cls(**ints, **seconds, ort_spin=ort_spin, device=device, min_confidence=min_confidence,
                   abstain_ood=abstain_ood, ood_threshold=ood_threshold)

    def check_model(self, manifest: Manifest) -> None:
        """The OOD settings need a model exported with the score."""
        if manifest.ood is None and (self.abstain_ood or self.ood_threshold is not None):
            setting = "TLSERVE_ABSTAIN_OOD" if self.abstain_ood else "TLSERVE_OOD_THRESHOLD"
            raise UserError(f"{setting}: {no_score(manifest.name)}")

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



def no_score(name: str) -> str:
    """What a model exported before the OOD score has to say about it (/metadata, 400s, serve)."""
    return (f"model '{name}' was exported before tlserve gave models an OOD score, so its answers carry none; "
            f"export its run again to add one")


def flag(raw: str) -> bool | None:
    """'1'/'true'/'yes' or '0'/'false'/'no' (any case) as a bool, else None."""
    value = str(raw).strip().lower()
    return True if value in ("1", "true", "yes") else False if value in ("0", "false", "no") else None


def score_threshold(raw: str | float) -> float | None:
    """An OOD score threshold: a finite number above 0 (scores are squared distances, never negative,
    so 0 or less would call every image out of distribution), or None when `raw` is not one."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def confidence_threshold(raw: str | float) -> float | None:
    """A confidence threshold strictly between 0 and 1, or None when `raw` is not one: 0 would never
    abstain and 1 would always, so both are mistakes rather than settings."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and 0 < value < 1 else None


def _optional(env: Mapping[str, str], name: str, parse, what: str) -> float | None:
    """An optional threshold setting: unset or empty is None, else `parse` must accept it."""
    raw = env.get(name)
    if raw in (None, ""):
        return None
    value = parse(raw)
    if value is None:
        raise UserError(f"{name} must be {what}, not {raw!r}")
    return value


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
