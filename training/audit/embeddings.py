"""The data check's embeddings (full mode): the frozen ImageNet MobileNetV2's pooled features at
EMBED_SIZE px. They serve twice: the last layer's, centred and projected (see project), for the
near-copy cosine; those of LABEL_LAYERS, side by side, for the label-issue classifier
(training.audit.labels)."""
from __future__ import annotations

import numpy as np

from training import progress
from training.audit.fingerprints import EMBED_SIZE

EMBED_BATCH = 256
PCA_DIMS = 256
# The label classifier's features: ImageNet features of a 64-px image are weak (CIFAR-10 out-of-fold
# accuracy 0.57 at 64 px against 0.xx at 160 px, benchmarks/label_issues.py), so where the set is small
# enough the label pass embeds larger copies: the largest side whose pixels, over all images, stay within
# LABEL_PIXELS (10,000 images at 160 px: about what the 64-px pass costs on 62,500 images).
LABEL_SIDES = (224, 160, 128, 96, 64)
LABEL_PIXELS = 10_000 * 160 * 160
POOLED = "out_relu"        # MobileNetV2's last activation: the near-copy cosine's features
POOLED_WIDTH = 1280        # its channels
# The label classifier sees five depths, not only the last: edges and textures as well as objects. Out-of-fold
# accuracy, last layer -> these five (5-fold, 128 axes): banana-leaf 224 px 0.931 -> 0.946, CIFAR-10 10k
# 160 px 0.721 -> 0.748; recall of planted flips in docs/decisions.md. All from the one forward pass.
LABEL_LAYERS = ("block_6_expand_relu", "block_10_expand_relu", "block_13_expand_relu", "block_16_expand_relu", POOLED)


def label_side(images: int) -> int:
    """The side the label classifier's features are computed at, for a set of this many images."""
    return next((s for s in LABEL_SIDES if images * s * s <= LABEL_PIXELS), EMBED_SIZE)


def check_weights(weights: str) -> None:
    """A weights file that does not fit MobileNetV2 is the user's mistake: one line before any work. (Keras's
    ImageNet download failing offline is not: the check goes on without embeddings and says so.)"""
    if weights not in ("imagenet", "none"):
        from training.model import backbones  # noqa: PLC0415

        backbones.check_weights_file(weights, "--weights")  # not a weights file at all: one line, at once
        backbones.build_pretrained(backbones.get("mobilenetv2"), EMBED_SIZE, weights)


def embeddings(small: np.ndarray, weights: str, log=None, bar: bool | None = None,
               layers: tuple[str, ...] = (POOLED,)) -> np.ndarray:
    """Pooled MobileNetV2 features of square images (EMBED_SIZE px for the pair search), ImageNet weights
    (imagenet or a file): each of `layers`' channels averaged over the image, the layers side by side
    (N, their channels), the last layer last. With several layers each layer's block is scaled to the same
    total variance, so no depth outweighs another by its width or its activations' size."""
    from training.model import backbones  # noqa: PLC0415
    from training.env import keras, tf  # noqa: PLC0415

    side = small.shape[1]
    base = backbones.build_pretrained(backbones.get("mobilenetv2"), side, weights)
    model = keras().Model(base.input, [base.get_layer(name).output for name in layers])

    @tf().function(reduce_retracing=True)
    def embed(x):
        maps = model(x / 127.5 - 1.0, training=False)  # MobileNetV2's preprocess_input
        return tf().concat([tf().reduce_mean(m, axis=[1, 2]) for m in tf().nest.flatten(maps)], axis=1)

    widths = [base.get_layer(name).output.shape[-1] for name in layers]
    out = np.zeros((len(small), sum(widths)), np.float32)
    with progress.step(f"embedding (MobileNetV2, {side} px)", len(small), log=log, bar=bar) as advance:
        for i in range(0, len(small), EMBED_BATCH):
            batch = small[i:i + EMBED_BATCH].astype(np.float32)
            out[i:i + len(batch)] = embed(tf().constant(batch)).numpy()
            advance(len(batch))
    if len(layers) > 1:
        for a, b in zip(np.cumsum([0, *widths[:-1]]), np.cumsum(widths)):
            block = out[:, a:b]
            spread = np.sqrt(((block - block.mean(axis=0)) ** 2).sum(axis=1).mean())
            block /= max(float(spread), 1e-12)
    return out


def last_layer(features: np.ndarray) -> np.ndarray:
    """POOLED's block of embeddings() that end with it (up to a scale, which project ignores)."""
    return features[:, -POOLED_WIDTH:]


def project(features: np.ndarray, dims: int = PCA_DIMS) -> np.ndarray:
    """Centre, keep the top `dims` principal axes, unit length: a cosine that ignores the shared mean."""
    x = features - features.mean(axis=0, dtype=np.float64).astype(np.float32)
    if len(x) > dims + 1:
        # Eigen-decomposition of the DxD covariance: cheap for D=1280 whatever N is.
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))
        x = x @ vecs[:, ::-1][:, :dims].astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
