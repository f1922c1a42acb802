"""The effective configuration: defaults that depend on other options, and every check
that can fail before any data is loaded, any model is built or any folder is made."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from serving.base.errors import UserError, choose
from training.model import backbones, strategies
from training.fit import class_weights
from training.data import views
from training.data.sources import check_config
from training.config import (AUGMENT_POLICIES, VIEW_POLICIES, CNN_PADDINGS, DATA_CHECKS, DISTRIBUTIONS, HEADS, OPTIMIZERS,
                             PRECISIONS, SCHEDULES, STRATEGIES, TTA_MODES, DataConfig, DataSpec, TrainConfig)


def check_data_spec(cfg: DataConfig) -> None:
    """The --data scheme and the split options; the path itself is read when the data loads."""
    DataSpec.parse(cfg.spec)
    check_config(cfg)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other options, so the record holds the effective values,
    and check every choice: a mistake is one line before the data loads or a staging folder exists."""
    spec = backbones.get(cfg.backbone)
    cfg = dataclasses.replace(cfg)
    if cfg.from_run:
        cfg.strategy = "from-run"
    else:
        choose("strategy", cfg.strategy, STRATEGIES)
    if cfg.weights is None:
        cfg.weights = "imagenet" if spec.pretrained and cfg.strategy not in ("scratch",) else "none"
    if spec.pretrained and cfg.head is None:
        cfg.head = "gap"
    if cfg.split_seed is not None:
        cfg.data = dataclasses.replace(cfg.data, seed=cfg.split_seed)  # the record's data.seed: the split's seed
    check_data_spec(cfg.data)
    choose("--optimizer", cfg.optimizer, OPTIMIZERS)
    choose("--schedule", cfg.schedule, SCHEDULES)
    choose("--augment-policy", cfg.augment_policy, VIEW_POLICIES)
    choose("--tta", cfg.tta, TTA_MODES)
    choose("--data-check", cfg.data_check, DATA_CHECKS)
    choose("--precision", cfg.precision, PRECISIONS)
    choose("--distribute", cfg.distribute, DISTRIBUTIONS)
    if cfg.cnn_padding is not None:
        choose("--cnn-padding", cfg.cnn_padding, CNN_PADDINGS)
    class_weights.check_spec(cfg.class_weight)
    if cfg.drop_leaks and cfg.data_check == "off":
        raise UserError("--drop-leaks needs the data check: use --data-check fast or full")
    if cfg.exclude is not None and not Path(cfg.exclude).expanduser().is_file():
        raise UserError(f"--exclude {cfg.exclude}: no such file")
    if cfg.lr <= 0 or cfg.finetune_lr <= 0:
        raise UserError("--lr and --finetune-lr must be above 0")
    for flag, value in (("--momentum", cfg.momentum), ("--bn-momentum", cfg.bn_momentum), ("--dropout", cfg.dropout)):
        if not 0 <= value < 1:
            raise UserError(f"{flag} must be at least 0 and below 1")
    if cfg.patience is not None and cfg.patience < 0:
        raise UserError("--patience must be at least 0 (0 turns early stopping off)")
    if cfg.weight_decay < 0 or cfg.l2 < 0:
        raise UserError("--weight-decay and --l2 must be at least 0")
    if cfg.distill_temperature <= 0 or not 0 <= cfg.distill_weight <= 1:
        raise UserError("--distill-temperature must be above 0 and --distill-weight between 0 and 1")
    if not 0 <= cfg.augment_views <= views.MAX_VIEWS:
        raise UserError(f"--augment-views must be between 0 (off) and {views.MAX_VIEWS}")
    if cfg.augment_views and cfg.augment:
        raise UserError("--augment-views and --augment: pick one (views are drawn once, the layers every step)")
    if cfg.augment_policy not in AUGMENT_POLICIES and not cfg.augment_views:
        raise UserError(f"--augment-policy {cfg.augment_policy} draws fixed views: give --augment-views K "
                        f"(--augment takes {' or '.join(AUGMENT_POLICIES)})")
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
    if spec.pretrained:
        choose("--head", cfg.head, HEADS)
        backbones.check_weights_file(cfg.weights)
        if cfg.input_size is not None:
            spec.check_input(cfg.input_size)
    else:
        if cfg.head is not None:
            raise UserError(f"--head applies to pretrained backbones; the {spec.name} body comes from --cnn-layers")
        if cfg.truncate_at:
            raise UserError("--truncate-at applies to pretrained backbones (mobilenetv2, vgg16, resnet50v2), not CNNs")
        backbones.resolve_cnn_layers(cfg.cnn_layers, cfg.cnn_padding)
    strategies.validate(cfg, spec.pretrained)
    return cfg
