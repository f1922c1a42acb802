"""`tlserve explain`: Grad-CAM (Selvaraju et al., 2017), the pixels a run's model used for a class.

The map is computed through the run's own Keras model, raw pixels in: the resize and the
backbone's preprocessing inside the model are part of the differentiated path, so the map is
over the pixels the user sent (at the run's image size) and lines up with them.

For one chosen layer A (H'xW'xK) and the class score y_c (the logit, before the softmax):
weights a_k = mean over H'xW' of dy_c/dA_k, map = ReLU(sum_k a_k A_k), resized to the image and
scaled to [0, 1]. With `--tta flip` the model scores an image and its mirror and averages the
logits; the mirror's map is flipped back and added to the image's before the ReLU, which is the
Grad-CAM of the averaged score.
"""
from __future__ import annotations

import io
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.base import images, storage
from serving.base.errors import UserError, nearest
from training.record import records
from training.env import keras, tf

# Layer types whose output is a feature map worth explaining by default (not pooling, padding,
# dropout, resizing or the preprocessing, whose maps are coarser copies or the input itself).
_FEATURE_LAYERS = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Activation", "ReLU", "LeakyReLU",
                   "BatchNormalization", "Add", "Concatenate", "Multiply")
BATCH = 16


@dataclass(frozen=True)
class Explanation:
    heatmaps: np.ndarray       # (N, H, W) float32 in [0, 1], at the model's input size
    probabilities: np.ndarray  # (N, classes) the model's own output
    class_index: np.ndarray    # (N,) the class each map explains
    layer: str


def spatial_layers(model) -> list[tuple[Any, Any | None]]:
    """(layer, the nested model holding it or None) for every layer with an (N, H, W, C) output
    larger than 1x1, in graph order, nested backbones expanded in place."""
    K = keras()
    out = []
    for layer in model.layers:
        if isinstance(layer, K.Model):
            out.extend((inner, layer) for inner in layer.layers if _is_spatial(inner))
        elif _is_spatial(layer):
            out.append((layer, None))
    return out


def _is_spatial(layer) -> bool:
    shape = _output_shape(layer)
    return shape is not None and len(shape) == 4 and (shape[1] or 0) * (shape[2] or 0) > 1


def _output_shape(layer) -> tuple | None:
    try:
        # Node 0: the layer's call in the model as built (a GradCam adds calls to the outer head layers).
        shape = layer.get_output_at(0).shape
    except (AttributeError, ValueError, RuntimeError):  # a layer never called in a graph
        return None
    return tuple(shape) if shape.rank is not None else None


def default_layer(model) -> str:
    """The last feature layer (a convolution, its normalization, activation or residual sum) whose
    map is larger than 1x1: out_relu for MobileNetV2, block5_conv3 for VGG16, post_relu for
    ResNet50V2, the last convolution of a CNN; an earlier one where a small input has already
    shrunk those to 1x1 (MobileNetV2 at 32 pixels)."""
    for layer, _ in reversed(spatial_layers(model)):
        if type(layer).__name__ in _FEATURE_LAYERS:
            return layer.name
    raise UserError("this model has no convolution layer with a spatial map larger than 1x1 to explain")


def _find(model, name: str) -> tuple[Any, Any | None]:
    K = keras()
    for layer in model.layers:
        if layer.name == name:
            return layer, None
        if isinstance(layer, K.Model):
            for inner in layer.layers:
                if inner.name == name:
                    return inner, layer
    from training.model.build import leaf_layers  # noqa: PLC0415

    names = [layer.name for layer in leaf_layers(model)]
    raise UserError(f"--layer: no layer '{name}' in this model{nearest(name, names)}")


class GradCam:
    """Grad-CAM of one model at one layer; build once, call on batches of raw pixels."""

    def __init__(self, model, layer: str | None = None):
        T = tf()
        name = layer or default_layer(model)
        target, owner = _find(model, name)
        shape = _output_shape(target)
        if shape is None or len(shape) != 4:
            raise UserError(f"--layer {name}: its output {shape} is not a feature map (N, H, W, C); "
                            f"pick a convolution, e.g. {default_layer(model)}")
        if (shape[1] or 0) * (shape[2] or 0) <= 1:
            raise UserError(f"--layer {name}: its map is {shape[1]}x{shape[2]}, no spatial map to show; "
                            f"pick an earlier layer, e.g. {default_layer(model)}")
        self.layer, self.map_shape = name, (int(shape[1]), int(shape[2]))
        h, w = (int(d) for d in model.input_shape[1:3])
        self.image_size = (h, w)
        final = model.layers[-1]
        grad_model = _grad_model(model, target, owner, final)
        to_logits = _logits(final)
        mirrored = _mirrored_at(model, target, owner)

        @T.function(input_signature=[T.TensorSpec([None, h, w, 3], T.float32), T.TensorSpec([None], T.int32)])
        def run(x, wanted):
            with T.GradientTape() as tape:
                # Watching the input puts every op on the tape, frozen backbones included
                # (their weights are not trainable variables, so nothing else would).
                tape.watch(x)
                maps, penultimate = grad_model(x, training=False)
                logits = to_logits(penultimate)
                chosen = T.where(wanted >= 0, wanted, T.argmax(logits, axis=-1, output_type=T.int32))
                # Each image's score depends only on its own maps, so one gradient of the sum gives all.
                score = T.reduce_sum(T.gather(logits, chosen, batch_dims=1))
            grads = tape.gradient(score, maps)
            weights = T.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = T.reduce_sum(weights * maps, axis=-1)
            if mirrored:
                n = T.shape(logits)[0]
                cam = cam[:n] + T.reverse(cam[n:], axis=[2])
            cam = T.nn.relu(cam)
            cam = T.image.resize(cam[..., None], (h, w), method="bilinear")[..., 0]
            peak = T.reduce_max(cam, axis=(1, 2), keepdims=True)
            cam = T.math.divide_no_nan(cam, peak)
            return cam, T.nn.softmax(logits), chosen

        self._run = run

    def __call__(self, pixels: np.ndarray, class_index: np.ndarray | None = None) -> Explanation:
        T = tf()
        pixels = np.asarray(pixels, np.float32)
        if pixels.ndim != 4 or tuple(pixels.shape[1:3]) != self.image_size:
            raise UserError(f"pixels of shape {pixels.shape}; this model takes (N, {self.image_size[0]}, "
                            f"{self.image_size[1]}, 3)")
        wanted = np.full(len(pixels), -1, np.int32) if class_index is None else np.asarray(class_index, np.int32)
        maps, probs, chosen = [], [], []
        for start in range(0, len(pixels), BATCH):
            cam, p, c = self._run(T.constant(pixels[start:start + BATCH]), T.constant(wanted[start:start + BATCH]))
            maps.append(cam.numpy())
            probs.append(p.numpy())
            chosen.append(c.numpy())
        return Explanation(np.concatenate(maps), np.concatenate(probs), np.concatenate(chosen), self.layer)


def _grad_model(model, target, owner, final):
    """A model from the raw pixels to [the layer's map, the input of the final layer], one pass.

    A layer inside a nested backbone has no tensor in the outer graph; the backbone is then
    re-entered as a functional model with two outputs, [the layer's map, its own output], and the
    outer layers after it (a chain in models.build: pooling, dropout, dense) are called again on
    that output. Calling the same layer objects shares their weights."""
    K = keras()
    if owner is None:
        return K.Model(model.inputs, [target.get_output_at(0), final.get_input_at(0)])
    split = K.Model(owner.inputs, [target.get_output_at(0), owner.outputs[0]], name=f"{owner.name}_gradcam")
    maps, x = split(owner.get_input_at(-1))
    after = model.layers[model.layers.index(owner) + 1:-1]
    previous = owner
    for layer in after:
        if layer.get_input_at(0) is not previous.get_output_at(0):
            raise UserError(f"Grad-CAM inside '{owner.name}' needs the layers after it to form a chain; "
                            f"'{layer.name}' does not follow '{previous.name}'")
        x, previous = layer(x), layer
    return K.Model(model.inputs, [maps, x])


def _logits(final) -> Callable:
    """The class scores before the softmax from the final layer's input: Grad-CAM explains the
    logit, since a softmax probability's gradient also pushes the other classes down."""
    K, T = keras(), tf()
    activation = final.get_config().get("activation")
    if isinstance(final, K.layers.Dense) and activation == "softmax":
        return lambda x: T.matmul(x, final.kernel) + final.bias
    if isinstance(final, K.layers.Activation) and activation == "softmax":
        return lambda x: x  # the scaled logits of --logit-scale
    raise UserError(f"the model's last layer '{final.name}' is not a softmax; Grad-CAM needs the logits before it")


def _mirrored_at(model, target, owner) -> bool:
    """True when the layer sees each image and its mirror (--tta flip, after the tta_views layer)."""
    from training.model.build import tta_layer_classes  # noqa: PLC0415

    mirror = tta_layer_classes()[0]
    views = [i for i, layer in enumerate(model.layers) if isinstance(layer, mirror)]
    if not views:
        return False
    return model.layers.index(owner or target) > views[0]


_CACHE: "weakref.WeakKeyDictionary[Any, dict[str | None, GradCam]]" = weakref.WeakKeyDictionary()


def explainer(model, layer: str | None = None) -> GradCam:
    """A GradCam per model and layer, kept while the model lives (building one traces a graph)."""
    per_model = _CACHE.setdefault(model, {})
    if layer not in per_model:
        per_model[layer] = GradCam(model, layer)
    return per_model[layer]


def explain_arrays(model, pixels: np.ndarray, class_index: np.ndarray | None = None,
                   layer: str | None = None) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in [0, 1] for raw pixels (N, H, W, 3) at the model's input size,
    for the given classes or (None) each image's predicted class."""
    return explainer(model, layer)(pixels, class_index).heatmaps


# ---- pictures ---------------------------------------------------------------------------------


def overlay(pixels: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45):
    """The image with the heat map in matplotlib's jet colours blended over it (a PIL image at the
    image's own size; the map is stretched to it, as the model stretched the image)."""
    import matplotlib  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    base = Image.fromarray(np.asarray(pixels, np.uint8)).convert("RGB")
    heat = Image.fromarray(np.asarray(heatmap, np.float32), mode="F").resize(base.size, Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps["jet"](np.clip(np.asarray(heat), 0, 1))[..., :3]
    return Image.blend(base, Image.fromarray((colours * 255).astype(np.uint8)), alpha)


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """overlay() as PNG bytes (for an HTML page's data: URI)."""
    buf = io.BytesIO()
    overlay(pixels, heatmap, alpha=alpha).save(buf, format="PNG")
    return buf.getvalue()


def figure_png(original: np.ndarray, heatmap: np.ndarray, title: str) -> bytes:
    """The image as sent beside the image with its heat map, titled: `tlserve explain`'s file."""
    from training.record.plots import plt  # noqa: PLC0415 (Agg backend)

    height, width = original.shape[:2]
    # Panels at the image's aspect, within reason for a very tall or wide picture.
    fig, axes = plt.subplots(1, 2, figsize=(8, min(max(4 * height / width, 1.5), 10) + 0.7))
    small = max(original.shape[:2]) < 128  # show a CIFAR-sized image's pixels, not a blur
    for ax, picture, label in ((axes[0], original, "image"), (axes[1], np.asarray(overlay(original, heatmap)), "Grad-CAM")):
        ax.imshow(picture, interpolation="nearest" if small else "antialiased")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


# ---- tlserve explain --------------------------------------------------------------------------

DISPLAY_MAX = 512  # the written picture's longest side; the map is stretched to it


@dataclass(frozen=True)
class ExplainedImage:
    path: str
    predicted: str
    probability: float
    explained: str
    explained_probability: float
    out: Path


def resolve_run(ref: str, runs_dir: Path | None = None, models_dir: Path | None = None) -> records.Run:
    """A run from a run name or folder, or from an exported model (its manifest names the run)."""
    run_path = records.resolve_run_dir(ref, runs_dir)
    if (run_path / records.RECORD).is_file() or (Path(ref) / records.RECORD).is_file():
        return records.load_run(ref, runs_dir)
    from serving.base.manifest import Manifest, ModelFolder, resolve_model  # noqa: PLC0415

    if not ModelFolder(Path(ref)).is_export() and not ModelFolder(storage.models_dir(models_dir) / ref).is_export():
        if run_path.is_dir():
            return records.load_run(ref, runs_dir)  # an unfinished run: load_run says so
        known = [r.name for r in records.list_runs(runs_dir)] + _model_names(models_dir)
        raise UserError(f"no run or exported model named '{ref}' (looked in {storage.runs_dir(runs_dir)} and "
                        f"{storage.models_dir(models_dir)}){nearest(ref, known)}")
    model_dir = resolve_model(ref, models_dir)
    manifest = Manifest.load(model_dir)
    for candidate in (manifest.run_path, manifest.run):
        if candidate and (records.resolve_run_dir(candidate, runs_dir) / records.RECORD).is_file():
            run = records.load_run(candidate, runs_dir)
            if run.record.data.class_names != manifest.class_names:
                raise UserError(f"run '{run.name}' no longer has the classes model '{ref}' was exported with "
                                "(retrained since?); explain the run itself")
            return run
    raise UserError(f"model '{ref}' was exported from run '{manifest.run}', which is not at "
                    f"{manifest.run_path} nor in {storage.runs_dir(runs_dir)}; Grad-CAM needs the run's "
                    f"{records.MODEL} (pass --runs-dir)")


def _model_names(models_dir: Path | None) -> list[str]:
    from serving.base.manifest import list_local  # noqa: PLC0415

    return list_local(models_dir)


def explain_files(ref: str, paths: list[Path], *, out: Path, layer: str | None = None, class_name: str | None = None,
                  runs_dir: Path | None = None, models_dir: Path | None = None,
                  log: Callable[[str], None] = print) -> tuple[list[ExplainedImage], list[str]]:
    """Write `<stem>-gradcam.png` into `out` for every image that decodes; (done, failures).

    A file that does not decode is named in failures and the others are still explained (as
    `tlserve predict` does); the caller exits non-zero when there are failures. Each picture is
    written atomically, so a failure never leaves a half-written file."""
    from serving.predict import expand  # noqa: PLC0415
    from training.model.build import load_model  # noqa: PLC0415

    run = resolve_run(ref, runs_dir, models_dir)
    class_names = list(run.record.data.class_names)
    wanted = None
    if class_name is not None:
        if class_name not in class_names:
            raise UserError(f"--class: no class '{class_name}' in run '{run.name}'{nearest(class_name, class_names)}")
        wanted = class_names.index(class_name)
    files = expand(paths)
    if not files:
        raise UserError("no image files given")
    model = load_model(run.model_path)
    cam = explainer(model, layer)  # a bad --layer fails before any image is read
    h, w = run.record.data.image_size
    interpolation = run.record.data.interpolation or images.DEFAULT_INTERPOLATION
    done, failures, used = [], [], set()
    for path in files:
        try:
            pixels = images.load_array(path, (h, w), interpolation=interpolation, name=str(path))
            shown = images.open_image(path, name=str(path))
        except images.ImageError as exc:
            failures.append(str(exc))
            continue
        shown.thumbnail((DISPLAY_MAX, DISPLAY_MAX))
        result = cam(pixels[None], None if wanted is None else np.array([wanted]))
        probs = result.probabilities[0]
        predicted, explained = int(probs.argmax()), int(result.class_index[0])
        title = f"{class_names[predicted]} {probs[predicted]:.3f}"
        if explained != predicted:
            title = f"Grad-CAM of {class_names[explained]} ({probs[explained]:.3f}); predicted {title}"
        target = out / _unique_name(Path(path).stem, used)
        storage.write_bytes(target, figure_png(np.asarray(shown), result.heatmaps[0], f"{title}  [{cam.layer}]"))
        done.append(ExplainedImage(str(path), class_names[predicted], float(probs[predicted]), class_names[explained],
                                   float(probs[explained]), target))
        log(f"{path}: {class_names[predicted]} {probs[predicted]:.3f}"
            + (f", explained {class_names[explained]} {probs[explained]:.3f}" if explained != predicted else "")
            + f" -> {target}")
    return done, failures


def _unique_name(stem: str, used: set[str]) -> str:
    """`<stem>-gradcam.png`, numbered when two images share a stem (a/x.png and b/x.jpg)."""
    name, n = f"{stem}-gradcam.png", 1
    while name in used:
        n += 1
        name = f"{stem}-{n}-gradcam.png"
    used.add(name)
    return name
