"""Temperature scaling at the end of training, baked into the model's last linear layer.

One scalar T is fitted on the validation split by minimising its negative log-likelihood
(training.record.metrics.fit_temperature). The classifier's kernel and bias are then divided by T:
softmax((Wx + b) / T) is exactly the calibrated distribution, so Keras, the SavedModel and every
ONNX variant serve calibrated probabilities with no extra layer, and the argmax does not move
(a positive scale keeps the order of the logits). Every head tlserve builds ends in that Dense layer
followed only by linear steps and the softmax: TTA averages the views *before* it, --logit-scale
multiplies after it, --from-run heads are a Dense 'probabilities' like the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from training.record import metrics
from training.env import keras

Log = Callable[[str], None]


@dataclass
class Calibrated:
    """What calibration did; `finish` adds the test split's ECE once the calibrated model has run on it."""
    facts: dict[str, Any]
    test_before: np.ndarray | None = field(default=None, repr=False)

    def finish(self, test_probs_after: np.ndarray, test_y: np.ndarray) -> None:
        if self.test_before is None:
            return
        self.facts["test_ece_before"] = metrics.ece(test_y, self.test_before)
        self.facts["test_ece_after"] = metrics.ece(test_y, test_probs_after)
        self.facts["test_nll_before"] = metrics.nll(test_y, self.test_before)
        self.facts["test_nll_after"] = metrics.nll(test_y, test_probs_after)
        # Measured, not assumed: the share of test images whose top class is the same after baking.
        self.facts["test_top1_agreement"] = float(np.mean(self.test_before.argmax(1) == test_probs_after.argmax(1)))


def calibrate(model, enabled: bool, val_data, val_y: np.ndarray, test_data, log: Log) -> Calibrated:
    """Fit T on the validation split and bake it into `model` (in place); skipped with a logged reason."""
    if not enabled:
        return Calibrated({"temperature": None, "skipped": "turned off (--no-calibrate)"})
    if val_data is None or not len(val_y):
        reason = "no validation split to fit a temperature on (--val-split 0)"
        log(f"calibration skipped: {reason}")
        return Calibrated({"temperature": None, "skipped": reason})
    val_probs = model.predict(val_data, verbose=0)
    held_out = cross_check(val_y, val_probs)
    if held_out is not None:
        log(f"calibration skipped: {held_out}")
        return Calibrated({"temperature": None, "skipped": held_out, "val_images": int(len(val_y))})
    temperature = metrics.fit_temperature(val_y, val_probs)
    val_after = metrics.apply_temperature(val_probs, temperature)
    test_before = model.predict(test_data, verbose=0)
    layer = bake(model, temperature)
    facts = {"temperature": temperature, "layer": layer, "fitted_on": "val", "val_images": int(len(val_y)),
             "val_nll_before": metrics.nll(val_y, val_probs), "val_nll_after": metrics.nll(val_y, val_after),
             "val_ece_before": metrics.ece(val_y, val_probs), "val_ece_after": metrics.ece(val_y, val_after)}
    log(f"calibration: temperature {temperature:.3f} (baked into '{layer}'); validation ECE "
        f"{facts['val_ece_before']:.4f} -> {facts['val_ece_after']:.4f}, NLL {facts['val_nll_before']:.4f} -> "
        f"{facts['val_nll_after']:.4f}")
    return Calibrated(facts, test_before)


CV_FOLDS = 5
MIN_T = 2.0  # the held-out improvement must be at least two standard errors (about 95% one-sided)


def cross_check(val_y: np.ndarray, val_probs: np.ndarray, seed: int = 0) -> str | None:
    """Why a temperature fitted on this validation split should not be baked in, or None to bake it.

    A temperature fitted on a few dozen images can make new images worse: on banana-leaf's 45
    validation images the baked T raised the test log-loss in 4 of 4 runs, though a temperature
    fitted on half the split lowered the other half's. So the temperature is cross-validated on
    the validation split (5 folds: fit on four, score the log-loss on the fifth) and kept only when
    its improvement is clear of the folds' noise: a mean gain of at least two standard errors. Those
    banana-leaf runs scored t = -1.21 to +0.27 (skipped); a CIFAR-10 CNN with 5,000 validation
    images scored t = -4.10 (kept); benchmarks/calibration_cv.py, docs/decisions.md."""
    n = len(val_y)
    if n < 2 * CV_FOLDS:
        return f"{n} validation images are too few to fit a temperature on"
    folds = np.array_split(np.random.default_rng(seed).permutation(n), CV_FOLDS)
    gains = []
    for k, held in enumerate(folds):
        fit = np.concatenate([f for j, f in enumerate(folds) if j != k])
        t = metrics.fit_temperature(val_y[fit], val_probs[fit])
        gains.append(metrics.nll(val_y[held], metrics.apply_temperature(val_probs[held], t))
                     - metrics.nll(val_y[held], val_probs[held]))
    mean, spread = float(np.mean(gains)), float(np.std(gains, ddof=1))
    t_stat = mean / (spread / np.sqrt(CV_FOLDS)) if spread > 0 else (-np.inf if mean < 0 else np.inf)
    if t_stat > -MIN_T:
        return (f"cross-validated on the {n} validation images, a temperature changed the held-out log-loss by "
                f"{mean:+.4f} (t = {t_stat:+.2f}), not clearly better, so it would not carry over to new images")
    return None


def classifier_layer(model):
    """The Dense layer whose outputs are the logits: 'logits' (--logit-scale models) or 'probabilities'."""
    K = keras()
    names = {layer.name for layer in model.layers}
    layer = model.get_layer("logits" if "logits" in names else "probabilities")
    if not isinstance(layer, K.layers.Dense):
        raise RuntimeError(f"cannot calibrate: the model's '{layer.name}' layer is a {type(layer).__name__}, not Dense")
    return layer


def bake(model, temperature: float) -> str:
    """Divide the classifier's kernel and bias by T; returns the layer's name."""
    layer = classifier_layer(model)
    scale = 1.0 / float(temperature)
    for variable in layer.weights:  # kernel and bias: (Wx + b) / T
        variable.assign(variable * np.asarray(scale, dtype=variable.dtype.as_numpy_dtype))
    return layer.name
