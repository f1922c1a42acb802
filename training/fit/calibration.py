"""Temperature scaling at the end of training, baked into the model's last linear layer.

One scalar T is fitted on the validation split by minimising its negative log-likelihood
(training.record.metrics.fit_temperature). The classifier's kernel and bias are then divided by T:
softmax((Wx + b) / T) is exactly the calibrated distribution, so Keras, the SavedModel and every
ONNX variant serve calibrated probabilities with no extra layer, and the argmax does not move
(a positive scale keeps the order of the logits). Every head tlserve builds ends in that Dense layer
followed only by linear steps and the softmax: TTA averages the views *before* it, --logit-scale
multiplies after it, --from-run heads are a Dense 'probabilities' like the others.

A temperature is kept only when the validation split can measure it, and each refusal is one line in
the log and in the record's calibration.skipped: (1) validation images the data check found copied
from train are left out (the model answers them from memory); (2) the rest must hold at least
MIN_ERRORS wrong answers, since only wrong answers stop a smaller T from lowering the NLL (on a split
the model gets all right, T runs to the search's floor and makes the model certain of its mistakes);
(3) a 5-fold cross-validation must show a clear held-out NLL gain (cross_check); (4) the fitted T must
lie in T_RANGE. The test split never chooses T; when the kept T raised its NLL anyway the record says
so (test_nll_rose) and so does the run, loudly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from training.record import metrics
from training.env import keras

Log = Callable[[str], None]


# When a temperature is kept (docs/decisions.md, "Keep a temperature only when the validation split can
# measure it"; benchmarks/calibration_errors.py measured both):
MIN_ERRORS = 20          # wrong validation images: with none, a smaller T always lowers the NLL (T runs to 0)
T_RANGE = (0.5, 5.0)     # a fitted T outside it is refused: honest runs fitted 0.7-2.6
CV_FOLDS = 5
MIN_T = 2.0  # the held-out improvement must be at least two standard errors (about 95% one-sided)


@dataclass
class Calibrated:
    """What calibration did; `finish` adds the test split's figures once the final model has run on it."""
    facts: dict[str, Any]
    test_before: np.ndarray | None = field(default=None, repr=False)

    def finish(self, test_probs_after: np.ndarray, test_y: np.ndarray, log: Log) -> None:
        if self.facts.get("temperature") is None:
            if "val_images" in self.facts:  # refused, not turned off: the test figures of the model as saved
                self.facts["test_ece_before"] = metrics.ece(test_y, test_probs_after)
                self.facts["test_nll_before"] = metrics.nll(test_y, test_probs_after)
            return
        self.facts["test_ece_before"] = metrics.ece(test_y, self.test_before)
        self.facts["test_ece_after"] = metrics.ece(test_y, test_probs_after)
        self.facts["test_nll_before"] = metrics.nll(test_y, self.test_before)
        self.facts["test_nll_after"] = metrics.nll(test_y, test_probs_after)
        # Measured, not assumed: the share of test images whose top class is the same after baking.
        self.facts["test_top1_agreement"] = float(np.mean(self.test_before.argmax(1) == test_probs_after.argmax(1)))
        # The test split never chooses T (that would leak it); it only says, loudly, when T did harm.
        self.facts["test_nll_rose"] = self.facts["test_nll_after"] > self.facts["test_nll_before"]
        if self.facts["test_nll_rose"]:
            log(f"warning: {nll_rose_warning(self.facts)}")


def nll_rose_warning(facts: dict[str, Any]) -> str:
    return (f"the baked temperature {facts['temperature']:.3f} RAISED the test log-loss "
            f"{facts['test_nll_before']:.4f} -> {facts['test_nll_after']:.4f}: its probabilities are worse on "
            "new images; retrain with --no-calibrate to keep the raw ones")


def _skip(reason: str, log: Log, **facts: Any) -> Calibrated:
    log(f"calibration skipped: {reason}")
    return Calibrated({"temperature": None, "skipped": reason, **facts})


def calibrate(model, enabled: bool, val_data, val_y: np.ndarray, test_data, log: Log, *,
              val_copies: np.ndarray | None = None) -> Calibrated:
    """Fit T on the validation split and bake it into `model` (in place), or refuse with a logged, recorded
    reason. `val_copies`: validation images the data check found copied from train (None: not checked)."""
    if not enabled:
        return Calibrated({"temperature": None, "skipped": "turned off (--no-calibrate)"})
    if val_data is None or not len(val_y):
        return _skip("no validation split to fit a temperature on (--val-split 0)", log)
    val_probs = model.predict(val_data, verbose=0)
    clean = np.ones(len(val_y), bool)
    if val_copies is not None:
        clean[val_copies] = False
    facts: dict[str, Any] = {"val_images": int(clean.sum()), "val_copies": None if val_copies is None else
                             int(len(val_y) - clean.sum()), "val_errors": int(np.sum(val_probs[clean].argmax(1) != val_y[clean]))}
    val_y, val_probs = val_y[clean], val_probs[clean]
    reason = identifiable(facts)
    if reason is None:
        change, t_stat = held_out_gain(val_y, val_probs)
        facts["cv_nll_change"], facts["cv_t"] = change, t_stat if np.isfinite(t_stat) else None  # JSON has no inf
        reason = cross_check_reason(len(val_y), change, t_stat)
    if reason is None:
        facts["fitted_temperature"] = metrics.fit_temperature(val_y, val_probs)
        reason = out_of_range(facts["fitted_temperature"])
    if reason is not None:
        return _skip(reason, log, **facts)
    temperature = facts.pop("fitted_temperature")
    val_after = metrics.apply_temperature(val_probs, temperature)
    test_before = model.predict(test_data, verbose=0)
    layer = bake(model, temperature)
    facts = {"temperature": temperature, "layer": layer, "fitted_on": "val", **facts,
             "val_nll_before": metrics.nll(val_y, val_probs), "val_nll_after": metrics.nll(val_y, val_after),
             "val_ece_before": metrics.ece(val_y, val_probs), "val_ece_after": metrics.ece(val_y, val_after)}
    log(f"calibration: temperature {temperature:.3f} (baked into '{layer}'); validation ECE "
        f"{facts['val_ece_before']:.4f} -> {facts['val_ece_after']:.4f}, NLL {facts['val_nll_before']:.4f} -> "
        f"{facts['val_nll_after']:.4f}")
    return Calibrated(facts, test_before)


def identifiable(facts: dict[str, Any]) -> str | None:
    """Why the validation images cannot measure a temperature, or None. Only wrong answers pull T up: on
    a split the model gets (nearly) all right, every smaller T lowers the NLL, down to the search's floor."""
    copies, n, errors = facts["val_copies"], facts["val_images"], facts["val_errors"]
    if copies and not n:
        return (f"all {copies} validation images copy training images (data check), so they say nothing about "
                "new images' confidence")
    left = f" (leaving out the {copies} that copy training images)" if copies else ""
    if errors < MIN_ERRORS:
        return (f"the model gets {n - errors} of {n} validation images right{left}; a temperature needs at least "
                f"{MIN_ERRORS} wrong ones to be measured (with fewer, a smaller T always looks better)")
    return None


def out_of_range(temperature: float) -> str | None:
    low, high = T_RANGE
    if low <= temperature <= high:
        return None
    return (f"the fitted temperature {temperature:.3g} is outside [{low:g}, {high:g}]: it would "
            f"{'sharpen' if temperature < low else 'flatten'} every answer far beyond what runs whose "
            "validation split measured a temperature needed")


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
    return cross_check_reason(n, *held_out_gain(val_y, val_probs, seed))


def held_out_gain(val_y: np.ndarray, val_probs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """(mean change of the held-out log-loss, its t statistic) over CV_FOLDS folds: fit on four, score the fifth."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(val_y)), CV_FOLDS)
    gains = []
    for k, held in enumerate(folds):
        fit = np.concatenate([f for j, f in enumerate(folds) if j != k])
        t = metrics.fit_temperature(val_y[fit], val_probs[fit])
        gains.append(metrics.nll(val_y[held], metrics.apply_temperature(val_probs[held], t))
                     - metrics.nll(val_y[held], val_probs[held]))
    mean, spread = float(np.mean(gains)), float(np.std(gains, ddof=1))
    t_stat = mean / (spread / np.sqrt(CV_FOLDS)) if spread > 0 else (-np.inf if mean < 0 else np.inf)
    return mean, float(t_stat)


def cross_check_reason(n: int, mean: float, t_stat: float) -> str | None:
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
