"""The backbone registry: what `--backbone` accepts and how each one is built.

Like timm's pretrained configs, each entry carries its own preprocessing and
default input size, so a model built from it needs nothing else from the caller.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from serving.base.errors import UserError, choose, nearest
from training.env import keras
from training.errors import reason


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    app: str | None = None              # keras.applications constructor, None for our CNNs
    preprocess: str = "unit"            # "unit" (x / 255) or the keras.applications module whose preprocess_input applies
    min_input: int = 32                 # smallest input keras.applications accepts
    default_input: int | None = None    # resize target when --input-size is not given (None: image size)
    batchnorm: bool = False             # cnn-bn: BatchNorm between every conv/dense and its activation
    # The mid-level layer whose pooled output the OOD score adds to the penultimate features
    # (training.exported.ood; None: the penultimate features alone). Set only where it was measured.
    ood_layer: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.app is not None

    def check_input(self, size: int) -> int:
        """The one input-size check: validation runs it on --input-size, build on the size it resolves."""
        if size < self.min_input:
            raise UserError(f"--input-size {size} is below {self.name}'s minimum of {self.min_input}")
        return size


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        BackboneSpec("cnn", "a small CNN trained from scratch; its layers from --cnn-layers (presets seed001-seed004)"),
        BackboneSpec("cnn-bn", "a CNN with BatchNorm before each activation (--bn-momentum, --l2); "
                     "residual presets resnet9-*", batchnorm=True),
        BackboneSpec("mobilenetv2", "MobileNetV2 (depthwise-separable, 2.3M params), ImageNet weights",
                     app="MobileNetV2", preprocess="mobilenet_v2", default_input=96,
                     ood_layer="block_9_add"),
        BackboneSpec("vgg16", "VGG16 (13 conv + pools, 14.7M params), ImageNet weights",
                     app="VGG16", preprocess="vgg16", default_input=32),
        BackboneSpec("resnet50v2", "ResNet50V2 (pre-activation residual, 23.6M params), ImageNet weights",
                     app="ResNet50V2", preprocess="resnet_v2", default_input=96),
    )
}

# Each seed's baseline CNN: (layer spec, padding).
CNN_TOKENS = ("cN conv of N 3x3 filters (cNkK: KxK), rN residual block (x + two convs of N filters; the "
              "input must have N channels), p / pK max-pool, drX dropout, f flatten, g global average pool, "
              "gm global max pool, dN dense of N units")
CNN_PRESETS: dict[str, tuple[str, str]] = {
    "seed001": ("c32,p,c64,p,c128,p,f,d128,dr0.5", "valid"),
    "seed002": ("c32,c32,p3,dr0.2,c64,c64,p3,dr0.2,c128,c128,p3,dr0.2,f,d128,dr0.2", "same"),
    "seed003": ("c32,p,c64,p,f,d128", "same"),
    "seed004": ("c32,c64,p,dr0.2,f,d128,dr0.2,d64,dr0.2", "valid"),
    # seed002 with 2x2 pools, as in the seed's first BN block (its full model pools 3x3, which
    # leaves a 1x1 map after the third block).
    "vgg3": ("c32,c32,p,dr0.2,c64,c64,p,dr0.2,c128,c128,p,dr0.2,f,d128,dr0.2", "same"),
    # The ResNet-9 layout of the fast CIFAR-10 training records (Page, "How to train your
    # ResNet"): prep conv, three stages each halving the map, residual blocks after stages 1 and 3.
    # -s is a quarter of its width (1/16 of the compute), -m half.
    "resnet9-s": ("c16,c32,p,r32,c64,p,c128,p,r128,g", "same"),
    "resnet9-m": ("c32,c64,p,r64,c128,p,c256,p,r256,g", "same"),
    "resnet9": ("c64,c128,p,r128,c256,p,c512,p,r512,g", "same"),
}
_TOKEN = re.compile(r"^(c(\d+)(?:k(\d+))?|p(\d*)|dr(0?\.\d+|0|1)|f|gm?|d(\d+)|r(\d+))$")


def get(name: str) -> BackboneSpec:
    """The registered backbone; an unknown name is one line naming the nearest ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        return REGISTRY[choose("backbone", name, list(REGISTRY))]


def resolve_cnn_layers(layers_or_preset: str, padding: str | None) -> tuple[str, str]:
    """A preset name or a layer spec → (validated spec, padding)."""
    spec, preset_padding = CNN_PRESETS.get(layers_or_preset, (layers_or_preset, "same"))
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    bad = [t for t in tokens if not _TOKEN.match(t)]
    if not tokens or bad:
        raise UserError(
            f"bad --cnn-layers '{layers_or_preset}' (token {bad[0] if bad else '(none)'}); use a preset "
            f"({', '.join(CNN_PRESETS)}) or tokens like c32,p,c64,p,f,d128,dr0.5")
    from training.config import CNN_PADDINGS  # noqa: PLC0415

    padding = choose("--cnn-padding", padding or preset_padding, CNN_PADDINGS)
    return ",".join(tokens), padding


def cnn_body(x, spec: str, padding: str, *, batchnorm: bool, bn_momentum: float, l2: float):
    """Apply a CNN body to the tensor x; cnn-bn puts BatchNorm between each conv/dense and its ReLU."""
    K = keras()
    reg = K.regularizers.l2(l2) if l2 > 0 else None

    def conv(t, filters: int, kernel: int = 3):
        t = K.layers.Conv2D(filters, kernel, padding=padding, kernel_regularizer=reg,
                            activation=None if batchnorm else "relu")(t)
        if batchnorm:
            t = K.layers.BatchNormalization(momentum=bn_momentum)(t)
            t = K.layers.Activation("relu")(t)
        return t

    for token in spec.split(","):
        m = _TOKEN.match(token)
        assert m is not None  # validated by resolve_cnn_layers
        if m.group(2):
            x = conv(x, int(m.group(2)), int(m.group(3) or 3))
        elif m.group(7):
            filters = int(m.group(7))
            if len(x.shape) != 4 or x.shape[-1] != filters:
                raise UserError(f"--cnn-layers: residual block r{filters} needs an input of {filters} channels, "
                                f"not {x.shape[-1]} (put c{filters} before it)")
            if padding != "same":
                raise UserError("--cnn-layers: residual blocks need --cnn-padding same")
            x = K.layers.Add()([x, conv(conv(x, filters), filters)])
        elif token.startswith("p"):
            x = K.layers.MaxPooling2D(int(m.group(4) or 2))(x)
        elif token.startswith("dr"):
            x = K.layers.Dropout(float(m.group(5)))(x)
        elif token == "f":
            x = K.layers.Flatten()(x)
        elif token == "g":
            x = K.layers.GlobalAveragePooling2D()(x)
        elif token == "gm":
            x = K.layers.GlobalMaxPooling2D()(x)
        else:
            x = K.layers.Dense(int(m.group(6)), kernel_regularizer=reg,
                               activation=None if batchnorm else "relu")(x)
            if batchnorm:
                x = K.layers.BatchNormalization(momentum=bn_momentum)(x)
                x = K.layers.Activation("relu")(x)
    return x


def check_weights_file(weights: str, flag: str = "--weights") -> None:
    """imagenet and none pass; anything else must be a Keras weights file, HDF5 (.h5, .weights.h5) or a
    .keras zip, checked by its signature before any data loads, so that `--weights leaf.jpg` is one line
    at once rather than h5py's "file signature not found" after decoding the whole data set."""
    if weights in ("imagenet", "none"):
        return
    import zipfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import h5py  # noqa: PLC0415 (comes with TensorFlow and Keras)

    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"{flag}: no such file '{weights}' (use imagenet, none, or a Keras .h5 weights file)")
    try:
        keras_file = h5py.is_hdf5(str(path)) or zipfile.is_zipfile(path)
    except OSError as exc:
        raise UserError(f"{flag} {weights}: cannot read it ({exc.strerror or reason(exc)})") from None
    if not keras_file:
        raise UserError(f"{flag} {weights}: not a Keras weights file (neither HDF5, as .h5 weights are, nor a .keras "
                        "zip); give imagenet, none, or a weights file such as mobilenetv2_1.0_imagenet_no_top.h5")


def build_pretrained(spec: BackboneSpec, input_size: int, weights: str):
    """The keras.applications model without its top, with weights: imagenet | none | PATH."""
    K = keras()
    constructor = getattr(K.applications, spec.app)
    shape = (input_size, input_size, 3)
    if weights == "none":
        return constructor(include_top=False, weights=None, input_shape=shape)
    if weights == "imagenet":
        try:
            return constructor(include_top=False, weights="imagenet", input_shape=shape)
        except Exception as exc:  # Keras raises bare Exception on a failed download
            raise UserError(
                f"could not download ImageNet weights for {spec.name} ({reason(exc)}); "
                "pass --weights PATH.h5 (a Keras weights file) or --weights none") from None
    check_weights_file(weights)
    model = constructor(include_top=False, weights=None, input_shape=shape)
    try:
        model.load_weights(weights)
    except Exception as exc:  # h5py/Keras raise ValueError, OSError or KeyError for a mismatch
        raise UserError(f"--weights {weights} does not match {spec.name} at input {input_size}: {reason(exc)}") from None
    return model


def truncate(base, layer_name: str):
    """The backbone cut after `layer_name` (seed 002: VGG16 up to block3_pool)."""
    K = keras()
    names = [layer.name for layer in base.layers]
    if layer_name not in names:
        raise UserError(f"--truncate-at: no layer '{layer_name}' in {base.name}{nearest(layer_name, names)}")
    return K.Model(base.input, base.get_layer(layer_name).output, name=f"{base.name}_to_{layer_name}")
