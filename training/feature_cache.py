"""Frozen-backbone feature caching.

A frozen backbone (BatchNorm in inference mode, no augmentation) maps each image
to the same features every epoch, so the seeds' loop recomputes identical numbers
on every pass. Here the backbone runs once per image and the head trains on the
features; the head model reuses the full model's own head layers, so training it
trains the full model, and the saved model is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.env import keras

EXTRACT_BATCH = 128


def decide(cfg: TrainConfig, has_backbone: bool) -> tuple[bool, str]:
    """(use the cache?, why) for this config."""
    if cfg.strategy not in ("frozen", "finetune") or not has_backbone:
        return False, "the backbone trains, so its features change every step"
    if cfg.epochs == 0:
        return False, "no frozen phase to cache"
    if cfg.augment:
        return False, "--augment changes every epoch's input, so features cannot be reused"
    if cfg.tta != "none":
        return False, "--tta runs the backbone on each image and its mirror, so features are not one per image"
    if not cfg.feature_cache:
        return False, "--no-feature-cache"
    return True, "frozen backbone without augmentation: features computed once"


@dataclass
class CachedFeatures:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    seconds: float


def head_model(model, backbone, features_tensor):
    """A model from backbone features to probabilities, sharing the full model's head layers."""
    K = keras()
    head_layers = model.layers[model.layers.index(backbone) + 1:]
    inputs = K.Input(tuple(features_tensor.shape[1:]), dtype=features_tensor.dtype, name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return K.Model(inputs, x, name=f"{model.name}_head")


def extract(model, features_tensor, splits: dict[str, Any], pipeline) -> dict[str, np.ndarray]:
    """Run input → resize → preprocess → backbone once over each split."""
    K = keras()
    extractor = K.Model(model.input, features_tensor, name="feature_extractor")
    return {name: extractor.predict(pipeline(split, EXTRACT_BATCH), verbose=0) if len(split.y) else
            np.zeros((0, *features_tensor.shape[1:]), np.float32) for name, split in splits.items()}
