"""`tlserve data check` on a generated set with planted duplicates, and the training run's own check.

The set: distinct clean images (smooth random colour fields with random shapes) in train/val/test
class folders, plus copies of some training images planted in val/test: an exact copy, a resized
copy, a recompressed JPEG, a colour-shifted copy, a 10% crop and a mirror image; one exact copy
under another class (a label conflict); a file that will not decode, a text file, a grayscale and
a CMYK image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from conftest import SHARED

MOBILENET = SHARED / "weights" / "mobilenetv2_1.0_imagenet_no_top.h5"
CLASSES = ("alpha", "beta", "gamma")
SIZE = 96


def clean_image(rng: np.random.Generator) -> Image.Image:
    """A smooth random colour field with a few random shapes: no two alike."""
    field = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    img = Image.fromarray(field).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = rng.integers(0, SIZE - 30, 2)
        w, h = rng.integers(12, 40, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


# name -> how the copy is made from its training original
PLANTS = {
    "exact": lambda im: im,
    "resized": lambda im: im.resize((64, 64), Image.Resampling.BILINEAR),
    "recompressed": None,  # written as JPEG quality 35 below
    "colour": lambda im: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(1.3),
    "crop": lambda im: im.crop((5, 5, SIZE - 5, SIZE - 5)).resize((SIZE, SIZE), Image.Resampling.BICUBIC),
    "flipped": ImageOps.mirror,
}


def make_set(root: Path, *, per_class: tuple[int, int, int] = (14, 4, 4), seed: int = 7) -> dict[str, tuple[str, str]]:
    """Write the set; returns planted pairs as name -> (train file, copy file), relative to root."""
    rng = np.random.default_rng(seed)
    originals: list[tuple[str, Image.Image]] = []
    for split, n in zip(("train", "val", "test"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = clean_image(rng)
                rel = f"{split}/{c}/{c}_{i:03d}.png"
                img.save(root / rel)
                if split == "train":
                    originals.append((rel, img))
    planted: dict[str, tuple[str, str]] = {}
    for k, (name, make) in enumerate(PLANTS.items()):
        rel, img = originals[k * 3]          # spread over classes
        cls = rel.split("/")[1]
        split = "val" if name in ("resized", "crop") else "test"
        copy = f"{split}/{cls}/planted_{name}.{'jpg' if name in ('recompressed', 'exact') else 'png'}"
        if name == "exact":
            # The same pixels in another container: a byte copy would be found, and so is this.
            copy = f"{split}/{cls}/planted_exact.bmp"
            img.save(root / copy)
        elif name == "recompressed":
            img.save(root / copy, quality=35)
        else:
            make(img).save(root / copy)
        planted[name] = (rel, copy)
    # The same image under another class: a label conflict across splits.
    rel, img = originals[20]
    other = next(c for c in CLASSES if c != rel.split("/")[1])
    conflict = f"test/{other}/planted_conflict.png"
    img.save(root / conflict)
    planted["conflict"] = (rel, conflict)
    # Odd files: a .jpg that is not one, a text file, a grayscale and a CMYK image (clean, distinct).
    (root / "train" / "alpha" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "train" / "beta" / "notes.txt").write_text("collected on a Tuesday\n")
    clean_image(rng).convert("L").save(root / "train" / "gamma" / "gray.png")
    clean_image(rng).convert("CMYK").save(root / "train" / "gamma" / "cmyk.jpg")
    return planted
