"""Whole models: raw pixels in, probabilities out, everything else inside.

DESIGN.md's input contract: float32 NHWC 0..255 at the dataset's image size.
Augmentation (training only), the resize to the backbone's input size and the
backbone's own preprocess_input are layers of the model, so Keras, SavedModel,
ONNX and HTTP clients all send the same pixels.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.model import backbones
from training.config import TrainConfig
from training.env import keras, tf

UNIT = "unit"  # our CNNs: pixels / 255; any other mode names the keras.applications module whose preprocess_input applies


def check_preprocess(mode: str) -> None:
    if mode != UNIT and not hasattr(getattr(keras().applications, mode, None), "preprocess_input"):
        raise ValueError(f"unknown preprocess mode {mode}: not 'unit' nor a keras.applications module")


@functools.cache  # one class per process: Keras registers each serializable name once
def preprocess_layer_class():
    """A serializable layer applying a keras.applications preprocess_input.

    A Lambda would not survive saving; this calls the application's own function,
    so preprocessing stays exactly Keras's rather than our re-implementation of it.
    """
    K = keras()

    @K.utils.register_keras_serializable(package="tlserve")
    class BackbonePreprocess(K.layers.Layer):
        def __init__(self, mode: str = "unit", **kwargs):
            super().__init__(**kwargs)
            check_preprocess(mode)
            self.mode = mode

        def call(self, inputs):
            if self.mode == UNIT:
                return inputs / 255.0
            return getattr(K.applications, self.mode).preprocess_input(inputs)

        def get_config(self):
            return {**super().get_config(), "mode": self.mode}

    return BackbonePreprocess


@functools.cache
def tta_layer_classes():
    """(MirrorViews, MeanOfViews): flip test-time augmentation as two serializable layers.

    Outside training, MirrorViews stacks each batch with its horizontal mirror (2N images) and
    MeanOfViews, on the pooled features just before the classifier, averages the two halves back
    to N; the classifier is linear, so this averages the logits of the two views. In training
    both are identity, so the network trains on single images as usual. Kept in one graph (not a
    wrapper around a nested model) so layer names, --from-run and the exports see one flat model."""
    K, T = keras(), tf()

    @K.utils.register_keras_serializable(package="tlserve")
    class MirrorViews(K.layers.Layer):
        def call(self, inputs, training=None):
            if training:
                return inputs
            return T.concat([inputs, T.reverse(inputs, axis=[2])], axis=0)

    @K.utils.register_keras_serializable(package="tlserve")
    class MeanOfViews(K.layers.Layer):
        def call(self, inputs, training=None):
            if training:
                return inputs
            half = T.shape(inputs)[0] // 2
            return (inputs[:half] + inputs[half:]) / 2

    return MirrorViews, MeanOfViews


@dataclass
class BuiltModel:
    model: Any                     # keras.Model, raw pixels -> probabilities
    backbone: Any | None           # the nested keras.applications model (None for CNNs)
    input_size: int                # the resize target inside the model
    backbone_training: bool | None # how the backbone is called: False keeps BatchNorm in inference mode
    features: Any | None = None    # the backbone's output tensor in the model's graph (feature caching)


def augmentation(policy: str, seed: int):
    """Training-only random layers (Keras's random layers are identity outside training).

    seed: the seeds' flip/rotation/zoom. flip-crop: the fast CIFAR-10 records' flip plus a random
    crop of the 4-pixel reflect-padded image, done as a whole-pixel translation (nearest), which
    moves the same pixels without changing the input size."""
    K = keras()
    if policy == "flip-crop":
        return K.Sequential([
            K.layers.RandomFlip("horizontal", seed=seed),
            K.layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", interpolation="nearest", seed=seed),
        ], name="augmentation")
    return K.Sequential([
        K.layers.RandomFlip("horizontal", seed=seed),
        K.layers.RandomRotation(0.05, seed=seed),
        K.layers.RandomZoom(0.1, seed=seed),
    ], name="augmentation")


def resolve_input_size(cfg: TrainConfig, image_size: tuple[int, int]) -> int:
    spec = backbones.get(cfg.backbone)
    return spec.check_input(cfg.input_size or max(image_size[0], spec.default_input or 0))


def build(cfg: TrainConfig, image_size: tuple[int, int], num_classes: int) -> BuiltModel:
    K = keras()
    spec = backbones.get(cfg.backbone)
    h, w = image_size
    inputs = K.Input((h, w, 3), dtype="float32", name="image")
    x = inputs
    if cfg.augment:
        x = augmentation(cfg.augment_policy, cfg.seed)(x)
    if cfg.tta == "flip":
        x = tta_layer_classes()[0](name="tta_views")(x)
    size = resolve_input_size(cfg, image_size) if spec.pretrained or cfg.input_size else h
    if (size, size) != (h, w):
        x = K.layers.Resizing(size, size, interpolation="bilinear", name="resize")(x)
    x = preprocess_layer_class()(spec.preprocess, name="preprocess")(x)

    base = features = None
    backbone_training = None
    if spec.pretrained:
        base = backbones.build_pretrained(spec, size, cfg.weights)
        if cfg.truncate_at:
            base = backbones.truncate(base, cfg.truncate_at)
        # Pretrained backbones keep BatchNorm in inference mode (Keras's transfer-learning guide),
        # fully unfrozen ones too: ImageNet statistics must not drift on a small task. Seed 001's
        # unfrozen MobileNetV2 on the leaf set with BatchNorm training: 0.71 mean over three seeds.
        transfer = cfg.strategy in ("frozen", "finetune") or (cfg.strategy == "full" and cfg.weights != "none")
        backbone_training = False if transfer else None
        if cfg.strategy == "scratch":
            # Keras's MobileNetV2 keeps BatchNorm momentum 0.999, made for long ImageNet runs; over a
            # few hundred steps from scratch the moving statistics stay near their initial values and
            # evaluation sits at chance (measured: train 0.53, validation 0.10 after 4 epochs on
            # 10,000 CIFAR-10 images). From scratch the backbone takes --bn-momentum like cnn-bn does
            # (3 epochs on 2,000 images: validation 0.10 at 0.999, 0.31 at --bn-momentum 0.9).
            for layer in leaf_layers(base):
                if isinstance(layer, K.layers.BatchNormalization):
                    layer.momentum = cfg.bn_momentum
        features = x = base(x, training=backbone_training)
        x = _head(x, cfg)
    else:
        layer_spec, padding = backbones.resolve_cnn_layers(cfg.cnn_layers, cfg.cnn_padding)
        x = backbones.cnn_body(x, layer_spec, padding, batchnorm=spec.batchnorm,
                               bn_momentum=cfg.bn_momentum, l2=cfg.l2)
        if len(x.shape) == 4:  # a spec without f/g still needs a vector for the classifier
            x = K.layers.GlobalAveragePooling2D()(x)
    model = K.Model(inputs, _outputs(x, cfg, num_classes), name=f"{cfg.backbone}_{cfg.strategy}")
    return BuiltModel(model, base, size, backbone_training, features)


def _outputs(x, cfg: TrainConfig, num_classes: int):
    """The classifier on the head's (or CNN body's) vector: probabilities, in float32."""
    K = keras()
    if cfg.tta == "flip":
        x = tta_layer_classes()[1](name="tta_mean")(x)
    if cfg.logit_scale == 1:
        return K.layers.Dense(num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    # Page's ResNet-9 scales its logits by 1/8: small initial logits and a slower-moving classifier.
    x = K.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    x = K.layers.Rescaling(cfg.logit_scale, dtype="float32", name="logit_scale")(x)
    return K.layers.Activation("softmax", dtype="float32", name="probabilities")(x)


def head_model(cfg: TrainConfig, feature_shape: tuple[int, ...], num_classes: int):
    """A pretrained backbone's head and classifier as a model of their own, on the backbone's output,
    pooled when the head starts by pooling (POOLED_HEADS): what `tlserve tune` trains a frozen
    configuration's trial on, from features cached once for every trial."""
    K = keras()
    inputs = K.Input(feature_shape, name="features")
    return K.Model(inputs, _outputs(_head(inputs, cfg, pooled=pooled_head(cfg)), cfg, num_classes), name="head")


POOLED_HEADS = ("gap", "gap-dense")  # heads whose first layer is global average pooling


def pooled_head(cfg: TrainConfig) -> bool:
    return (cfg.head or "gap") in POOLED_HEADS


def _head(x, cfg: TrainConfig, *, pooled: bool = False):
    """The head on the backbone's output (`pooled`: on its global average, for head_model)."""
    K = keras()
    head = cfg.head or "gap"
    if head in POOLED_HEADS and not pooled:
        x = K.layers.GlobalAveragePooling2D(name="head_pool")(x)
    if head == "gap":
        return K.layers.Dropout(cfg.dropout, name="head_dropout")(x) if cfg.dropout else x
    if head == "gap-dense":
        x = K.layers.Dense(cfg.head_units, activation="relu", name="head_dense")(x)
        return K.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    if head == "flatten-dense-bn":
        x = K.layers.Flatten(name="head_flatten")(x)
        x = K.layers.Dense(cfg.head_units, name="head_dense")(x)
        x = K.layers.BatchNormalization(name="head_bn")(x)
        x = K.layers.Activation("relu", name="head_relu")(x)
        return K.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    raise AssertionError(f"--head {head!r} should have been refused by validation.resolve")


def load_model(path: Path | str):
    """Load a run's model.keras with tlserve's layers registered, computing in float32.

    A model trained under a mixed policy (float16 on a GPU, bfloat16 on a CPU) keeps float32
    weights; it is rebuilt here with float32 layers so export, parity checks and inference do
    not depend on the precision it was trained in."""
    K = keras()
    preprocess_layer_class()
    tta_layer_classes()
    model = K.models.load_model(str(path), compile=False)
    if all(getattr(layer, "dtype_policy", None) is None or layer.dtype_policy.name == "float32"
           for layer in leaf_layers(model)):
        return model
    rebuilt = K.Model.from_config(_float32_config(model.get_config()))
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _float32_config(config: Any) -> Any:
    """A model config with every layer's dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("Policy", "DTypePolicy") and "config" in config:
            return "float32"
        return {k: _float32_config(v) for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_config(v) for v in config]
    return config


def leaf_layers(model) -> list:
    """Every layer, with nested models (a backbone) expanded in place."""
    K = keras()
    out = []
    for layer in model.layers:
        out.extend(leaf_layers(layer) if isinstance(layer, K.Model) else [layer])
    return out


def count_params(weights) -> int:
    """Keras's own count (what model.summary() prints): each distinct variable once."""
    K = keras()
    unique = {id(w): w for w in weights}
    return int(sum(K.backend.count_params(w) for w in unique.values()))


def facts(model) -> dict[str, Any]:
    """Seed 000's inspection: depth, parameters, trainable vs frozen layers (Keras's own counts)."""
    leaves = leaf_layers(model)
    weighted = [layer for layer in leaves if layer.weights]
    trainable = count_params(model.trainable_weights)
    non_trainable = count_params(model.non_trainable_weights)
    return {
        "layers": len(model.layers),
        "depth": len(leaves),
        "weighted_layers": len(weighted),
        "total_params": int(trainable + non_trainable),
        "trainable_params": int(trainable),
        "non_trainable_params": int(non_trainable),
        "trainable_layers": sum(1 for layer in weighted if layer.trainable and layer.trainable_weights),
        "frozen_layers": sum(1 for layer in weighted if not (layer.trainable and layer.trainable_weights)),
    }
