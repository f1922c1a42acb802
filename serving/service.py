"""The BentoML service: one class that serves any exported tlserve model over HTTP.

Which model is configuration, not code: TLSERVE_MODEL names a models/<name>
folder or a BentoML model tag (a bento sets it to the tag it carries).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np

from serving.guard import STATE, STATE_KEY, RequestGuard
from serving.manifest import resolve_model
from serving.predict import top_k as top_classes
from serving.runtime import OnnxClassifier
from training import images



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
MAX_REQUEST_BYTES = int(os.environ.get("TLSERVE_MAX_REQUEST_BYTES", str(8 * 2**20)))
MAX_PIXELS = int(os.environ.get("TLSERVE_MAX_PIXELS", str(images.DEFAULT_MAX_PIXELS)))
MAX_BATCH = int(os.environ.get("TLSERVE_MAX_BATCH", "32"))
# An upper bound, not a wait: BentoML answers 503 to requests it predicts would exceed it.
MAX_LATENCY_MS = int(os.environ.get("TLSERVE_MAX_LATENCY_MS", "1000"))
DEFAULT_TOP_K = 3


def _is_tag(ref: str) -> bool:
    return ":" in ref and not Path(ref).exists()


@bentoml.service(
    name="tlserve",
    workers=int(os.environ.get("TLSERVE_WORKERS", "1")),
    traffic={"timeout": 60, "max_concurrency": 256},
)
class ImageClassifier:
    # Declared by tag so `bentoml build` packs the model into the bento.
    bento_model = bentoml.models.BentoModel(MODEL_REF) if _is_tag(MODEL_REF) else None

    def __init__(self) -> None:
        if not MODEL_REF:
            raise RuntimeError("set TLSERVE_MODEL to an exported model folder or a BentoML model tag")
        model_dir = Path(self.bento_model.path) if self.bento_model is not None else resolve_model(MODEL_REF)
        self.model = OnnxClassifier.load(model_dir, device=os.environ.get("TLSERVE_DEVICE", "auto"))
        h, w = self.model.input_hw
        self.model.predict(np.zeros((1, h, w, 3), np.float32))  # warm-up: first-run allocations off the request path
        manifest = self.model.manifest
        STATE.input_hw = (h, w)
        STATE.metadata = {
            "name": manifest["name"], "version": manifest["version"], "class_names": manifest["class_names"],
            "input": manifest["input"], "backbone": manifest["backbone"], "strategy": manifest["strategy"],
            "test_accuracy": manifest["test_accuracy"], "runtime": "onnxruntime", "variant": self.model.variant,
            "provider": self.model.provider, "max_batch_size": MAX_BATCH, "max_latency_ms": MAX_LATENCY_MS,
        }

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS)
    def infer(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for a batch of (N, H, W, 3) pixels; concurrent callers share one onnxruntime call."""
        return self.model.predict(np.asarray(images, dtype=np.float32))

    @bentoml.api(route="/predict")
    async def predict(self, image: Path, top_k: int = DEFAULT_TOP_K, ctx: bentoml.Context = None) -> dict[str, Any]:
        """Classify one uploaded image (multipart field `image`)."""
        pixels = self._pixels(ctx)
        probs = await self._batched(pixels[:1])
        return {**self._answer(probs[0], top_k), **self._model_info()}

    @bentoml.api(route="/predict_batch")
    async def predict_batch(self, images: list[Path], top_k: int = DEFAULT_TOP_K,
                            ctx: bentoml.Context = None) -> dict[str, Any]:
        """Classify several uploaded images (repeated multipart field `images`)."""
        pixels = self._pixels(ctx)
        probs = await self._batched(pixels)
        return {"predictions": [self._answer(p, top_k) for p in probs], **self._model_info()}

    async def _batched(self, pixels: np.ndarray) -> np.ndarray:
        """Through the batching API, so concurrent requests share onnxruntime calls.

        BentoML reaches its own batching API over an in-process aiohttp connection whose
        pool, in 1.4.39, now and then hands out a closing connection when a burst of
        requests opens several at once ("Cannot write to closing transport"). The call is
        a pure function of its input, so one retry is safe and hides a transport fault
        that is not the client's.
        """
        import aiohttp  # noqa: PLC0415 (a bentoml dependency)

        for attempt in range(3):
            try:
                return await self.to_async.infer(pixels)
            except (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _pixels(self, ctx: bentoml.Context) -> np.ndarray:
        # Decoded once, by the guard in front of this endpoint; only the resize happens here.
        decoded = getattr(ctx.request.state, STATE_KEY)
        return np.stack([images.to_array(img, self.model.input_hw, self.model.interpolation) for img in decoded])

    def _answer(self, probs: np.ndarray, k: int) -> dict[str, Any]:
        return {"top": top_classes(probs, self.model.class_names, max(1, min(int(k), len(self.model.class_names))))}

    def _model_info(self) -> dict[str, str]:
        return {"model": self.model.name, "version": self.model.version}


ImageClassifier.add_asgi_middleware(RequestGuard, max_bytes=MAX_REQUEST_BYTES, max_pixels=MAX_PIXELS)
