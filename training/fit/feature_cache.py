"""Caching what a frozen part of the model computes, so training runs only the part that learns.

A frozen backbone (BatchNorm in inference mode, no augmentation, no TTA) maps each image to the
same activations every epoch, so the seeds' loop recomputes identical numbers on every pass.

Phase 1 (frozen, and finetune's first phase): the backbone runs once per image; when the head
starts with global pooling the pooled vector is kept (1,280 floats for MobileNetV2, not a
7x7x1280 map: 5 KB an image instead of 245 KB at 224), and the head trains on it.

Phase 2 of finetune: everything below the unfreeze point is still frozen. Its output at the
boundary (every tensor that crosses it; a residual add can make that two) is computed once, and
only the top of the backbone and the head train on it.

The cached models are made of the full model's own layers, so training them trains the full
model, and the saved model is the one full model. Caches too large for memory are memory-mapped
files under the run's staging folder.
"""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data import sources as datasets
from training import progress
from training.model import strategies
from training.config import TrainConfig
from training.env import keras, tf

EXTRACT_BATCH = 64
# A cache larger than this goes to a memory-mapped file under the staging folder, not into memory.
IN_MEMORY_BYTES = 4 * 2**30


@dataclass
class Plan:
    """How one phase trains on cached activations: what computes them, and what trains on them."""
    extractor: Any          # raw pixels -> the cached tensor(s)
    trainable: Any          # the cached tensor(s) -> probabilities, sharing the full model's layers
    where: str              # what is cached, for the log and the record
    bottom: Any = None      # finetune: the backbone below the unfreeze point, and above it
    top: Any = None
    pooled: bool = False    # the head's global pooling runs before the cache (and is left out of `trainable`)


@dataclass
class Cache:
    """Cached activations per split: one array per tensor, in memory or memory-mapped."""
    splits: dict[str, list[np.ndarray]]
    nbytes: int
    storage: str            # "memory" | "disk"
    seconds: float = 0.0
    shapes: list[tuple[int, ...]] = field(default_factory=list)


def decide(cfg: TrainConfig, has_backbone: bool) -> tuple[bool, str]:
    """(cache the frozen backbone in phase 1?, why) for this config."""
    if cfg.strategy not in ("frozen", "finetune") or not has_backbone:
        return False, "the backbone trains, so its features change every step"
    if cfg.epochs == 0:
        return False, "no frozen phase to cache"
    return _cacheable(cfg, "frozen backbone without augmentation: features computed once")


def decide_finetune(cfg: TrainConfig, base, start: int) -> tuple[bool, str]:
    """(cache the still-frozen bottom in finetune's phase 2?, why); `start` is the first unfrozen layer."""
    if cfg.strategy != "finetune" or base is None:
        return False, "not a fine-tune"
    if not any(layer.weights for layer in base.layers[:start]):
        return False, "nothing below the unfreeze point is frozen"
    return _cacheable(cfg, "the bottom below the unfreeze point is frozen: its output computed once")


def _cacheable(cfg: TrainConfig, yes: str) -> tuple[bool, str]:
    if cfg.augment:
        return False, "--augment changes every epoch's input, so features cannot be reused"
    if cfg.augment_views:
        return False, "--augment-views trains on augmented views, not the images the cache would hold"
    if cfg.tta != "none":
        return False, "--tta runs the backbone on each image and its mirror, so features are not one per image"
    if not cfg.feature_cache:
        return False, "--no-feature-cache"
    return True, yes


def head_plan(model, backbone, features_tensor) -> Plan:
    """Phase 1: cache the backbone's output, pooled when the head starts by pooling it."""
    K = keras()
    head_layers = model.layers[model.layers.index(backbone) + 1:]
    cached, where = features_tensor, f"{backbone.name} output"
    if head_layers and isinstance(head_layers[0], K.layers.GlobalAveragePooling2D):
        # Pooling is the head's first step and has no weights: caching after it is the same maths.
        cached, where = head_layers[0].get_output_at(0), f"{backbone.name} output, pooled"
        head_layers = head_layers[1:]
    inputs = K.Input(tuple(cached.shape[1:]), dtype=cached.dtype, name="features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return Plan(K.Model(model.input, cached, name="feature_extractor"),
                K.Model(inputs, x, name=f"{model.name}_head"), where, pooled=cached is not features_tensor)


def finetune_plan(model, backbone, backbone_training: bool | None, start: int) -> Plan:
    """Phase 2: split the backbone at the unfreeze point (layer `start`) into a frozen bottom and a
    trainable top."""
    K = keras()
    frozen = {id(layer) for layer in backbone.layers[:start]}
    boundary: list[Any] = []
    for layer in backbone.layers:
        if id(layer) in frozen:
            continue
        node = layer._inbound_nodes[0]  # the node of the backbone's own graph
        for source, tensor in zip(tf().nest.flatten(node.inbound_layers), tf().nest.flatten(node.input_tensors)):
            if id(source) in frozen and all(tensor is not seen for seen in boundary):
                boundary.append(tensor)
    bottom = K.Model(backbone.input, boundary, name=f"{backbone.name}_bottom")
    top = K.Model(boundary, backbone.output, name=f"{backbone.name}_top")
    # The bottom sees what the backbone sees in the full model: the resized, preprocessed pixels.
    backbone_input = model.get_layer("preprocess").get_output_at(0)
    extractor = K.Model(model.input, bottom(backbone_input, training=False), name="bottom_extractor")
    inputs = [K.Input(tuple(t.shape[1:]), dtype=t.dtype, name=f"boundary_{i}") for i, t in enumerate(boundary)]
    x = top(inputs if len(inputs) > 1 else inputs[0], training=backbone_training)
    for layer in model.layers[model.layers.index(backbone) + 1:]:
        x = layer(x)
    names = ", ".join(t._keras_history.layer.name for t in boundary)
    return Plan(extractor, K.Model(inputs, x, name=f"{model.name}_top"),
                f"boundary below the unfreeze point ({names})", bottom, top)


def shared_extractor(model, backbone, head: Plan, finetune: Plan):
    """One pass over the data for both phases of a fine-tune: the bottom's boundary tensors, and the
    head's input computed from them by the top (the bottom is frozen in both phases, so phase 2's
    cache is a by-product of phase 1's). Outputs: [head input, *boundary]."""
    K = keras()
    boundary = finetune.bottom(model.get_layer("preprocess").get_output_at(0), training=False)
    boundary = list(boundary) if isinstance(boundary, (list, tuple)) else [boundary]
    x = finetune.top(boundary if len(boundary) > 1 else boundary[0], training=False)
    head_layers = model.layers[model.layers.index(backbone) + 1:]
    if head.pooled:
        x = head_layers[0](x)
    return K.Model(model.input, [x, *boundary], name="shared_extractor")


def split_cache(cache: Cache, first: int) -> tuple[Cache, Cache]:
    """A shared extractor's cache as (the first `first` arrays, the rest)."""
    def part(sl: slice) -> Cache:
        shapes = cache.shapes[sl]
        nbytes = sum(a.nbytes for arrays in cache.splits.values() for a in arrays[sl])
        return Cache({k: v[sl] for k, v in cache.splits.items()}, nbytes, cache.storage, cache.seconds, shapes)

    return part(slice(0, first)), part(slice(first, None))


def extract(extractor, splits: dict[str, Any], pipeline, folder: Path) -> Cache:
    """Run the extractor once over each split, into memory or, when large, memory-mapped files."""
    outputs = extractor.outputs
    shapes = [tuple(int(d) for d in t.shape[1:]) for t in outputs]
    total = sum(len(split.y) for split in splits.values())
    per_image = sum(4 * math.prod(shape) for shape in shapes)
    on_disk = per_image * total > IN_MEMORY_BYTES
    if on_disk:
        folder.mkdir(parents=True, exist_ok=True)
    run = tf().function(lambda x: extractor(x, training=False))
    cached: dict[str, list[np.ndarray]] = {}
    with progress.step("extracting features", total) as advance:
        for name, split in splits.items():
            cached[name] = _extract_split(run, split, pipeline, shapes, folder / name if on_disk else None, advance)
    return Cache(cached, per_image * total, "disk" if on_disk else "memory", shapes=shapes)


def _extract_split(run, split, pipeline, shapes: list[tuple[int, ...]], disk: Path | None, advance) -> list[np.ndarray]:
    """One split's activations; `disk` is the file prefix of memory-mapped arrays, or None for memory."""
    n = len(split.y)
    if disk is not None:
        arrays = [np.lib.format.open_memmap(disk.with_name(f"{disk.name}-{i}.npy"), mode="w+", dtype=np.float32,
                                            shape=(n, *shape)) for i, shape in enumerate(shapes)]
    else:
        arrays = [np.empty((n, *shape), np.float32) for shape in shapes]
    start = 0
    for x, _ in pipeline(split, EXTRACT_BATCH) if n else ():
        result = run(x)
        result = result if isinstance(result, (list, tuple)) else [result]
        stop = start + int(x.shape[0])
        for array, value in zip(arrays, result):
            array[start:stop] = value.numpy()
        start = stop
        advance(int(x.shape[0]))
    for array in arrays:
        if isinstance(array, np.memmap):
            array.flush()
    return arrays


def phase_plan(cfg: TrainConfig, built, phase: str, use_cache: bool, log, facts: dict[str, Any]) -> Plan | None:
    """The phase's Plan, or None (with the reason logged and put in `facts`, the record's caches)."""
    if phase == "head" and use_cache:
        plan = head_plan(built.model, built.backbone, built.features)
    elif phase == "finetune":
        start = strategies.unfreeze_start(built.backbone, cfg)
        ok, why = decide_finetune(cfg, built.backbone, start)
        if not ok:
            if phase not in facts:
                log(f"phase {phase} cache off: {why}")
            facts[phase] = {"used": False, "reason": why}
            return None
        plan = finetune_plan(built.model, built.backbone, built.backbone_training, start)
    else:
        return None
    facts[phase] = {"used": True, "what": plan.where}
    return plan


def cached_pipeline(cache: Cache, split: str, y: np.ndarray, batch_size: int):
    """A split's cached activations in order (validation and test); None for an empty split."""
    return datasets.pipeline(datasets.Split(cache.splits[split], y), batch_size) if len(y) else None


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import sys  # noqa: PLC0415

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
