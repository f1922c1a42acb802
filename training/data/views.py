"""Fixed augmented views: `--augment-views K` trains on K views of each training image, drawn once from
the --augment-policy recipe and the seed, one view per image each epoch.

A view is a geometric transform in relative coordinates (a mirror, a rotation and zoom about the
centre, a shift in fractions of the side), so the same view can be rendered at any image size: the
student's images at its size and the teacher's at its own show the same crop of the same picture.
That is what lets `--teacher` take the teacher's probabilities on the very views the student trains
on ("consistent teaching", Beyer et al., CVPR 2022), computed once and cached, where augmentation
layers inside the model draw a new view every step that no cached teacher output could follow.

Recipes (the --augment-policy names; seed and flip-crop as the layers inside the model draw them):
  seed        mirror (p 0.5), rotation up to 0.05 of a turn either way, zoom 0.9-1.1
  flip-crop   mirror (p 0.5), a shift of up to 1/8 of the side on each axis
  crop        mirror (p 0.5) and an "inception crop": a window of 35-100% of the image's area with
              aspect (width / height) 3/4-4/3 (log-uniform), anywhere inside the image, stretched to
              the full size
  mixup       seed's view of the image mixed with the same view of a partner training image:
              lam * view_i + (1 - lam) * view_j, the partner j (never i) and lam ~ Beta(1, 1) drawn once
              per view (Zhang et al. 2018; "function matching" in Beyer et al.)
  crop-mixup  crop's view, mixed the same way (the paper's recipe: mixup on inception crops)
All fill with the reflected image and sample bilinearly (the layers' flip-crop uses nearest, which
would not match across sizes). seed and flip-crop's views have 5 parameters; the others 8 (the
horizontal zoom's vertical twin, the partner's index and lam; no partner is index -1, lam 1).

The mixing policies (MIXING) change the labels too: the view of i mixed with j is labelled
lam * onehot(y_i) + (1 - lam) * onehot(y_j) (`mixed_labels`), which the CNN alone trains on, and a
teacher's probabilities are taken on the mixed image itself.
"""
from __future__ import annotations

import hashlib

import numpy as np

from training.env import tf

VERSION = 1        # bump when a recipe's drawing or rendering changes: it keys the teacher's cached views
MAX_VIEWS = 256    # a sanity bound; what the views take (K times the images' bytes) is checked against free memory
MIXING = ("mixup", "crop-mixup")                # the policies that mix two images (and their labels)
CROP_AREA, CROP_ASPECT, MIX_ALPHA = (0.35, 1.0), (3 / 4, 4 / 3), 1.0


def draw(policy: str, n: int, views: int, seed: int) -> np.ndarray:
    """(n, views, 5) float32: each view's mirror (0/1), rotation (radians), zoom, x and y shift (fractions);
    (n, views, 8) for crop and the mixing policies: then the vertical zoom, the partner image (-1: none)
    and lam."""
    rng = np.random.default_rng((seed, VERSION, 0x71E35))
    flip = rng.random((n, views)) < 0.5
    angle = np.zeros((n, views))
    zoom = np.ones((n, views))
    shift = np.zeros((n, views, 2))
    if policy == "flip-crop":
        shift = rng.uniform(-0.125, 0.125, (n, views, 2))
    elif policy in ("seed", "mixup"):
        angle = rng.uniform(-0.05, 0.05, (n, views)) * 2 * np.pi
        zoom = rng.uniform(0.9, 1.1, (n, views))
    zoom_y = zoom.copy()
    if policy in ("crop", "crop-mixup"):
        # A window of area s and aspect r (width / height) in relative units: width sqrt(s r), height
        # sqrt(s / r), each at most the side; its centre anywhere that keeps it inside the image.
        area = rng.uniform(*CROP_AREA, (n, views))
        aspect = np.exp(rng.uniform(np.log(CROP_ASPECT[0]), np.log(CROP_ASPECT[1]), (n, views)))
        zoom = np.minimum(np.sqrt(area * aspect), 1.0)
        zoom_y = np.minimum(np.sqrt(area / aspect), 1.0)
        shift = np.stack([rng.uniform(-1, 1, (n, views)) * (1 - zoom) / 2,
                          rng.uniform(-1, 1, (n, views)) * (1 - zoom_y) / 2], axis=-1)
    columns = [flip, angle, zoom, shift[..., 0], shift[..., 1]]
    if policy in ("seed", "flip-crop"):
        return np.stack(columns, axis=-1).astype(np.float32)
    partner, lam = np.full((n, views), -1.0), np.ones((n, views))
    if policy in MIXING and n > 1:
        partner = (np.arange(n)[:, None] + rng.integers(1, n, (n, views))) % n  # any image but i
        lam = rng.beta(MIX_ALPHA, MIX_ALPHA, (n, views))
    return np.stack([*columns, zoom_y, partner, lam], axis=-1).astype(np.float32)


def mixed_labels(y: np.ndarray, params: np.ndarray, num_classes: int) -> np.ndarray:
    """(n * K, classes) float32: each view's label, lam * onehot(y_i) + (1 - lam) * onehot(y_partner)
    (one-hot where a view has no partner), row i * K + k as render_all lays the views out."""
    n, k = params.shape[:2]
    onehot = np.eye(num_classes, dtype=np.float64)[np.asarray(y, np.int64)]
    own = np.repeat(onehot, k, axis=0)
    if params.shape[-1] < 8:
        return own.astype(np.float32)
    flat = params.reshape(n * k, -1)
    partner, lam = flat[:, 6].astype(np.int64), flat[:, 7].astype(np.float64)[:, None]
    other = np.where((partner >= 0)[:, None], onehot[np.maximum(partner, 0)], own)
    return (lam * own + (1 - lam) * other).astype(np.float32)


def recipe_key(policy: str, params: np.ndarray) -> str:
    """What decides the views, for a cache key: recipe version, policy and the drawn parameters."""
    return hashlib.sha256(f"views v{VERSION} {policy} {params.shape}".encode()
                          + np.ascontiguousarray(params).tobytes()).hexdigest()[:16]


def render(x: np.ndarray, params: np.ndarray, chunk: int = 256) -> np.ndarray:
    """x (n, h, w, c) uint8 and params (n, 5 or 8) -> the views (n, h, w, c) uint8, each image its own
    view. A mixing view (partner index >= 0) mixes in the same view of x[index]: x is the training
    images the indices refer to."""
    T = tf()
    n, h, w = x.shape[:3]
    out = np.empty_like(x)
    for start in range(0, n, chunk):
        p = params[start:start + chunk]
        t = T.convert_to_tensor(_transforms(p, h, w))

        def moved(images: np.ndarray) -> np.ndarray:
            return T.raw_ops.ImageProjectiveTransformV3(
                images=T.cast(T.convert_to_tensor(images), T.float32), transforms=t, output_shape=[h, w],
                fill_value=0.0, interpolation="BILINEAR", fill_mode="REFLECT").numpy()

        view = moved(x[start:start + chunk])
        if p.shape[1] >= 8 and (p[:, 6] >= 0).any():
            partner, lam = p[:, 6].astype(np.int64), p[:, 7].astype(np.float32)[:, None, None, None]
            other = moved(x[np.maximum(partner, 0)])
            view = np.where((partner >= 0)[:, None, None, None], lam * view + (1 - lam) * other, view)
        out[start:start + chunk] = np.clip(np.round(view), 0, 255).astype(x.dtype)
    return out


def render_all(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """x (n, h, w, c) and params (n, K, 5 or 8) -> (n * K, h, w, c): image i's view k at row i * K + k."""
    n, k = params.shape[:2]
    out = np.empty((n, k, *x.shape[1:]), x.dtype)  # filled view by view: no second copy at the peak
    for j in range(k):
        out[:, j] = render(x, params[:, j])
    return out.reshape(n * k, *x.shape[1:])


def _transforms(p: np.ndarray, h: int, w: int) -> np.ndarray:
    """ImageProjectiveTransformV3's rows (output pixel -> input pixel): input = c + M (out - c) + shift,
    with M = diag(zoom, zoom_y) * rotation * mirror about the centre c."""
    flip, angle, zoom, dx, dy = (p[:, i].astype(np.float64) for i in range(5))
    zoom_y = p[:, 5].astype(np.float64) if p.shape[1] > 5 else zoom
    sx = np.where(flip > 0.5, -1.0, 1.0)
    cos, sin = np.cos(angle), np.sin(angle)
    m00, m01, m10, m11 = zoom * cos * sx, -zoom * sin, zoom_y * sin * sx, zoom_y * cos
    cx, cy = (w - 1) / 2, (h - 1) / 2
    a2 = cx + dx * w - m00 * cx - m01 * cy
    b2 = cy + dy * h - m10 * cx - m11 * cy
    zeros = np.zeros_like(m00)
    return np.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1).astype(np.float32)
