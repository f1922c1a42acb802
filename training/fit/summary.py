"""`tlserve summary`: seed 000's model inspection without training."""
from __future__ import annotations

from typing import Any

from training.model import build as models, strategies
from training.config import TrainConfig
from training.fit.validation import resolve


def describe(cfg: TrainConfig, image_size: int, num_classes: int) -> dict[str, Any]:
    """Facts per training phase (finetune has two), and the last phase's layers, with Keras's counts;
    `cfg` is the same typed config `train` takes, checked the same way."""
    backbone = cfg.backbone
    cfg = resolve(cfg)
    built = models.build(cfg, (image_size, image_size), num_classes)
    phases = []
    if cfg.strategy in ("frozen", "finetune"):
        strategies.check_unfreeze(built.backbone, cfg)
        strategies.freeze_backbone(built.backbone)
        phases.append({"phase": "head (backbone frozen)", "facts": models.facts(built.model)})
        if cfg.strategy == "finetune":
            unfrozen = strategies.unfreeze_top(built.backbone, cfg)
            phases.append({"phase": f"finetune (top {len(unfrozen)} layers from {unfrozen[0]})",
                           "facts": models.facts(built.model)})
    else:
        phases.append({"phase": cfg.strategy, "facts": models.facts(built.model)})
    layers = [{"name": layer.name, "type": layer.__class__.__name__,
               "params": models.count_params(layer.weights), "trainable": bool(layer.trainable)}
              for layer in models.leaf_layers(built.model)]
    return {"backbone": backbone, "strategy": cfg.strategy, "input_size": built.input_size, "phases": phases, "layers": layers}
