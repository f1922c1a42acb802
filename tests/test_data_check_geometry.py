"""The data check's crop and rotation search (training/audit/geometry.py) on generated images.

A 10% crop resized back and a 6 degree rotation of two training images are planted in test among
unrelated images: both must be found, named for what they are, and no unrelated pair reported. No
embeddings: the geometric search needs only the grey thumbnails (seconds).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from conftest import SHARED
from training.audit import geometry, pairs
from training.audit.fingerprints import columns, fingerprint

MOBILENET = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
SIZE = 96


def textured(rng: np.random.Generator) -> Image.Image:
    """A random colour field at two scales with a few shapes: no two alike, with detail to align on."""
    coarse = Image.fromarray(rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.uniform(0, 255, (12, 12, 3)).astype(np.uint8)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    img = Image.blend(coarse, fine, 0.4)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 6))):
        x0, y0 = rng.integers(0, SIZE - 30, 2)
        w, h = rng.integers(10, 36, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def crop(im: Image.Image) -> Image.Image:
    """10% off each side's length, off centre, resized back."""
    return im.crop((3, 7, 3 + 86, 7 + 86)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)


def rotation(im: Image.Image, degrees: float = 6.0) -> Image.Image:
    """Turned and cut to the largest centred square without corners, resized back."""
    t = np.radians(abs(degrees))
    side = int(SIZE / (np.cos(t) + np.sin(t)))
    x0 = (SIZE - side) // 2
    turned = im.rotate(degrees, Image.Resampling.BICUBIC)
    return turned.crop((x0, x0, x0 + side, x0 + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)


@pytest.mark.fast  # seconds: grey thumbnails only
def test_a_planted_crop_and_rotation_are_found_and_unrelated_images_are_not():
    rng = np.random.default_rng(3)
    train = [textured(rng) for _ in range(30)]
    test = [textured(rng) for _ in range(10)] + [crop(train[4]), rotation(train[11])]
    images = train + test
    split = [0] * len(train) + [2] * len(test)
    imgs = columns(split, [f"#{i}" for i in range(len(images))], [0] * len(images),
                   [fingerprint(im.convert("RGB"), "fast") for im in images], [{}] * len(images))
    found, truncated = pairs.search(imgs, None, pairs.Thresholds(), cross_only=True, bar=False, geometric=True)
    assert not truncated
    got = {(p.a, p.b): p for p in found}
    crop_row, rot_row = len(train) + 10, len(train) + 11
    assert set(got) == {(4, crop_row), (11, rot_row)}, [(p.a, p.b, p.how, p.pixels) for p in found]
    assert (got[(4, crop_row)].kind, got[(4, crop_row)].how) == ("near", "crop")
    assert (got[(11, rot_row)].kind, got[(11, rot_row)].how) == ("near", "rotation")
    assert min(p.pixels for p in found) >= geometry.MIN_ALIGNED


@pytest.mark.fast
def test_a_grey_copy_of_a_colour_image_is_a_copy_and_a_recoloured_one_is_not():
    """Saturation to zero leaves no colour to keep: one image grey, the grey rules decide (hash and pixels,
    or alignment for a grey crop). A shape recoloured in another hue is still not a copy."""
    rng = np.random.default_rng(4)
    train = [textured(rng) for _ in range(20)]
    grey = lambda im: ImageOps.grayscale(im).convert("RGB")  # noqa: E731
    g = np.asarray(train[9].convert("L"), np.float32)
    recoloured = Image.fromarray(np.stack([g * 0.2, g * 0.5, g * 1.0], axis=-1).astype(np.uint8))
    test = [textured(rng) for _ in range(6)] + [grey(train[2]), grey(crop(train[6])), recoloured]
    images = train + test
    imgs = columns([0] * len(train) + [2] * len(test), [f"#{i}" for i in range(len(images))], [0] * len(images),
                   [fingerprint(im.convert("RGB"), "fast") for im in images], [{}] * len(images))
    found, _ = pairs.search(imgs, None, pairs.Thresholds(), cross_only=True, bar=False, geometric=True)
    first = len(train) + 6
    assert {(p.a, p.b): p.how for p in found} == {(2, first): "phash", (6, first + 1): "crop"}, \
        [(p.a, p.b, p.how, p.pixels) for p in found]


@pytest.mark.fast
def test_alignment_recovers_the_crop_window_and_the_angle():
    rng = np.random.default_rng(5)
    a = textured(rng)
    grey = np.stack([np.asarray(im.convert("L").resize((32, 32), Image.Resampling.LANCZOS)) for im in (a, rotation(a, -6.0))])
    al = geometry.align(grey, np.array([0]), np.array([1]))
    assert bool(al.zoomed[0])                       # the rotated square is the zoomed-in view of the original
    scale, degrees = float(al.transform[0, 0]), float(al.transform[0, 1])
    assert abs(degrees - (-6.0)) <= 2.0 and 0.85 <= scale <= 0.95, al.transform
    assert float(al.score[0]) >= geometry.MIN_ALIGNED


@pytest.mark.fast
def test_a_shape_redrawn_in_other_colours_is_not_a_geometric_copy():
    """The colour rule's spirit (pairs.MAX_CHROMA_SHIFT): the same layout in other colours aligns in grey
    but is not a copy."""
    rng = np.random.default_rng(9)
    grey = np.asarray(textured(rng).convert("L"), np.float32)

    def tinted(weights):  # the same grey pattern in one hue: every channel keeps it, the mean colour moves
        return Image.fromarray(np.stack([grey * w for w in weights], axis=-1).astype(np.uint8))
    base, recoloured = tinted((1.0, 0.5, 0.2)), tinted((0.2, 0.5, 1.0))
    grey_imgs = columns([0, 2], ["#0", "#1"], [0, 0], [fingerprint(im, "fast") for im in (base, crop(recoloured))], [{}] * 2)
    aligned = geometry.align(grey_imgs.grey, np.array([0]), np.array([1]))
    assert float(aligned.score[0]) >= geometry.MIN_ALIGNED   # in grey it is a crop: only colour tells them apart
    images = [base, crop(recoloured)] + [textured(rng) for _ in range(8)]
    imgs = columns([0] + [2] * (len(images) - 1), [f"#{i}" for i in range(len(images))], [0] * len(images),
                   [fingerprint(im, "fast") for im in images], [{}] * len(images))
    found, _ = pairs.search(imgs, None, pairs.Thresholds(), cross_only=True, bar=False, geometric=True)
    assert not [p for p in found if {p.a, p.b} == {0, 1}], [(p.a, p.b, p.how, p.pixels) for p in found]


@pytest.mark.skipif(not MOBILENET.is_file(), reason="needs ../shared/weights")
def test_data_check_reports_crops_and_rotations_only_with_crops(run_cli, tmp_path):
    """`tlserve data check --crops` names the planted crop and rotation; without --crops (the default)
    the check is as before and does not look."""
    rng = np.random.default_rng(11)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "set" / split / c).mkdir(parents=True)
    train = [textured(rng) for _ in range(12)]
    for i, im in enumerate(train):
        im.save(tmp_path / "set" / "train" / "ab"[i % 2] / f"{i:02d}.png")
    for i in range(4):
        textured(rng).save(tmp_path / "set" / "test" / "ab"[i % 2] / f"other_{i}.png")
    crop(train[2]).save(tmp_path / "set" / "test" / "a" / "crop.png")
    rotation(train[5]).save(tmp_path / "set" / "test" / "b" / "rotation.png")
    hows = {}
    for flag in ("--crops", "--no-crops"):
        res = run_cli("data", "check", "--data", f"folder:{tmp_path / 'set'}", "--out", tmp_path / flag, "--weights",
                      MOBILENET, "--no-labels", flag, "--json")
        assert res.code == 0, res.err
        hows[flag] = {(p["a"]["file"], p["b"]["file"]): p["how"] for p in json.loads(res.out)["pairs"]}
    assert hows["--crops"] == {("train/a/02.png", "test/a/crop.png"): "crop",
                               ("train/b/05.png", "test/b/rotation.png"): "rotation"}, hows
    assert not {h for h in hows["--no-crops"].values() if h in ("crop", "rotation")}
