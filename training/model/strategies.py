"""Fine-tuning strategies: which weights train, in which phase.

scratch / full  every layer trains (scratch starts from random weights)
frozen          the backbone is fixed; only the head trains
finetune        phase 1 as frozen, phase 2 unfreezes the top --unfreeze N backbone
                layers or every layer from --unfreeze-from LAYER on, at --finetune-lr
from-run        seed 004: our own run's layers, a new output layer, the last K weighted layers train
"""
from __future__ import annotations

from serving.base.errors import UserError, nearest
from training.config import TrainConfig
from training.env import keras

DEFAULT_UNFREEZE = 30  # seed 000's top-30 fine-tune


def validate(cfg: TrainConfig, pretrained: bool) -> None:
    if cfg.from_run:
        return
    if not pretrained and cfg.strategy in ("frozen", "finetune", "full"):
        raise UserError(f"--strategy {cfg.strategy} needs a pretrained backbone (mobilenetv2, vgg16, resnet50v2); "
                        f"a {cfg.backbone} trains with --strategy scratch")
    if pretrained and cfg.strategy == "scratch" and cfg.weights not in ("none",):
        raise UserError("--strategy scratch trains from random weights; pass --weights none (or choose frozen/finetune/full)")
    if cfg.strategy != "finetune" and (cfg.unfreeze is not None or cfg.unfreeze_from):
        raise UserError("--unfreeze / --unfreeze-from apply to --strategy finetune")
    if cfg.unfreeze is not None and cfg.unfreeze_from:
        raise UserError("give either --unfreeze N or --unfreeze-from LAYER, not both")
    if cfg.unfreeze is not None and cfg.unfreeze < 1:
        raise UserError("--unfreeze must be at least 1")
    if cfg.strategy == "finetune" and cfg.finetune_epochs < 1:
        raise UserError("--strategy finetune needs --finetune-epochs of at least 1")


def freeze_backbone(base) -> None:
    base.trainable = False


def unfreeze_start(base, cfg: TrainConfig) -> int:
    """Index of the first backbone layer that phase 2 of finetune trains."""
    names = [layer.name for layer in base.layers]
    if cfg.unfreeze_from:
        if cfg.unfreeze_from not in names:
            raise UserError(f"--unfreeze-from: no layer '{cfg.unfreeze_from}' in {base.name}{nearest(cfg.unfreeze_from, names)}")
        return names.index(cfg.unfreeze_from)
    n = cfg.unfreeze or DEFAULT_UNFREEZE
    if n > len(names):
        raise UserError(f"--unfreeze {n} is larger than {base.name}, which has {len(names)} layers")
    return len(names) - n


def unfreeze_top(base, cfg: TrainConfig) -> list[str]:
    """Phase 2 of finetune: make the chosen top of the backbone trainable; returns their names."""
    start = unfreeze_start(base, cfg)
    base.trainable = True
    for layer in base.layers[:start]:
        layer.trainable = False
    return [layer.name for layer in base.layers[start:]]


def check_unfreeze(base, cfg: TrainConfig) -> None:
    """Fail before training, not after phase 1, on a bad --unfreeze / --unfreeze-from."""
    if cfg.strategy == "finetune":
        unfreeze_top(base, cfg)
        freeze_backbone(base)


def transfer_from(source_model, num_classes: int, train_last: int):
    """Seed 004: keep a trained model's layers, give it a new output layer, train the last K weighted layers."""
    K = keras()
    if source_model.layers[-1].name != "probabilities":
        raise UserError("--from-run: that run's model has no 'probabilities' output layer to replace")
    # A --logit-scale model ends Dense 'logits' -> scale -> softmax: replace all three.
    names = {layer.name for layer in source_model.layers}
    features = source_model.get_layer("logits" if "logits" in names else "probabilities").input
    outputs = K.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(features)
    model = K.Model(source_model.input, outputs, name=f"{source_model.name}_transfer")
    weighted = [layer for layer in model.layers if layer.weights]
    if not 1 <= train_last <= len(weighted):
        raise UserError(f"--train-last must be between 1 and {len(weighted)} (the model's layers with weights)")
    trainable = set(id(layer) for layer in weighted[-train_last:])
    for layer in model.layers:
        layer.trainable = id(layer) in trainable
    return model
