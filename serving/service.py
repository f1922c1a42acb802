"""The BentoML service: one class that serves any exported tlserve model over HTTP.

Which model is configuration, not code: TLSERVE_MODEL names a models/<name>
folder or a BentoML model tag (a bento sets it to the tag it carries).

The request path. POST /predict and /predict_batch are answered by the request guard
(serving/guard.py, an ASGI middleware in front of BentoML's endpoints): it bounds and parses the
body, decodes each image once and calls `ImageClassifier.classify`, which queues the pixels for a
shared onnxruntime call (serving/batching.py). GET /metadata is answered by the guard from what the
service recorded at load. POST /infer (raw pixel arrays) is checked by the guard, then handed to
BentoML's batchable endpoint. Everything else (/healthz, /readyz, /metrics, the docs) is BentoML's.
Why the guard answers instead of BentoML's own parsing: serving/guard.py's docstring.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Optional

import bentoml
import numpy as np

from serving.base import images
from serving.batching import BatchWorker, Overloaded
from serving import connection
from serving.guard import (BATCH_ERRORS, BATCH_ERRORS_FIELD, MAX_BATCH_FILES, OPTIONAL_FIELDS, GuardState,
                           RequestGuard, per_file_answer)
from serving.lifecycle import supervise_parent
from serving.base.errors import UserError
from serving.base.manifest import resolve_model
from serving.monitor import Monitor
from serving.predict import top_k as top_classes
from serving.sessions import OnnxClassifier, physical_cores
from serving.settings import ServiceSettings, check_min_confidence, no_score, score_threshold


def _model_ref() -> str:
    """TLSERVE_MODEL, else the model this bento was built with (`bentoml serve BENTO_TAG` outside a
    container does not apply the bento's envs; its bento.yaml still names the model)."""
    ref = os.environ.get("TLSERVE_MODEL", "")
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"
    if not ref and bento_yaml.is_file():
        import yaml  # noqa: PLC0415 (a bentoml dependency)

        models = (yaml.safe_load(bento_yaml.read_text()) or {}).get("models") or []
        ref = models[0]["tag"] if models else ""
    return ref


MODEL_REF = _model_ref()
SETTINGS = ServiceSettings.from_env()
connection.install(SETTINGS.header_timeout_s)  # before BentoML's worker starts uvicorn (serving/connection.py)
DEFAULT_TOP_K = 3
# Shared by this worker's service instance (which fills it once the model is loaded) and its
# request guard (which BentoML creates before that, from the arguments given at the bottom).
GUARD_STATE = GuardState()


@functools.cache
def _requests_per_call():
    """Prometheus histogram on BentoML's /metrics: how many requests each onnxruntime call served.
    Created on first use, in the worker, after BentoML has set up its multiprocess registry."""
    from prometheus_client import Histogram  # noqa: PLC0415 (a bentoml dependency)

    return Histogram("tlserve_requests_per_call", "Requests answered by one onnxruntime call (adaptive batching)",
                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))


@functools.cache
def _lone_calls():
    """Prometheus counter: onnxruntime calls answered by the session kept for lone requests."""
    from prometheus_client import Counter  # noqa: PLC0415

    return Counter("tlserve_lone_calls", "Requests served alone on an idle server, by the session that spins during the call")


def _is_tag(ref: str) -> bool:
    return ":" in ref and not Path(ref).exists()


# The image a bento is built into (`tlserve build`; its requirements come from the bentofile). Named by its
# base image and no distro of BentoML's: for a distro, BentoML's Dockerfile first apt-installs build-essential
# and git (583 MB), which nothing here compiles or fetches. `tlserve build --base-image` replaces the base.
IMAGE = bentoml.images.Image(base_image="python:3.11-slim", distro="none", python_version="3.11")


@bentoml.service(
    name="tlserve",
    image=IMAGE,
    workers=SETTINGS.workers,
    traffic={"timeout": 60, "max_concurrency": 256},
)
class ImageClassifier:
    # Declared by tag so `bentoml build` packs the model into the bento.
    bento_model = bentoml.models.BentoModel(MODEL_REF) if _is_tag(MODEL_REF) else None

    def __init__(self) -> None:
        supervise_parent()  # first: a worker whose supervisor dies must not serve on, holding the port
        if not MODEL_REF:
            raise RuntimeError("set TLSERVE_MODEL to an exported model folder or a BentoML model tag")
        model_dir = Path(self.bento_model.path) if self.bento_model is not None else resolve_model(MODEL_REF)
        # Two sessions on CPU with TLSERVE_ORT_SPIN=auto: one whose threads never spin, for batches and
        # busy times, and one that spins during a call, for a request served alone (docs/decisions.md).
        self.model = OnnxClassifier.load(model_dir, device=SETTINGS.device,
                                         spin="always" if SETTINGS.ort_spin == "1" else "never")
        self._lone = None
        if SETTINGS.ort_spin == "auto" and self.model.provider == "CPUExecutionProvider" and physical_cores() > 1:
            self._lone = OnnxClassifier.load(model_dir, device="cpu", verify=False, spin="in-run")
        h, w = self.model.input_hw
        for model in filter(None, (self.model, self._lone)):
            model.predict(np.zeros((1, h, w, 3), np.float32))  # warm-up: first-run allocations off the request path
        manifest = self.model.manifest
        try:
            SETTINGS.check_model(manifest)
        except UserError as exc:  # `tlserve serve` refuses this up front; a bare `bentoml serve` serves on without
            logging.getLogger("tlserve.service").warning("%s; the setting is ignored", exc)
        # Scores above it are out of distribution: TLSERVE_OOD_THRESHOLD, else the one set at export.
        self.ood_threshold = (SETTINGS.ood_threshold or manifest.ood.threshold) if self.model.has_score else None
        self.monitor = Monitor(manifest.class_names, manifest.ood if self.model.has_score else None,
                               self.ood_threshold, SETTINGS.drift_window)
        GUARD_STATE.input_hw = (h, w)
        GUARD_STATE.metadata = {
            "name": manifest.name, "version": manifest.version, "class_names": manifest.class_names,
            "input": manifest.input.to_dict(), "backbone": manifest.backbone, "strategy": manifest.strategy,
            "tta": manifest.tta, "test_accuracy": manifest.test_accuracy, "runtime": "onnxruntime",
            "variant": self.model.variant, "provider": self.model.provider, "max_batch_size": SETTINGS.max_batch,
            "max_latency_ms": SETTINGS.max_latency_ms, "ort_spin": SETTINGS.ort_spin, "lone_session": self._lone is not None,
            # The default abstention threshold (TLSERVE_MIN_CONFIDENCE; a request's min_confidence overrides it)
            # and the temperature baked into the model at training, so a client knows what the numbers mean.
            "min_confidence": SETTINGS.min_confidence,
            "temperature": manifest.temperature,
            "ood": self._ood_metadata(),
            # What a client can meet before the model: each is a 4xx with a JSON reason.
            "limits": {"files_per_request": MAX_BATCH_FILES,
                       "fields": ["image", "images", *sorted(OPTIONAL_FIELDS), BATCH_ERRORS_FIELD],
                       "max_request_bytes": SETTINGS.max_request_bytes, "max_pixels_per_image": SETTINGS.max_pixels,
                       "max_pixels_per_request": SETTINGS.max_request_pixels, "body_timeout_s": SETTINGS.body_timeout_s,
                       "header_timeout_s": SETTINGS.header_timeout_s},
        }
        # One onnxruntime call for the requests waiting together; requests per call go to /metrics.
        # Not through the batchable `infer` API: from another endpoint it goes through BentoML's
        # self-proxy and JSON, which costs more than the model (docs/decisions.md, serving/batching.py).
        self._batched = BatchWorker(self.model.predict_scored, max_batch=SETTINGS.max_batch,
                                    max_wait_s=SETTINGS.max_latency_ms / 1000,
                                    on_call=_requests_per_call().observe,
                                    lone_predict=self._predict_lone if self._lone else None,
                                    quiet=lambda: GUARD_STATE.in_flight <= 1)
        GUARD_STATE.classify = self.classify

    def _predict_lone(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        _lone_calls().inc()
        return self._lone.predict_scored(pixels)

    def _ood_metadata(self) -> dict[str, Any]:
        """/metadata's "ood": the score's reference summary and the threshold in force, or why there is none."""
        manifest = self.model.manifest
        if not self.model.has_score:
            return {"available": False, "reason": no_score(manifest.name)}
        return {"available": True, **manifest.ood.summary(), "threshold": self.ood_threshold,
                "export_threshold": manifest.ood.threshold, "abstain_ood": SETTINGS.abstain_ood,
                "drift_window": SETTINGS.drift_window}

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch, max_latency_ms=SETTINGS.max_latency_ms)
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of (N, H, W, 3) pixels; concurrent callers share one onnxruntime call."""
        return self.model.predict(np.asarray(images, dtype=np.float32))

    @bentoml.api(route="/predict")
    async def predict(self, image: Path, top_k: int = DEFAULT_TOP_K, min_confidence: Optional[float] = None,
                      abstain_ood: Optional[bool] = None, ood_threshold: Optional[float] = None) -> dict[str, Any]:
        """Classify one uploaded image (multipart field `image`); below `min_confidence` the answer abstains,
        and out of distribution too with `abstain_ood`."""
        return await self.classify([self._open(image)], top_k, batch=False, min_confidence=min_confidence,
                                   abstain_ood=abstain_ood, ood_threshold=ood_threshold)

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path], top_k: int = DEFAULT_TOP_K,
                            min_confidence: Optional[float] = None, abstain_ood: Optional[bool] = None,
                            ood_threshold: Optional[float] = None, errors: str = BATCH_ERRORS[0]) -> dict[str, Any]:
        """Classify several uploaded images (repeated multipart field `images`); errors=per-file answers
        each file, a bad one with its own error, instead of refusing the whole request."""
        if errors not in BATCH_ERRORS:
            raise bentoml.exceptions.InvalidArgument(f"errors must be {' or '.join(BATCH_ERRORS)}")
        if errors == BATCH_ERRORS[0]:
            return await self.classify([self._open(path) for path in images], top_k, batch=True,
                                       min_confidence=min_confidence, abstain_ood=abstain_ood,
                                       ood_threshold=ood_threshold)
        opened, failed = {}, {}
        for i, path in enumerate(images):
            try:
                opened[i] = self._open(path)
            except bentoml.exceptions.InvalidArgument as exc:
                failed[i] = exc
        answer = (await self.classify(list(opened.values()), top_k, batch=True, min_confidence=min_confidence,
                                      abstain_ood=abstain_ood, ood_threshold=ood_threshold) if opened else None)
        return per_file_answer([path.name for path in images], answer, failed, self._model_info())

    async def classify(self, decoded: list, top_k: int | None, *, batch: bool,
                       min_confidence: float | None = None, abstain_ood: bool | None = None,
                       ood_threshold: float | None = None) -> dict[str, Any]:
        """Top-k answers for decoded images, through the batching worker: one answer
        (`/predict`) or a list of them (`/predict_batch`). Over HTTP the
        request guard calls this directly with the images it has already decoded (see
        serving.guard); the endpoints above call it for in-process callers.

        Each answer says "abstained": true when its top probability is below the threshold (the
        request's min_confidence, else TLSERVE_MIN_CONFIDENCE): the model's calibrated confidence is
        too low to act on, and the top-k are still listed for a human to look at. With a model exported
        with an OOD score, each answer also carries "ood_score" and "in_distribution" (score at or below
        the threshold: the request's ood_threshold, else TLSERVE_OOD_THRESHOLD, else the export's), and
        abstains when out of distribution if the request's abstain_ood (else TLSERVE_ABSTAIN_OOD) says so."""
        if not decoded:
            raise bentoml.exceptions.InvalidArgument("no images")
        try:
            threshold = check_min_confidence(min_confidence)
        except UserError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from None
        threshold = SETTINGS.min_confidence if threshold is None else threshold
        ood = self._ood_rule(abstain_ood, ood_threshold)
        pixels = np.stack([images.to_array(img, self.model.input_hw, self.model.interpolation) for img in decoded])
        try:
            probs, scores = await self._batched(pixels)
        except Overloaded as exc:
            raise bentoml.exceptions.ServiceUnavailable(str(exc)) from None
        self.monitor.observe(probs, scores)
        k = DEFAULT_TOP_K if top_k is None else top_k
        answers = [self._answer(p, None if scores is None else float(scores[i]), k, threshold, ood)
                   for i, p in enumerate(probs)]
        if not batch:
            return {**answers[0], **self._model_info()}
        return {"predictions": answers, **self._model_info()}

    def _ood_rule(self, abstain: bool | None, threshold: float | None) -> tuple[bool, float] | None:
        """(abstain when out of distribution, threshold) for this request, None without a score; a request
        asking for OOD abstention or a threshold from a model without a score is refused (400)."""
        if threshold is not None and score_threshold(threshold) is None:
            raise bentoml.exceptions.InvalidArgument("ood_threshold must be a positive number (an OOD score)")
        if not self.model.has_score:
            if abstain or threshold is not None:
                raise bentoml.exceptions.InvalidArgument(no_score(self.model.name))
            return None
        return (SETTINGS.abstain_ood if abstain is None else bool(abstain),
                self.ood_threshold if threshold is None else float(threshold))

    @bentoml.on_shutdown
    def _stop_batching(self) -> None:
        self._batched.close()

    def _open(self, path: Path):
        try:
            return images.open_image(path, max_pixels=SETTINGS.max_pixels, name=path.name)
        except images.ImageError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from None

    def _answer(self, probs: np.ndarray, score: float | None, k: int, threshold: float | None,
                ood: tuple[bool, float] | None) -> dict[str, Any]:
        top = top_classes(probs, self.model.class_names, max(1, min(int(k), len(self.model.class_names))))
        reasons = ["low_confidence"] if threshold is not None and top[0]["probability"] < threshold else []
        answer: dict[str, Any] = {"top": top}
        if threshold is not None:
            answer["min_confidence"] = threshold
        if ood is not None and score is not None:
            abstain, limit = ood
            answer.update(ood_score=score, in_distribution=score <= limit)
            if abstain and score > limit:
                reasons.append("out_of_distribution")
        answer["abstained"] = bool(reasons)
        if reasons:
            answer["abstained_for"] = reasons
        return answer

    def _model_info(self) -> dict[str, str]:
        return {"model": self.model.name, "version": self.model.version}


ImageClassifier.add_asgi_middleware(RequestGuard, state=GUARD_STATE, max_bytes=SETTINGS.max_request_bytes,
                                    max_pixels=SETTINGS.max_pixels, max_request_pixels=SETTINGS.max_request_pixels, body_timeout_s=SETTINGS.body_timeout_s)
