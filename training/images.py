"""Image decoding shared by training data, `tlserve predict` and the HTTP service.

One decoder for all three is what keeps an image's pixels the same whether it
was trained on, predicted locally or uploaded. Pillow is the decoder: it
handles every mode (palette, RGBA, 16-bit, grayscale, CMYK) and EXIF orientation.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import UserError

# Pillow's names; the record and manifest store the name used at training time.
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "lanczos": Image.Resampling.LANCZOS,
}
DEFAULT_INTERPOLATION = "bilinear"
# Larger than any photo a classifier needs; a header claiming more is a bomb.
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageError(UserError, ValueError):
    """The bytes are not an image we can use (not an image, truncated, too large)."""


def open_image(data: bytes | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Open and fully decode an image into RGB, refusing bombs by header first."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError(f"{name}: empty file")
        source = io.BytesIO(bytes(data))
    else:
        source = Path(data)
        if not source.is_file():
            raise ImageError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
            width, height = img.size
            # The header is read, the pixels are not: refuse here, before any decode cost.
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} is larger than the {max_pixels:,}-pixel limit")
            if width < 1 or height < 1:
                raise ImageError(f"{name}: image has no pixels")
            img.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: not a readable image ({exc.__class__.__name__})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img) or img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: scale to 8 bits rather than clip to white.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as an image viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def to_array(img: Image.Image, size: tuple[int, int] | None, interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """RGB image → uint8 array (H, W, 3), resized to size=(height, width) if given."""
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), INTERPOLATIONS[interpolation])
    return np.asarray(img, dtype=np.uint8)


def load_array(data: bytes | Path | str, size: tuple[int, int] | None, *, interpolation: str = DEFAULT_INTERPOLATION,
               max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    return to_array(open_image(data, max_pixels=max_pixels, name=name), size, interpolation)


def is_image_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
