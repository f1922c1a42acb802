"""`tlserve explain`: Grad-CAM through the run's Keras model, checked against the synthetic shapes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import cli_call


def _object_mask(x: np.ndarray) -> np.ndarray:
    # make_synthetic paints shapes in colours 130-255 per channel over a 0-110 background (+ noise).
    return x.astype(np.float32).mean(-1) > 120


@pytest.fixture(scope="module")
def cnn_keras(cnn_run):
    from training.model.build import load_model

    return load_model(cnn_run / "model.keras")


def test_heat_lies_on_the_shape_not_the_background(cnn_keras):
    from training.data.sources import make_synthetic
    from training.exported.explain import explain_arrays, explainer

    x, y, _ = make_synthetic(120, seed=11)
    maps = explain_arrays(cnn_keras, x)
    assert maps.shape == (120, 32, 32) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0
    lit = maps.max(axis=(1, 2)) > 0
    assert lit.mean() > 0.9, f"only {lit.mean():.0%} of the maps have any positive evidence"
    mask = _object_mask(x)
    on = np.array([m[k].mean() for m, k in zip(maps, mask)])
    off = np.array([m[~k].mean() for m, k in zip(maps, mask)])
    rate = float((on > off).mean())
    assert rate >= 0.7, f"heat denser on the shape than on the background for only {rate:.0%} of images"
    # The heat follows the shape, not a fixed centre: move each shape 8 pixels left, then right
    # (the background is uniform, so rolling the image moves only the shape).
    columns = np.arange(32)
    left, right = explain_arrays(cnn_keras, np.roll(x, -8, axis=2)), explain_arrays(cnn_keras, np.roll(x, 8, axis=2))
    moved = ((right.sum(1) * columns).sum(1) / np.maximum(right.sum((1, 2)), 1e-9)
             - (left.sum(1) * columns).sum(1) / np.maximum(left.sum((1, 2)), 1e-9))
    assert (moved > 0).mean() >= 0.9 and np.median(moved) > 2, np.round(moved, 1)
    # The heat per pixel on the shape is well above the background's, on average.
    assert on.mean() > 1.5 * off.mean(), (on.mean(), off.mean())

    explanation = explainer(cnn_keras)(x[:16])
    np.testing.assert_allclose(explanation.probabilities, cnn_keras.predict(x[:16].astype(np.float32), verbose=0),
                               atol=1e-5)
    np.testing.assert_array_equal(explanation.class_index, explanation.probabilities.argmax(1))
    # Another class: its own map, and the class asked for is the one explained.
    wanted = (explanation.class_index + 1) % 10
    again = explainer(cnn_keras)(x[:16], wanted)
    np.testing.assert_array_equal(again.class_index, wanted)
    assert np.abs(again.heatmaps - explanation.heatmaps).max() > 0.1


def test_default_layer_is_the_last_convolution_with_a_map(cnn_keras):
    from training.env import keras
    from training.exported.explain import GradCam, default_layer

    convs = [layer.name for layer in cnn_keras.layers if isinstance(layer, keras().layers.Conv2D)]
    assert default_layer(cnn_keras) == convs[-1]
    assert GradCam(cnn_keras).map_shape == (16, 16)  # seed003: c32, p, c64 at 16x16, p


def test_tta_flip_map_mirrors_with_the_image():
    """With --tta flip the model scores an image and its mirror alike, so its Grad-CAM of a mirrored
    image must be the mirrored map: holds only if the mirror view's map is flipped back."""
    from training.model import build as models
    from training.config import TrainConfig
    from training.data.sources import make_synthetic
    from training.exported.explain import GradCam

    model = models.build(TrainConfig(backbone="cnn", tta="flip", seed=3), (32, 32), 10).model
    x, _, _ = make_synthetic(6, seed=5)
    cam = GradCam(model)
    plain, mirrored = cam(x), cam(x[:, :, ::-1])
    assert plain.heatmaps.max() > 0
    np.testing.assert_array_equal(plain.class_index, mirrored.class_index)
    np.testing.assert_allclose(mirrored.heatmaps, plain.heatmaps[:, :, ::-1], atol=1e-4)
    np.testing.assert_allclose(plain.probabilities, model.predict(x.astype(np.float32), verbose=0), atol=1e-5)


def test_mobilenetv2_default_layer_and_nested_split(tmp_path):
    """The map of a layer inside the nested backbone and the class score come from one pass
    whose probabilities are the saved model's own; the default layer moves back where a small
    input shrinks the last maps to 1x1, and a 1x1 layer is refused in one line (GradCam checks
    shapes before tracing anything)."""
    from serving.base.errors import UserError
    from training.model import build as models
    from training.config import TrainConfig
    from training.exported.explain import GradCam, default_layer
    from training.model.build import load_model

    cfg = TrainConfig(backbone="mobilenetv2", strategy="frozen", weights="none", input_size=64)
    built = models.build(cfg, (32, 32), 4)
    built.model.save(tmp_path / "m.keras")
    model = load_model(tmp_path / "m.keras")  # as explain loads it: the backbone nested in the saved file
    assert default_layer(model) == "out_relu"
    cam = GradCam(model)
    assert cam.map_shape == (2, 2)
    x = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    result = cam(x)
    assert result.heatmaps.shape == (3, 32, 32)
    np.testing.assert_allclose(result.probabilities, model.predict(x, verbose=0), atol=1e-5)
    # A second split of the same model (the head layers are called again): another layer's map.
    assert GradCam(model, "block_6_expand_relu").map_shape == (8, 8)

    small = models.build(TrainConfig(backbone="mobilenetv2", strategy="frozen", weights="none", input_size=32),
                         (32, 32), 4).model
    assert default_layer(small) == "block_13_expand_relu"  # out_relu is 1x1 at 32 pixels
    with pytest.raises(UserError, match="1x1, no spatial map"):
        GradCam(small, "out_relu")


def test_overlay_png_colours_the_hot_side():
    """overlay_png, for pages that embed the maps: the image's size, jet red where the map is 1
    and blue where it is 0, blended over the pixels."""
    import io

    from training.exported.explain import overlay_png

    pixels = np.full((20, 30, 3), 128, np.uint8)
    heat = np.zeros((5, 5), np.float32)
    heat[:, 3:] = 1.0  # the right side is hot; the map is stretched to the image
    with Image.open(io.BytesIO(overlay_png(pixels, heat))) as picture:
        assert picture.format == "PNG" and picture.size == (30, 20)
        rgb = np.asarray(picture.convert("RGB")).astype(int)
    right, left = rgb[:, -3:].mean((0, 1)), rgb[:, :3].mean((0, 1))
    assert right[0] > right[2] + 40 and left[2] > left[0] + 40, (right, left)


def _write_images(folder: Path) -> list[Path]:
    from training.data.sources import make_synthetic

    folder.mkdir()
    x, y, names = make_synthetic(3, seed=21)
    paths = [folder / f"a-{names[y[0]]}.png", folder / f"b-{names[y[1]]}.jpg", folder / "c.png"]
    Image.fromarray(x[0]).save(paths[0])
    Image.fromarray(x[1]).resize((300, 200)).save(paths[1], quality=95)  # larger, not square: resized on load
    Image.fromarray(x[2]).convert("RGBA").save(paths[2])
    return paths


def test_cli_writes_one_png_per_image_and_names_the_bad_one(run_cli, cnn_run, runs_root, tmp_path):
    paths = _write_images(tmp_path / "images")
    bad = tmp_path / "images" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "explained"
    result = run_cli("explain", "cnn", *paths, bad, "--runs-dir", runs_root, "--out", out)
    assert result.code == 2  # a file that does not decode: named, the others still explained
    assert "broken.png" in result.err and len(result.err.strip().splitlines()) == 1
    lines = result.out.strip().splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines):
        png = out / f"{path.stem}-gradcam.png"
        assert line.startswith(f"{path}: ") and str(png) in line
        label, probability = line.split(": ", 1)[1].split(" ")[:2]
        assert 0 < float(probability) <= 1 and label.isalpha()
        with Image.open(png) as picture:
            assert picture.format == "PNG" and picture.width >= 400
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}-gradcam.png" for p in paths)  # no temp files


def test_cli_class_and_layer_options(run_cli, cnn_run, runs_root, cnn_keras, tmp_path):
    from training.exported.explain import spatial_layers

    path = _write_images(tmp_path / "images")[0]
    first = spatial_layers(cnn_keras)[2][0].name  # the first convolution (after the input and preprocess)
    result = run_cli("explain", str(cnn_run), path, "--class", "ring", "--layer", first, "--out", tmp_path / "o")
    assert result.code == 0, result.err
    assert "explained ring" in result.out or result.out.split(": ")[1].startswith("ring ")
    assert (tmp_path / "o" / f"{path.stem}-gradcam.png").is_file()


# Layer names are Keras's per-session counters (conv2d_1, flatten_2), so they are looked up by type.
@pytest.mark.parametrize("args, message", [
    (["--layer", "{Conv2D}x"], "no layer '{Conv2D}x' in this model; nearest: {Conv2D}"),
    (["--layer", "{Flatten}"], "--layer {Flatten}: its output (None, 4096) is not a feature map"),
    (["--class", "circl"], "no class 'circl' in run 'cnn'; nearest: circle"),
])
def test_cli_bad_options_are_one_line(run_cli, cnn_run, runs_root, cnn_keras, tmp_path, args, message):
    names = {type(layer).__name__: layer.name for layer in cnn_keras.layers}  # the last of each type
    args, message = [a.format(**names) for a in args], message.format(**names)
    path = _write_images(tmp_path / "images")[0]
    out = tmp_path / "out"
    result = run_cli("explain", "cnn", path, *args, "--runs-dir", runs_root, "--out", out)
    assert result.code == 2
    assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
    assert not out.exists()


def test_cli_unknown_run_and_exported_model(run_cli, cnn_run, runs_root, tmp_path):
    path = _write_images(tmp_path / "images")[0]
    models = tmp_path / "models"
    result = run_cli("explain", "cnx", path, "--runs-dir", runs_root, "--models-dir", models, "--out", tmp_path / "o")
    assert result.code == 2 and "no run or exported model named 'cnx'" in result.err and "nearest: cnn" in result.err

    cli_call("export", "cnn", "--formats", "onnx", "--no-register", "--runs-dir", runs_root, "--models-dir", models)
    # The model folder's manifest names its run; explain uses that run's Keras model.
    result = run_cli("explain", models / "cnn", path, "--runs-dir", tmp_path / "elsewhere", "--out", tmp_path / "o")
    assert result.code == 0, result.err
    assert (tmp_path / "o" / f"{path.stem}-gradcam.png").is_file()

    moved = tmp_path / "moved"
    shutil.copytree(models / "cnn", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest.update(run="gone", run_path=str(tmp_path / "gone"))
    (moved / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("explain", moved, path, "--runs-dir", runs_root, "--out", tmp_path / "o2")
    assert result.code == 2 and "exported from run 'gone'" in result.err and len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "o2").exists()
