"""The server a user would otherwise write: Starlette + onnxruntime, one image per request, no batching.

Run: python benchmarks/peer_server.py MODEL_DIR PORT [--no-access-log]   (serves POST /predict, field `image`)
It decodes with the same serving.base.images code as tlserve, so only the serving machinery differs, and
it keeps uvicorn's defaults, access log included, as tlserve keeps BentoML's.
"""
from __future__ import annotations

import sys

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.base import images
from serving.sessions import OnnxClassifier


def make_app(model_dir: str) -> Starlette:
    model = OnnxClassifier.load(model_dir)
    h, w = model.input_hw
    model.predict(np.zeros((1, h, w, 3), np.float32))

    async def predict(request: Request) -> JSONResponse:
        form = await request.form()
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            return JSONResponse({"error": "send field 'image'"}, status_code=400)
        try:
            pixels = images.load_array(await upload.read(), (h, w), interpolation=model.interpolation)
        except images.ImageError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        probs = model.predict(pixels[None].astype(np.float32))[0]
        order = np.argsort(-probs)[:3]
        return JSONResponse({"top": [{"label": model.class_names[i], "probability": float(probs[i])} for i in order]})

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse({"name": model.name, "input": model.manifest.input.to_dict(), "provider": model.provider})

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/metadata", metadata)])


if __name__ == "__main__":
    uvicorn.run(make_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]),
                access_log="--no-access-log" not in sys.argv[3:])
