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

Where the backbone names a mid-level layer (BackboneSpec.ood_layer: MobileNetV2's block_9_add), the
score is a weighted sum of three such distances: the penultimate one above and two on that layer's
globally averaged output (raw, and unit length: how strongly and which way it responds), each weighted
by 1 / its standard deviation over the validation split (then all scaled so validation images average
1). The late features alone miss what a small image of another domain is: banana leaves shrunk to 32 px
land among a CIFAR-10 model's class means (AUROC 0.42), while the mid-level block still sees their
colour and texture (0.99 alone, 0.986 summed, and every near-OOD leaf row at 0.77 or more:
docs/decisions.md, "An OOD score in the model").
"""
from __future__ import annotations

import functools
import io
from dataclasses import dataclass, replace
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
# Covariance directions of the penultimate term kept apart from the floor (Reference). 32 (256 until
# 2026-12-05, then 64): summed with the mid-level terms every benchmark row still meets its target
# (benchmarks/ood.py: 1.0000, 0.9861, near 0.842 / 0.777 / 0.893), and the graph's two 1280-wide
# products, what is left of the score's cost, halve: batch-1 CPU +2.3% median against +4.6% at 64
# (docs/decisions.md).
RANK = 32
PENULTIMATE = ""  # a term's layer: the input of the model's last Dense layer
# The mid-level layer gives two terms, its raw and its unit-length features (normalized flags, in order).
# With the penultimate term (rank 64, benchmarks/ood_candidates.py, AUROC far-cifar / near sigatoka,
# cordana, panama): raw alone 0.963 / 0.871, 0.717, 0.874 (cordana under the 0.75 target); unit alone
# 0.977 / 0.816, 0.750, 0.912; both 0.986 / 0.851, 0.770, 0.901, the only one over every target.
MID_FORMS = (False, True)
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
    features and rank 32, 0.16 MB and 41 k multiply-adds per projection instead of 6.6 MB and 1.6 M
    (docs/decisions.md, "An OOD score in the model")."""
    means: np.ndarray      # (classes, dims) class means of the training features
    project: np.ndarray    # (dims, rank): eigen-directions scaled by sqrt(1/floor - 1/variance)
    floor: float           # the variance of every direction outside `project`
    shrinkage: float       # Ledoit-Wolf's weight on the scaled identity
    # Features scaled to unit length before anything else (references written before 2026-12-05: raw).
    normalized: bool = False
    layer: str = PENULTIMATE  # where the features come from (another layer: its output, globally averaged)
    weight: float = 1.0       # the term's weight in the summed score (Score)

    @property
    def dims(self) -> int:
        return int(self.means.shape[1])

    def score(self, features: np.ndarray) -> np.ndarray:
        """The exported graph's score in numpy (float64): squared Mahalanobis distance to the nearest class
        mean / dims, i.e. |f - m|^2 / floor - |(f - m) @ project|^2, divided by dims."""
        z = self.prepare(features)[:, None, :] - self.means.astype(np.float64)[None]
        d = (z ** 2).sum(-1) / self.floor - ((z @ self.project.astype(np.float64)) ** 2).sum(-1)
        return self.weight * d.min(axis=1) / self.dims

    def prepare(self, features: np.ndarray) -> np.ndarray:
        """Features as the reference sees them (float64; unit length when `normalized`)."""
        f = np.asarray(features, np.float64)
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) if self.normalized else f

    def arrays(self, prefix: str = "") -> dict[str, Any]:
        return {prefix + k: v for k, v in (("means", self.means), ("project", self.project), ("floor", self.floor),
                                           ("shrinkage", self.shrinkage), ("normalized", self.normalized),
                                           ("layer", self.layer), ("weight", self.weight))}

    @classmethod
    def from_arrays(cls, data, prefix: str = "") -> "Reference":
        def get(key: str, default: Any) -> Any:
            return data[prefix + key] if prefix + key in data.files else default

        return cls(data[prefix + "means"], data[prefix + "project"], float(data[prefix + "floor"]),
                   float(data[prefix + "shrinkage"]), bool(get("normalized", False)), str(get("layer", PENULTIMATE)),
                   float(get("weight", 1.0)))


@dataclass
class Score:
    """The exported score: the sum of its terms' (weighted) Mahalanobis scores, each on its own layer's
    features. One term (the penultimate features, weight 1) is the score as exported before 2026-12-05."""
    terms: list[Reference]

    @property
    def tap(self) -> str | None:
        """The mid-level layer a term reads, if any."""
        return next((t.layer for t in self.terms if t.layer != PENULTIMATE), None)

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """features: layer -> (N, dims) as layer_features gives them."""
        return np.sum([t.score(features[t.layer]) for t in self.terms], axis=0)

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        arrays = {"terms": len(self.terms)}
        for i, term in enumerate(self.terms):
            arrays.update(term.arrays(f"t{i}_"))
        np.savez(buf, **arrays)
        storage.write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> "Score":
        with np.load(path) as data:
            if "terms" not in data.files:  # written before 2026-12-05: one reference, no prefix
                return cls([Reference.from_arrays(data)])
            return cls([Reference.from_arrays(data, f"t{i}_") for i in range(int(data["terms"]))])


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
        normalized: bool = True, layer: str = PENULTIMATE) -> Reference:
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
                     normalized, layer)


def fit_score(train: dict[str, np.ndarray], labels: np.ndarray, val: dict[str, np.ndarray],
              num_classes: int) -> Score:
    """The penultimate term (unit-length features, RANK directions) and, when `train` has a mid-level
    layer's features, a term on each of its forms (MID_FORMS: raw and unit length; every direction: they
    have few channels). With several terms each is weighted by 1 / its standard deviation over the
    validation sample, i.e. the terms' z-scores are summed (only in-distribution images set it); then all
    weights are scaled so validation images average 1, which keeps the score positive and float16-safe
    like a single term's."""
    terms = [fit(train[PENULTIMATE], labels, num_classes)]
    terms += [fit(f, labels, num_classes, rank=None, normalized=form, layer=layer)
              for layer, f in train.items() if layer != PENULTIMATE for form in MID_FORMS]
    if len(terms) == 1:
        return Score(terms)
    val_scores = [t.score(val[t.layer]) for t in terms]
    spread = [max(float(np.std(v)), 1e-12 * float(np.mean(v)) + 1e-30) for v in val_scores]
    total = sum(float(np.mean(v)) / sd for v, sd in zip(val_scores, spread))
    return Score([replace(t, weight=1 / (sd * total)) for t, sd in zip(terms, spread)])


# ---- the model's features and scores --------------------------------------------------------

def last_dense(model):
    """The classifier: the model's last Dense layer (top level; the backbone is nested)."""
    K = keras()
    dense = [layer for layer in model.layers if isinstance(layer, K.layers.Dense)]
    if not dense:
        raise UserError(f"model {model.name} has no Dense classifier layer to take penultimate features from")
    return dense[-1]


def _find_tap(model, tap: str | None):
    """(the nested model holding layer `tap`, or None when it is a top-level layer), or None when the
    model has no such layer (another backbone, or one truncated before it)."""
    K = keras()
    if not tap:
        return None
    if any(layer.name == tap for layer in model.layers):
        return (None,)
    for layer in model.layers:
        if isinstance(layer, K.Model) and any(inner.name == tap for inner in layer.layers):
            return (layer,)
    return None


def tapped_model(model, tap: str | None = None):
    """Raw pixels -> [probabilities, penultimate features] (+ layer `tap`'s output map), one pass.

    Keras cannot read a layer inside the nested backbone from the outer graph, so with a tap the model's
    layers are applied again in order (every model build() makes is such a chain), the backbone as a
    two-output copy of itself; the same layers and weights, so the probabilities are the model's own
    (fit_for_export checks them). Test-time augmentation's view mean is applied to the map too."""
    K = keras()
    return K.Model(model.input, _tapped_tensors(model, tap) or [model.output, last_dense(model).input])


def _tapped_tensors(model, tap: str | None) -> list | None:
    """[probabilities, penultimate, tap's map] in a graph on model.input, or None without that layer."""
    K = keras()
    found = _find_tap(model, tap)
    if found is None:
        return None
    dense = last_dense(model)
    (holder,) = found
    x, tapped, penultimate = model.input, None, None
    for layer in model.layers[1:]:
        if layer is dense:
            penultimate = x
        if layer is holder:
            two = K.Model(holder.input, [holder.output, holder.get_layer(tap).output], name=holder.name + "_tapped")
            x, tapped = two(x, training=False)
        else:
            x = layer(x)
            if layer.name == tap:
                tapped = x
            elif tapped is not None and layer.name == "tta_mean":
                tapped = layer(tapped)
    return [x, penultimate, tapped]


def _pooled(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(1, 2)) if x.ndim == 4 else x


def layer_features(model, x: np.ndarray, what: str, log: Log | None = None,
                   tap: str | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({PENULTIMATE: features, tap: its pooled output (when the model has it)}, probabilities)."""
    both = tapped_model(model, tap)
    feats: dict[str, list] = {}
    probs = []
    with progress.step(what, len(x), log=log) as advance:
        for start in range(0, len(x), BATCH):
            out = both(x[start:start + BATCH].astype(np.float32), training=False)
            probs.append(np.asarray(out[0]))
            feats.setdefault(PENULTIMATE, []).append(np.asarray(out[1]))
            if len(out) > 2:
                feats.setdefault(tap, []).append(_pooled(np.asarray(out[2])))
            advance(min(BATCH, len(x) - start))
    return {k: np.concatenate(v) for k, v in feats.items()}, np.concatenate(probs)


def features_and_probs(model, x: np.ndarray, what: str, log: Log | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(penultimate features, probabilities)."""
    feats, probs = layer_features(model, x, what, log)
    return feats[PENULTIMATE], probs


def _term_constants(reference: Reference) -> dict[str, Any]:
    """One term's graph constants: the distance as squares of whitened parts (score_layer_class).

    The kept directions are extended by the class means' parts outside them (at most one direction per
    class, each with the floor variance, so the covariance is unchanged): every class mean then lies in
    the extended basis, and what is left of an image outside it is one vector per image, not one per
    class. The graph's largest tensors were (images, classes, dims) before: 0.11 of the score's 0.48 ms
    per call (onnxruntime's profile of the banana-leaf model, load 7)."""
    scale = np.sqrt(reference.weight / reference.dims)
    project = reference.project.astype(np.float64)
    kept = (project ** 2).sum(axis=0)                    # 1/floor - 1/variance per kept direction
    norm = np.sqrt(np.where(kept > 0, kept, 1.0))
    basis = np.where(kept > 0, project / norm, 0.0)      # orthonormal columns
    inverse = np.maximum(1 / reference.floor - kept, 0.0)  # 1/variance
    means = reference.means.astype(np.float64)
    rest = means - (means @ basis) @ basis.T             # the class means outside the kept directions
    rest -= (rest @ basis) @ basis.T                     # again: basis came from float32
    u, sv, _ = np.linalg.svd(rest.T, full_matrices=False)
    # Only directions the means really have: rounding leaves ~1e-7 of |mean| in every direction, and a
    # column made of it is not orthogonal to the basis (block_9_add, 64 dims with 63 kept: 1e-6 of
    # noise counted twice moved a leaf model's scores by half the threshold).
    room = basis.shape[0] - int(np.sum(kept > 0))
    real = sv > EXTRA_TOLERANCE * max(float(np.linalg.norm(means, axis=1).max()), 1e-30)
    extra = u[:, :min(int(real.sum()), room)]
    full = np.concatenate([basis, extra], axis=1)
    inside = np.concatenate([np.sqrt(inverse), np.full(extra.shape[1], 1 / np.sqrt(reference.floor))]) * scale
    return {"basis": full.astype(np.float32), "inside": inside.astype(np.float32),
            "means_along": (means @ full).astype(np.float32),
            "outside": float(scale / np.sqrt(reference.floor)), "normalized": reference.normalized}


EXTRA_TOLERANCE = 1e-4  # a class mean's part outside the kept directions, relative to |mean|, that counts


def _fused_constants(score: Score) -> dict[str, Any]:
    """Every term's constants (_term_constants) laid out so the graph runs each step once for all terms.

    Each term keeps its own basis (products by zero blocks of a block-diagonal one cost more than a node),
    but the coordinates are concatenated (R = the terms' kept directions and class-mean extras summed):
    `means_along` is (classes, 1, R), the terms' along-parts side by side (a term with fewer class means
    repeats its first ones: a repeated mean leaves the nearest distance as it was), and `indicator`
    (R x terms, 0/1) sums each term's squared parts per class; then the nearest class per term is taken
    and those minima summed with the squared rest parts. A term whose basis spans all its dims (the
    mid-level term: 63 kept directions and one class-mean extra in 64 dims) has no rest: its
    back-projection would give rounding noise only, so `rest` lists the others.

    The scales are folded into constants, not applied by nodes of their own: a term with a rest enters
    as its features times its `outside` scale a (a normalized term's norm is taken of the features over a:
    `sum_weights` = 1/a^2, `epsilon` / a^2), its forward basis is divided by a and its back-projection
    multiplied by it, so the rest comes out already scaled; with `folded`, each kept direction's `inside`
    scale multiplies its forward column and the class means' coordinates and divides its back-projection
    row. Only where every such factor stays within FOLD_LIMIT (float16 files hold them); otherwise
    `inside` stays a node of its own and `scale_after` multiplies the features by a."""
    terms = [_term_constants(t) for t in score.terms]
    classes = max(len(t["means_along"]) for t in terms)
    ranks = [t["basis"].shape[1] for t in terms]
    r_at = np.cumsum([0] + ranks)
    rest = [i for i, t in enumerate(terms) if t["basis"].shape[1] < t["basis"].shape[0]]
    a = [float(t["outside"]) if i in rest else 1.0 for i, t in enumerate(terms)]
    inside = [t["inside"].astype(np.float64) for t in terms]
    folded = all(float(np.max(g / s)) <= FOLD_LIMIT for g, s in zip(inside, a)) and all(
        float(np.min(inside[i])) > 0 and float(np.max(a[i] / inside[i])) <= FOLD_LIMIT for i in rest)
    means = np.zeros((classes, 1, r_at[-1]), np.float64)
    indicator = np.zeros((r_at[-1], len(terms)), np.float32)
    forward, back, sum_weights, epsilon, scale_after = [], [], [], [], []
    for i, t in enumerate(terms):
        basis = t["basis"].astype(np.float64)
        g = inside[i] if folded else np.ones_like(inside[i])
        means[:, 0, r_at[i]:r_at[i + 1]] = t["means_along"][np.arange(classes) % len(t["means_along"])] * g
        indicator[r_at[i]:r_at[i + 1], i] = 1.0
        forward.append((basis * g / a[i]).astype(np.float32))
        back.append((basis / g * a[i]).T.astype(np.float32) if i in rest else None)
        into_norm = t["normalized"] and 1 / FOLD_LIMIT <= a[i] ** -2 <= FOLD_LIMIT
        sum_weights.append(np.full((basis.shape[0], 1), a[i] ** -2 if into_norm else 1.0, np.float32)
                           if t["normalized"] else None)
        epsilon.append(NORM_EPSILON * (a[i] ** -2 if into_norm else 1.0))
        scale_after.append(None if into_norm or a[i] == 1.0 else a[i])
    return {"forward": forward, "back": back, "normalized": [t["normalized"] for t in terms],
            "sum_weights": sum_weights, "epsilon": epsilon, "scale_after": scale_after, "rest": rest,
            "means_along": means.astype(np.float32), "indicator": indicator, "folded": folded,
            "inside": np.concatenate([t["inside"] for t in terms])}


FOLD_LIMIT = 1e4  # the largest factor _fused_constants folds into a constant (float16 holds 6.5e4)
NORM_EPSILON = 1e-24  # added to |features|^2 under the root: zero features stay zero (l2_normalize's, a floor there)


@functools.cache
def score_layer_class():
    """A layer holding the score's terms as constants: [penultimate features, (tap map)] -> the score (N,).

    Each term is the same distance as Reference.score, summed as squares of whitened parts, never as a
    difference of two large sums: z's coordinates along the kept directions, each over its own variance,
    plus what is left of z outside them over the floor variance. |z|^2 / floor - |z @ project|^2 cancels
    when the floor is small (a feature that barely varies): float32 kept 4 digits of it and float16
    none (a CNN's fp16 score was 27% off). Every term is scaled by sqrt(weight / dims) before it is
    squared, so sums stay near 1 and float16 files cannot overflow. The tap map is averaged here, so
    int8 keeps it float with the rest of the score's nodes (onnx_nodes).

    The terms share their steps after the projections and the scales live in the constants
    (_fused_constants): 25 ONNX nodes for MobileNetV2's three terms (19 for the two it had before
    2026-12-05 late, where a chain per term took 35). At batch 1 the score's cost is the two
    1280 x (rank + classes) products and the count of small nodes, not their arithmetic (docs/decisions.md, "An OOD
    score in the model")."""
    K, T = keras(), tf()

    class OodScore(K.layers.Layer):
        def __init__(self, score: Score, **kwargs):
            super().__init__(**kwargs)
            self._fused = _fused_constants(score)
            self._inputs = [0 if t.layer == PENULTIMATE else 1 for t in score.terms]

        def build(self, input_shape):
            c = self._fused

            def constant(name: str, value: np.ndarray | None):
                return None if value is None else self.add_weight(
                    name=name, shape=value.shape, trainable=False, initializer=K.initializers.Constant(value))

            self._forward = [constant(f"t{i}_forward", v) for i, v in enumerate(c["forward"])]
            self._back = [constant(f"t{i}_back", v) for i, v in enumerate(c["back"])]
            self._sum_weights = [constant(f"t{i}_sum_weights", v) for i, v in enumerate(c["sum_weights"])]
            self._means_along, self._indicator = constant("means_along", c["means_along"]), constant(
                "indicator", c["indicator"])
            self._inside = None if c["folded"] else constant("inside", c["inside"])

        def call(self, inputs):
            inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
            if len(inputs) > 1 and len(inputs[1].shape) == 4:
                inputs[1] = T.reduce_mean(inputs[1], axis=[1, 2])
            c = self._fused
            x = []
            for i, which in enumerate(self._inputs):
                f = inputs[which]
                if c["normalized"][i]:  # f / (|f| / a): |f|^2 / a^2 + epsilon as one product (onnxruntime: a Gemm)
                    epsilon = np.full(1, c["epsilon"][i], np.float32)  # shape (1,), not a scalar: Gemm's bias
                    f = f / T.sqrt(T.matmul(T.square(f), self._sum_weights[i]) + epsilon)
                x.append(f if c["scale_after"][i] is None else f * c["scale_after"][i])
            # Each term's image split once, whatever the number of classes: dims x (rank + classes) products.
            coords = [T.matmul(f, forward) for f, forward in zip(x, self._forward)]          # (N, R_t)
            rest = [x[i] - T.matmul(coords[i], self._back[i]) for i in c["rest"]]           # (N, D_t), scaled
            along = (coords[0] if len(coords) == 1 else T.concat(coords, axis=-1)) - self._means_along
            if self._inside is not None:
                along = along * self._inside
            parts = [T.reduce_min(T.matmul(T.square(along), self._indicator), axis=0)]      # (N, terms)
            if rest:  # no class mean there: one vector per image
                parts.append(T.square(rest[0] if len(rest) == 1 else T.concat(rest, axis=-1)))
            return T.reduce_sum(parts[0] if len(parts) == 1 else T.concat(parts, axis=-1), axis=-1)

    return OodScore


def scored_model(model, score: Score):
    """The model with a second output: pixels -> [probabilities, ood_score], one graph."""
    K = keras()
    outputs = _tapped_tensors(model, score.tap)
    if outputs is None:
        probs, inputs = model.output, [last_dense(model).input]
    else:
        probs, inputs = outputs[0], list(outputs[1:])
    value = score_layer_class()(score, name=OUTPUT)(inputs if len(inputs) > 1 else inputs[0])
    return K.Model(model.input, [probs, value], name=model.name)


def signature_outputs(model, image) -> dict[str, Any]:
    """The SavedModel's serving outputs for a plain or a scored model."""
    out = model(image, training=False)
    if isinstance(out, (list, tuple)):
        return {"probabilities": out[0], OUTPUT: out[1]}
    return {"probabilities": out}


# ---- export's step -----------------------------------------------------------------------------

@dataclass
class Fitted:
    reference: Score
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
                   tap: str | None = None, log: Log | None = None) -> tuple[Fitted, Any]:
    """(the fitted score and its manifest entry, the scored model to export). `tap`: the backbone's
    mid-level layer (BackboneSpec.ood_layer); ignored when the model has no such layer."""
    from training.data.sources import balanced_sample  # noqa: PLC0415

    (tx, ty), (vx, vy) = train, val
    if len(vy) == 0:
        raise UserError("the run has no validation split; the OOD threshold is set on one (retrain with --val-split)")
    tidx = balanced_sample(ty, images, seed)
    vidx = balanced_sample(vy, images, seed)
    tf_, _ = layer_features(model, tx[tidx], "OOD reference: training features", log, tap)
    vf, vp = layer_features(model, vx[vidx], "OOD threshold: validation features", log, tap)
    score = fit_score(tf_, ty[tidx], vf, len(class_names))
    val_scores = score.score(vf)
    threshold = float(np.quantile(val_scores, accept, method="higher"))
    edges, shares = psi_bins(val_scores)
    mix = np.bincount(vp.argmax(1), minlength=len(class_names)) / len(vp)
    scored = scored_model(model, score)
    check = check_images.astype(np.float32)
    probs, keras_scores = (np.asarray(o, np.float64) for o in scored(check, training=False))
    # The tapped graph applies the model's layers again: it must answer what the model answers.
    if not np.allclose(probs, np.asarray(model(check, training=False)), atol=1e-5):
        raise AssertionError(f"the OOD score's graph changed {model.name}'s probabilities (tap {score.tap})")
    main = score.terms[0]
    layers = [last_dense(model).name + ":input"] + [t.layer + (":mean:unit" if t.normalized else ":mean")
                                                    for t in score.terms[1:]]
    entry = OodReference(
        method=METHOD, output=OUTPUT, feature_layer="+".join(layers), dims=main.dims,
        threshold=threshold, accept=accept, val_accepted=float(np.mean(val_scores <= threshold)),
        train_images=int(len(tidx)), val_images=int(len(vidx)), shrinkage=main.shrinkage,
        normalized=main.normalized,
        rank=int(main.project.shape[1]),
        val_score_percentiles={str(q): float(np.percentile(val_scores, q)) for q in (5, 50, 95, 99)},
        score_bins=edges, score_reference=shares,
        class_reference={name: float(m) for name, m in zip(class_names, mix)},
        terms=[{"layer": layer, "dims": t.dims, "normalized": t.normalized, "rank": int(t.project.shape[1]),
                "shrinkage": t.shrinkage, "weight": t.weight} for layer, t in zip(layers, score.terms)]
        if len(score.terms) > 1 else None)
    return Fitted(score, entry, keras_scores.reshape(-1)), scored


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
