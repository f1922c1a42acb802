"""The data check's embeddings (full mode): the frozen ImageNet MobileNetV2's pooled features at
EMBED_SIZE px. They serve twice: centred and projected (see project) for the near-copy cosine, and
as they are for the label-issue classifier (training.audit.labels)."""
from __future__ import annotations

import numpy as np

from training import progress
from training.audit.fingerprints import EMBED_SIZE

EMBED_BATCH = 256
PCA_DIMS = 256


def embeddings(small: np.ndarray, weights: str, log=None, bar: bool | None = None) -> np.ndarray:
    """Pooled MobileNetV2 features (N, 1280) of EMBED_SIZE-px images, ImageNet weights (imagenet or a file)."""
    from training.model import backbones  # noqa: PLC0415
    from training.env import keras, tf  # noqa: PLC0415

    base = backbones.build_pretrained(backbones.get("mobilenetv2"), EMBED_SIZE, weights)
    pool = keras().layers.GlobalAveragePooling2D()

    @tf().function(reduce_retracing=True)
    def embed(x):
        return pool(base(x / 127.5 - 1.0, training=False))  # MobileNetV2's preprocess_input

    out = np.zeros((len(small), base.output_shape[-1]), np.float32)
    with progress.step("embedding (MobileNetV2)", len(small), log=log, bar=bar) as advance:
        for i in range(0, len(small), EMBED_BATCH):
            batch = small[i:i + EMBED_BATCH].astype(np.float32)
            out[i:i + len(batch)] = embed(tf().constant(batch)).numpy()
            advance(len(batch))
    return out


def project(features: np.ndarray, dims: int = PCA_DIMS) -> np.ndarray:
    """Centre, keep the top `dims` principal axes, unit length: a cosine that ignores the shared mean."""
    x = features - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    if len(x) > dims + 1:
        # Eigen-decomposition of the DxD covariance: cheap for D=1280 whatever N is.
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))
        x = x @ vecs[:, ::-1][:, :dims].astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
