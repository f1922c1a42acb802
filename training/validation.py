"""The effective configuration: defaults that depend on other options, and every check
that can fail before any data is loaded or any model is built."""
from __future__ import annotations

import dataclasses

from serving.errors import UserError
from training import backbones, class_weights, strategies
from training.config import AUGMENT_POLICIES, DATA_CHECKS, OPTIMIZERS, SCHEDULES, TTA_MODES, TrainConfig


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other options, so the record holds the effective values."""
    spec = backbones.get(cfg.backbone)
    cfg = dataclasses.replace(cfg)
    if cfg.from_run:
        cfg.strategy = "from-run"
    if cfg.weights is None:
        cfg.weights = "imagenet" if spec.pretrained and cfg.strategy not in ("scratch",) else "none"
    if spec.pretrained and cfg.head is None:
        cfg.head = "gap"
    if cfg.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown optimizer '{cfg.optimizer}'; choose from {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"unknown --schedule '{cfg.schedule}'; choose from {', '.join(SCHEDULES)}")
    if cfg.augment_policy not in AUGMENT_POLICIES:
        raise UserError(f"unknown --augment-policy '{cfg.augment_policy}'; choose from {', '.join(AUGMENT_POLICIES)}")
    if cfg.tta not in TTA_MODES:
        raise UserError(f"unknown --tta '{cfg.tta}'; choose from {', '.join(TTA_MODES)}")
    class_weights.check_spec(cfg.class_weight)
    if cfg.data_check not in DATA_CHECKS:
        raise UserError(f"unknown --data-check '{cfg.data_check}'; choose from {', '.join(DATA_CHECKS)}")
    if cfg.drop_leaks and cfg.data_check == "off":
        raise UserError("--drop-leaks needs the data check: use --data-check fast or full")
    if cfg.lr <= 0 or cfg.finetune_lr <= 0:
        raise UserError("--lr and --finetune-lr must be above 0")
    for flag, value in (("--momentum", cfg.momentum), ("--bn-momentum", cfg.bn_momentum), ("--dropout", cfg.dropout)):
        if not 0 <= value < 1:
            raise UserError(f"{flag} must be at least 0 and below 1")
    if cfg.patience is not None and cfg.patience < 0:
        raise UserError("--patience must be at least 0 (0 turns early stopping off)")
    if cfg.weight_decay < 0 or cfg.l2 < 0:
        raise UserError("--weight-decay and --l2 must be at least 0")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError("--label-smoothing must be at least 0 and below 1")
    if cfg.logit_scale <= 0:
        raise UserError("--logit-scale must be above 0")
    if cfg.logit_scale != 1 and spec.pretrained:
        raise UserError("--logit-scale applies to the scratch CNNs (cnn, cnn-bn), not pretrained backbones")
    if cfg.epochs < 0 or (cfg.epochs == 0 and cfg.strategy != "finetune"):
        raise UserError("--epochs must be at least 1 (0 only with --strategy finetune, to go straight to phase 2)")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if not 0 < cfg.target <= 1:
        raise UserError("--target is an accuracy between 0 and 1")
    if not spec.pretrained and cfg.head is not None:
        raise UserError(f"--head applies to pretrained backbones; the {spec.name} body comes from --cnn-layers")
    if not spec.pretrained:
        backbones.resolve_cnn_layers(cfg.cnn_layers, cfg.cnn_padding)
    strategies.validate(cfg, spec.pretrained)
    return cfg
