"""The typed configuration of one training run: every `tlserve train` option.

TrainConfig is a serving.base.contract.Contract: the staging folder's config.json and record.json's
`config` are its to_dict(), read back with type checks and unknown keys kept. The files carry no schema
key of their own (record.json's schema covers its config; TrainConfig.SCHEMA versions config.json).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.base.contract import Contract
from serving.base.errors import UserError, nearest

STRATEGIES = ("scratch", "frozen", "finetune", "full")
OPTIMIZERS = ("adam", "sgd", "rmsprop")
HEADS = ("gap", "gap-dense", "flatten-dense-bn")
AUGMENT_POLICIES = ("seed", "flip-crop")                                  # --augment (layers) and --augment-views
VIEW_POLICIES = (*AUGMENT_POLICIES, "crop", "mixup", "crop-mixup")       # --augment-views (training.data.views)
SCHEDULES = ("constant", "onecycle", "cosine")
TTA_MODES = ("none", "flip")
DATA_CHECKS = ("off", "fast", "full")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
DISTRIBUTIONS = ("auto", "none", "mirrored")
CNN_PADDINGS = ("same", "valid")
DATA_SCHEMES = ("synthetic", "cifar10", "folder")
DATA_FORMS = ("synthetic", "cifar10", "cifar10:PATH", "folder:PATH")  # what --data takes


@dataclass(frozen=True)
class DataSpec:
    """A --data value as its scheme and, for cifar10:PATH and folder:PATH, its path: the one parser of
    --data (training, eval and the data check all read it here), with the one error line."""
    scheme: str               # synthetic | cifar10 | folder
    path: str | None = None   # cifar10: None is Keras's download; folder: always set

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        scheme, _, arg = text.partition(":")
        if scheme not in DATA_SCHEMES or (scheme == "folder" and not arg) or (scheme == "synthetic" and arg):
            close = nearest(scheme, list(DATA_SCHEMES)) if scheme not in DATA_SCHEMES else ""
            raise UserError(f"unknown --data '{text}'{close}; use one of {', '.join(DATA_FORMS)}")
        return cls(scheme, arg or None)

    @property
    def local(self) -> Path | None:
        """The path on this machine (~ expanded), or None."""
        return Path(self.path).expanduser() if self.path else None


@dataclass
class DataConfig(Contract):
    spec: str = "synthetic"            # cifar10 | cifar10:PATH | folder:PATH | synthetic
    classes: str | None = None         # "0-4" | "cat,dog" | None for all
    val_split: float = 0.1
    limit: int | None = None           # per split, for quick runs
    image_size: int | None = None      # folder sets: resize to this (default: own size or 224)
    seed: int = 0                      # draws the split (and --limit's sample): `--split-seed`, default `--seed`


@dataclass
class TrainConfig(Contract):
    data: DataConfig = field(default_factory=DataConfig)
    backbone: str = "cnn"
    weights: str | None = None         # imagenet | none | PATH.h5; None: imagenet for transfer, none for scratch
    strategy: str = "scratch"
    input_size: int | None = None      # resize inside the model; None = backbone default
    head: str | None = None            # pretrained backbones only; None: gap
    head_units: int = 256
    dropout: float = 0.2
    augment: bool = False
    augment_policy: str = "seed"       # seed: flip/rotation/zoom | flip-crop: flip + 4-pixel translation (reflect) | views only: crop, mixup, crop-mixup
    augment_views: int = 0             # K > 0: train on K fixed augmented views per image (training.data.views)
    cnn_layers: str = "seed003"        # preset name or layer spec (see backbones.CNN_PRESETS)
    cnn_padding: str | None = None     # None: the preset's own
    bn_momentum: float = 0.99
    l2: float = 0.0
    truncate_at: str | None = None
    unfreeze: int | None = None        # finetune: top N backbone layers
    unfreeze_from: str | None = None   # finetune: from this layer on
    from_run: str | None = None        # transfer from one of our runs (seed 004)
    train_last: int = 1                # with from_run: train the last K weighted layers
    teacher: str | None = None         # distil from this run's probabilities (training.fit.distill)
    distill_temperature: float = 4.0   # softens both models' probabilities in the distillation term
    distill_weight: float = 0.5        # share of the loss that is the distillation term (the rest: hard labels)
    epochs: int = 5
    finetune_epochs: int = 3
    lr: float = 1e-3
    finetune_lr: float = 1e-5
    optimizer: str = "adam"
    momentum: float = 0.9              # sgd
    nesterov: bool = False             # sgd
    weight_decay: float = 0.0          # decoupled (AdamW-style), kernels only
    schedule: str = "constant"         # constant | onecycle (warm-up then cosine to 0) | cosine
    label_smoothing: float = 0.0       # share of each target spread over all classes
    logit_scale: float = 1.0           # scratch CNNs: multiply the logits before softmax (Page's ResNet-9: 0.125)
    tta: str = "none"                  # flip: the model averages its logits over the image and its mirror
    class_weight: str = "none"         # none | balanced | name=weight,... (loss weight per class)
    calibrate: bool = True             # fit a temperature on the validation split and bake it into the model
    batch_size: int = 64
    target: float = 0.8
    patience: int | None = 5           # early stopping on val_loss; None = off
    seed: int = 0
    split_seed: int | None = None      # the split's own seed (becomes data.seed); None: --seed draws the split too
    feature_cache: bool = True         # frozen backbones: extract features once, train the head on them
    data_check: str = "fast"           # off | fast (hashes, cross-split) | full (+ MobileNetV2 embeddings)
    drop_leaks: bool = False           # drop training images that duplicate a val or test image
    exclude: str | None = None         # a file of paths (e.g. `data check --suspects`): drop those training images
    precision: str = "auto"            # auto (mixed_float16 on GPU) | float32 | mixed_float16
    jit: bool | None = None            # XLA; None = on for GPU, never on CPU
    distribute: str = "auto"           # auto | none | mirrored (TF_CONFIG set: multi-worker)
    name: str | None = None
    overwrite: bool = False

    FILE = "config.json"
    KIND = "train config"
