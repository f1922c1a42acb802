"""The out-of-distribution score an exported model carries as its second output, `ood_score`.

At export the model's penultimate features (the input of its last Dense layer: the pooled backbone
features, or the head's hidden layer) are computed on a stratified sample of the training split; their
class means and one shared, Ledoit-Wolf-shrunk covariance make a Mahalanobis reference (Lee et al.
2018), on the features scaled to unit length (without it a banana-leaf model's AUROC against CIFAR-10
was 0.963 and 0.695 against a held-out disease; with it 0.9999 and 0.829, benchmarks/ood.py). The score
of an image is its squared Mahalanobis distance to the nearest class mean, divided by
the feature count (so in-distribution images score about 1, and float16 never overflows). It is built
into the exported graph, so the SavedModel, every ONNX file and the TFLite files answer it in the same
call as the probabilities. The threshold is the validation split's `accept` quantile: that share of
held-out in-distribution images is accepted. docs/decisions.md ("An OOD score in the model") has the
measurements behind Mahalanobis over max-softmax, max-logit and energy.
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import storage
from serving.base.errors import UserError
from serving.base.manifest import OodReference, sha256_file
from training import progress
from training.env import keras, tf

OUTPUT = "ood_score"
METHOD = "mahalanobis"
REFERENCE_FILE = "ood_reference.npz"
RANK = 256  # covariance directions kept apart from the floor (Reference)
SCORE_BINS = 10  # population stability index bins of the score (validation quantiles)
BATCH = 64
Log = Callable[[str], None]


def check_options(accept: float, images: int) -> None:
    if not (np.isfinite(accept) and 0 < accept < 1):
        raise UserError(f"--ood-accept must be the share of in-distribution images to accept, between 0 and 1 "
                        f"(both excluded), not {accept:g}")
    if images < 2:
        raise UserError(f"--ood-images must be at least 2 (a class mean and a covariance need images), not {images}")


# ---- the reference ---------------------------------------------------------------------------

@dataclass
class Reference:
    """Class means and the shared covariance as its top `rank` eigen-directions plus one variance (`floor`)
    for all the others (probabilistic PCA's form). Exact when the other eigenvalues are equal, which they
    are whenever the training sample has fewer images than features (Ledoit-Wolf lifts the sample
    covariance's null space to one value); otherwise the smallest directions share their mean variance.
    The exported graph then multiplies by a dims x rank matrix, not dims x dims: for MobileNetV2's 1280
    features and rank 256, 1.3 MB and 0.33 M multiply-adds per image instead of 6.6 MB and 1.6 M
    (docs/decisions.md, "An OOD score in the model")."""
    means: np.ndarray      # (classes, dims) class means of the training features
    project: np.ndarray    # (dims, rank): eigen-directions scaled by sqrt(1/floor - 1/variance)
    floor: float           # the variance of every direction outside `project`
    shrinkage: float       # Ledoit-Wolf's weight on the scaled identity
    # Features scaled to unit length before anything else (references written before 2026-12-05: raw).
    normalized: bool = False

    @property
    def dims(self) -> int:
        return int(self.means.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """The exported graph's score in numpy (float64): squared Mahalanobis distance to the nearest class
        mean / dims, i.e. |f - m|^2 / floor - |(f - m) @ project|^2, divided by dims."""
        z = self.prepare(features)[:, None, :] - self.means.astype(np.float64)[None]
        d = (z ** 2).sum(-1) / self.floor - ((z @ self.project.astype(np.float64)) ** 2).sum(-1)
        return d.min(axis=1) / self.dims

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Features as the reference sees them (float64; unit length when `normalized`)."""
        f = np.asarray(features, np.float64)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) if self.normalized else f

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, means=self.means, project=self.project, floor=self.floor, shrinkage=self.shrinkage,
                 normalized=self.normalized)
        storage.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Reference":
        with np.load(path) as data:
            normalized = bool(data["normalized"]) if "normalized" in data.files else False
            return cls(data["means"], data["project"], float(data["floor"]), float(data["shrinkage"]), normalized)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """(shrunk covariance, shrinkage) of centred rows x, Ledoit & Wolf (2004).

    Written out (as scikit-learn's ledoit_wolf_shrinkage computes it) because scikit-learn is not a
    dependency for one formula: 1280 MobileNetV2 features from a few hundred leaf images give a singular
    sample covariance, and the shrinkage makes it invertible by the amount the data supports."""
    n, p = x.shape
    x = np.asarray(x, np.float64)
    cov = x.T @ x / n
    x2 = x ** 2
    mu = np.trace(cov) / p
    beta_ = float(np.sum(x2.T @ x2))
    delta_ = float(np.sum(cov ** 2))
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * np.trace(cov) + p * mu ** 2) / p
    shrinkage = 0.0 if delta <= 0 else float(min(beta, delta) / delta)
    shrunk = (1 - shrinkage) * cov
    shrunk.flat[:: p + 1] += shrinkage * mu
    return shrunk, shrinkage


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, rank: int | None = RANK,
        normalized: bool = True) -> Reference:
    """Class means and their shared (pooled within-class, shrunk) covariance, kept as its top `rank`
    directions plus one floor variance (None: every direction but one, which is exact). A class without
    training images has no mean: the score is the distance to the nearest class that has one."""
    features = Reference(np.zeros(0), np.zeros(0), 1.0, 0.0, normalized).prepare(features)
    present = [c for c in range(num_classes) if np.any(labels == c)]
    if not present or len(features) < 2:
        raise UserError("the OOD reference needs at least two training images")
    means = np.stack([features[labels == c].mean(axis=0) for c in present])
    cov, shrinkage = ledoit_wolf(features - means[np.searchsorted(present, labels)])
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]  # largest first
    values = np.maximum(values, values[0] * 1e-9)  # a constant feature (a dead ReLU) has no variance
    r = min(rank or len(values), len(values) - 1)
    floor = float(values[r:].mean())
    weights = np.sqrt(np.maximum(1 / floor - 1 / values[:r], 0.0))
    return Reference(means.astype(np.float32), (vectors[:, :r] * weights).astype(np.float32), floor, shrinkage,
                     normalized)


# ---- the model's features and scores --------------------------------------------------------

def last_dense(model):
    """The classifier: the model's last Dense layer (top level; the backbone is nested)."""
    K = keras()
    dense = [layer for layer in model.layers if isinstance(layer, K.layers.Dense)]
    if not dense:
        raise UserError(f"model {model.name} has no Dense classifier layer to take penultimate features from")
    return dense[-1]


def feature_model(model):
    """Raw pixels -> (penultimate features, probabilities), one pass."""
    K = keras()
    return K.Model(model.input, [last_dense(model).input, model.output])


def features_and_probs(model, x: np.ndarray, what: str, log: Log | None = None) -> tuple[np.ndarray, np.ndarray]:
    both = feature_model(model)
    feats, probs = [], []
    with progress.step(what, len(x), log=log) as advance:
        for start in range(0, len(x), BATCH):
            f, p = both(x[start:start + BATCH].astype(np.float32), training=False)
            feats.append(np.asarray(f))
            probs.append(np.asarray(p))
            advance(min(BATCH, len(x) - start))
    return np.concatenate(feats), np.concatenate(probs)


@functools.cache
def score_layer_class():
    """A layer holding the reference as constants: features -> the score (N,).

    The same distance as Reference.score, summed as squares of whitened parts, never as a difference
    of two large sums: z's coordinates along the kept directions, each over its own variance, plus
    what is left of z outside them over the floor variance. |z|^2 / floor - |z @ project|^2 cancels
    when the floor is small (a feature that barely varies): float32 kept 4 digits of it and float16
    none (a CNN's fp16 score was 27% off). Every term is scaled by 1/sqrt(dims) before it is squared,
    so sums stay near 1 and float16 files cannot overflow."""
    K, T = keras(), tf()

    class OodScore(K.layers.Layer):
        def __init__(self, reference: Reference, **kwargs):
            super().__init__(**kwargs)
            scale = 1 / np.sqrt(reference.dims)
            project = reference.project.astype(np.float64)
            kept = (project ** 2).sum(axis=0)                    # 1/floor - 1/variance per kept direction
            norm = np.sqrt(np.where(kept > 0, kept, 1.0))
            self._basis = np.where(kept > 0, project / norm, 0.0).astype(np.float32)   # orthonormal columns
            inverse = np.maximum(1 / reference.floor - kept, 0.0)                     # 1/variance
            self._inside = (np.sqrt(inverse) * scale).astype(np.float32)
            means = reference.means.astype(np.float64)
            along = means @ self._basis.astype(np.float64)
            # Each class mean split once, here: its coordinates along the kept directions, and the rest of it.
            self._means_along = along.astype(np.float32)
            self._means_rest = (means - along @ self._basis.astype(np.float64).T).astype(np.float32)
            self._outside = float(scale / np.sqrt(reference.floor))
            self._normalized = reference.normalized

        def build(self, input_shape):
            for name, value in (("means_along", self._means_along), ("means_rest", self._means_rest),
                                ("basis", self._basis), ("inside", self._inside)):
                setattr(self, name, self.add_weight(name=name, shape=value.shape, trainable=False,
                                                    initializer=K.initializers.Constant(value)))

        def call(self, features):
            if self._normalized:
                features = T.math.l2_normalize(features, axis=-1, epsilon=1e-24)
            # The image split the same way, once, whatever the number of classes: two dims x rank products.
            coords = T.matmul(features, self.basis)                            # (N, rank)
            rest_f = features - T.matmul(coords, self.basis, transpose_b=True)  # (N, dims)
            along = coords[:, None, :] - self.means_along[None]                # (N, classes, rank)
            rest = rest_f[:, None, :] - self.means_rest[None]                  # (N, classes, dims)
            d = (T.reduce_sum(T.square(along * self.inside), axis=-1)
                 + T.reduce_sum(T.square(rest * self._outside), axis=-1))
            return T.reduce_min(d, axis=-1)

    return OodScore


def scored_model(model, reference: Reference):
    """The model with a second output: pixels -> [probabilities, ood_score], one graph."""
    K = keras()
    score = score_layer_class()(reference, name=OUTPUT)(last_dense(model).input)
    return K.Model(model.input, [model.output, score], name=model.name)


def signature_outputs(model, image) -> dict[str, Any]:
    """The SavedModel's serving outputs for a plain or a scored model."""
    out = model(image, training=False)
    if isinstance(out, (list, tuple)):
        return {"probabilities": out[0], OUTPUT: out[1]}
    return {"probabilities": out}


# ---- export's step -----------------------------------------------------------------------------

@dataclass
class Fitted:
    reference: Reference
    entry: OodReference
    keras_scores: np.ndarray   # the check batch's scores through Keras


def psi_bins(scores: np.ndarray, bins: int = SCORE_BINS) -> tuple[list[float], list[float]]:
    """(inner bin edges, share per bin): quantile bins of the validation scores, fewer when few images."""
    k = int(max(2, min(bins, len(scores) // 5)))
    edges = np.unique(np.quantile(scores, np.linspace(0, 1, k + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, scores, side="right"), minlength=len(edges) + 1)
    return [float(e) for e in edges], [float(c) for c in counts / counts.sum()]


def fit_for_export(model, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                   check_images: np.ndarray, class_names: list[str], *, accept: float, images: int, seed: int,
                   log: Log | None = None) -> tuple[Fitted, Any]:
    """(the fitted reference and its manifest entry, the scored model to export)."""
    from training.data.sources import balanced_sample  # noqa: PLC0415

    (tx, ty), (vx, vy) = train, val
    if len(vy) == 0:
        raise UserError("the run has no validation split; the OOD threshold is set on one (retrain with --val-split)")
    tidx = balanced_sample(ty, images, seed)
    vidx = balanced_sample(vy, images, seed)
    tf_, _ = features_and_probs(model, tx[tidx], "OOD reference: training features", log)
    reference = fit(tf_, ty[tidx], len(class_names))
    vf, vp = features_and_probs(model, vx[vidx], "OOD threshold: validation features", log)
    val_scores = reference.score(vf)
    threshold = float(np.quantile(val_scores, accept, method="higher"))
    edges, shares = psi_bins(val_scores)
    mix = np.bincount(vp.argmax(1), minlength=len(class_names)) / len(vp)
    scored = scored_model(model, reference)
    keras_scores = np.asarray(scored(check_images.astype(np.float32), training=False)[1], np.float64)
    entry = OodReference(
        method=METHOD, output=OUTPUT, feature_layer=last_dense(model).name + ":input", dims=reference.dims,
        threshold=threshold, accept=accept, val_accepted=float(np.mean(val_scores <= threshold)),
        train_images=int(len(tidx)), val_images=int(len(vidx)), shrinkage=reference.shrinkage,
        normalized=reference.normalized,
        rank=int(reference.project.shape[1]),
        val_score_percentiles={str(q): float(np.percentile(val_scores, q)) for q in (5, 50, 95, 99)},
        score_bins=edges, score_reference=shares,
        class_reference={name: float(m) for name, m in zip(class_names, mix)})
    return Fitted(reference, entry, keras_scores), scored


def write_reference(fitted: Fitted, folder: Path) -> None:
    path = folder / REFERENCE_FILE
    fitted.reference.save(path)
    fitted.entry.file = REFERENCE_FILE
    fitted.entry.sha256 = sha256_file(path)


def score_parity(scores: np.ndarray | None, fitted: Fitted | None) -> dict[str, Any]:
    """How far a runtime's scores are from Keras's on the check batch (relative to the threshold), and the
    share of check images given the same in/out verdict."""
    if fitted is None or scores is None:
        return {}
    ref = fitted.keras_scores
    t = fitted.entry.threshold
    scores = np.asarray(scores, np.float64).reshape(-1)
    return {"ood_max_rel_diff": float(np.max(np.abs(scores - ref)) / max(t, 1e-12)),
            "ood_verdict_agreement": float(np.mean((scores <= t) == (ref <= t)))}


def parity_note(parity: dict[str, Any]) -> str:
    """The export log's words for score_parity's figures ('' without a score)."""
    if "ood_max_rel_diff" not in parity:
        return ""
    return (f", OOD score max |diff| {parity['ood_max_rel_diff']:.1e} x threshold, same verdict on "
            f"{parity['ood_verdict_agreement']:.0%}")


def onnx_nodes(nodes) -> list[str]:
    """The score's nodes in an ONNX graph (tf2onnx names them after the layer): int8 keeps them float,
    the features they read stay the dequantized float the classifier also reads."""
    return [n.name for n in nodes if f"/{OUTPUT}/" in n.name]


# ---- evaluating the score -----------------------------------------------------------------------

def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """P(an OOD image scores higher than an in-distribution one), ties half: the Mann-Whitney U statistic
    over n_in * n_out (scipy's), i.e. the area under the ROC curve of "score > t means OOD"."""
    from scipy.stats import mannwhitneyu  # noqa: PLC0415

    return float(mannwhitneyu(out_scores, in_scores).statistic / (len(in_scores) * len(out_scores)))
