"""`tlserve features` (seed 003, step 4): what one layer of a trained model sees in an image."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.base import images
from serving.base.errors import UserError, nearest
from training.record import records
from training.env import keras
from training.model.build import leaf_layers, load_model


def layer_model(model, name: str):
    """A model from raw pixels to `name`'s output, whether the layer is top-level or inside the backbone."""
    K = keras()
    for layer in model.layers:
        if layer.name == name:
            return K.Model(model.input, layer.output)
    for nested in model.layers:
        if isinstance(nested, K.Model) and any(inner.name == name for inner in nested.layers):
            # The nested model's last inbound node is its call in the outer graph.
            to_backbone = K.Model(model.input, nested.get_input_at(-1))
            inside = K.Model(nested.input, nested.get_layer(name).output)
            return K.Model(model.input, inside(to_backbone(model.input)))
    names = [layer.name for layer in leaf_layers(model)]
    raise UserError(f"no layer '{name}' in this model{nearest(name, names)}")


def feature_maps(run_ref: str, image: Path, layer: str, out: Path | None, *, max_maps: int = 32,
                 runs_dir: Path | None = None) -> Path:
    run = records.load_run(run_ref, runs_dir)
    model = load_model(run.model_path)
    sub = layer_model(model, layer)
    h, w = run.record.data.image_size
    pixels = images.load_array(image, (h, w), interpolation=run.record.data.interpolation or "bilinear",
                               name=str(image))
    maps = sub.predict(pixels[None].astype(np.float32), verbose=0)[0]
    if maps.ndim != 3:
        raise UserError(f"layer '{layer}' outputs shape {maps.shape}, not feature maps (H, W, channels); pick a conv layer")
    from training.record.plots import feature_grid  # noqa: PLC0415

    out = out or Path(f"{run.name}-{layer}.png")
    return feature_grid(maps[..., :max_maps], f"{run.name}: {layer} {tuple(maps.shape)} on {Path(image).name}", out)
