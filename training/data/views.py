"""Fixed augmented views: `--augment-views K` trains on K views of each training image, drawn once from
the --augment-policy recipe and the seed, one view per image each epoch.

A view is a geometric transform in relative coordinates (a mirror, a rotation and zoom about the
centre, a shift in fractions of the side), so the same view can be rendered at any image size: the
student's images at its size and the teacher's at its own show the same crop of the same picture.
That is what lets `--teacher` take the teacher's probabilities on the very views the student trains
on ("consistent teaching", Beyer et al., CVPR 2022), computed once and cached, where augmentation
layers inside the model draw a new view every step that no cached teacher output could follow.

Recipes (the --augment-policy names, as the layers inside the model draw them):
  seed       mirror (p 0.5), rotation up to 0.05 of a turn either way, zoom 0.9-1.1
  flip-crop  mirror (p 0.5), a shift of up to 1/8 of the side on each axis
Both fill with the reflected image and sample bilinearly (the layers' flip-crop uses nearest, which
would not match across sizes).
"""
from __future__ import annotations

import hashlib

import numpy as np

from training.env import tf

VERSION = 1        # bump when a recipe's drawing or rendering changes: it keys the teacher's cached views
MAX_VIEWS = 64


def draw(policy: str, n: int, views: int, seed: int) -> np.ndarray:
    """(n, views, 5) float32: each view's mirror (0/1), rotation (radians), zoom, x and y shift (fractions)."""
    rng = np.random.default_rng((seed, VERSION, 0x71E35))
    flip = rng.random((n, views)) < 0.5
    angle = np.zeros((n, views))
    zoom = np.ones((n, views))
    shift = np.zeros((n, views, 2))
    if policy == "flip-crop":
        shift = rng.uniform(-0.125, 0.125, (n, views, 2))
    else:
        angle = rng.uniform(-0.05, 0.05, (n, views)) * 2 * np.pi
        zoom = rng.uniform(0.9, 1.1, (n, views))
    return np.concatenate([flip[..., None], angle[..., None], zoom[..., None], shift], axis=-1).astype(np.float32)


def recipe_key(policy: str, params: np.ndarray) -> str:
    """What decides the views, for a cache key: recipe version, policy and the drawn parameters."""
    return hashlib.sha256(f"views v{VERSION} {policy} {params.shape}".encode()
                          + np.ascontiguousarray(params).tobytes()).hexdigest()[:16]


def render(x: np.ndarray, params: np.ndarray, chunk: int = 256) -> np.ndarray:
    """x (n, h, w, c) uint8 and params (n, 5) -> the views (n, h, w, c) uint8, each image its own view."""
    T = tf()
    n, h, w = x.shape[:3]
    out = np.empty_like(x)
    for start in range(0, n, chunk):
        p = params[start:start + chunk]
        images = T.cast(T.convert_to_tensor(x[start:start + chunk]), T.float32)
        moved = T.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=T.convert_to_tensor(_transforms(p, h, w)), output_shape=[h, w],
            fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT")
        out[start:start + chunk] = np.clip(np.round(moved.numpy()), 0, 255).astype(x.dtype)
    return out


def render_all(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """x (n, h, w, c) and params (n, K, 5) -> (n * K, h, w, c): image i's view k at row i * K + k."""
    n, k = params.shape[:2]
    return render(np.repeat(x, k, axis=0), params.reshape(n * k, -1))


def _transforms(p: np.ndarray, h: int, w: int) -> np.ndarray:
    """ImageProjectiveTransformV3's rows (output pixel -> input pixel): input = c + M (out - c) + shift,
    with M = zoom * rotation * mirror about the centre c."""
    flip, angle, zoom, dx, dy = (p[:, i].astype(np.float64) for i in range(5))
    sx = np.where(flip > 0.5, -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    m00, m01, m10, m11 = zoom * cos * sx, -zoom * sin, zoom * sin * sx, zoom * cos
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a2 = cx + dx * w - m00 * cx - m01 * cy
    b2 = cy + dy * h - m10 * cx - m11 * cy
    zeros = np.zeros_like(m00)
    return np.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1).astype(np.float32)
