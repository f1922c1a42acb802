"""Image decoding shared by training data, `tlserve predict` and the HTTP service.

One decoder for all three is what keeps an image's pixels the same whether it
was trained on, predicted locally or uploaded; it lives in serving/, which
training/ imports and a bento ships. Pillow is the decoder: it
handles every mode (palette, RGBA, 16-bit, grayscale, CMYK) and EXIF orientation.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serving.base.errors import UserError

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
# A large image shrinks in two steps, as Image.thumbnail does: a cheap integer reduce (or JPEG DCT
# scaling) that keeps at least this margin over the target, then the configured filter from there.
# 4, not thumbnail's 2: with "area" (a box filter) 2 left ~2 grey levels from a full-resolution
# resize at 32x32 on a photo-like image, 4 leaves under 1 (under 0.25 for the other filters).
REDUCING_GAP = 4.0
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class ImageError(UserError, ValueError):
    """The bytes are not an image we can use (not an image, truncated, too large, unreadable).
    `why` is the one wording of each reason, which training, the data check, `predict` and the
    HTTP service all show; str() is "name: why"."""

    def __init__(self, name: str, why: str):
        super().__init__(name, why)  # both in args, so the error pickles across process pools
        self.name, self.why = name, why

    def __str__(self) -> str:
        return f"{self.name}: {self.why}"


class ImageTooLarge(ImageError):
    """The header claims more pixels than allowed: refused before any decode (HTTP 413, not 400)."""


def header_size(data: bytes | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> tuple[int, int]:
    """(width, height) read from the header alone, with the same refusals as a decode's first step."""
    img = _open(data, max_pixels=max_pixels, name=name)
    img.close()
    return img.size


def open_image(data: bytes | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Open and fully decode an image into RGB, refusing bombs by header first."""
    return _decode(_open(data, max_pixels=max_pixels, name=name), name)


def load_array(data: bytes | Path | str, size: tuple[int, int] | None, *, interpolation: str = DEFAULT_INTERPOLATION,
               max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    """Decode straight to a uint8 array of size=(height, width): the one path training and serving share.

    A large JPEG is decoded already scaled down (DCT scaling); any other large image is reduced
    right after its decode, so nothing of full resolution outlives this call."""
    img = _open(data, max_pixels=max_pixels, name=name)
    # Not for nearest: it picks single pixels, and DCT scaling would average them first.
    if size is not None and img.format == "JPEG" and interpolation != "nearest":
        _draft(img, size)
    return to_array(_decode(img, name), size, interpolation)


def _open(data: bytes | Path | str, *, max_pixels: int, name: str) -> Image.Image:
    """Image.open reads the header (size, format, EXIF), not the pixels: a bomb is refused here."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError(name, "empty file")
        source: io.BytesIO | Path = io.BytesIO(bytes(data))
    else:
        source = Path(data)
        if not source.is_file():
            raise ImageError(name, "no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(name, "larger than the decoder's decompression-bomb limit") from None
    except UnidentifiedImageError as exc:
        raise ImageError(name, f"not a readable image ({exc.__class__.__name__})") from None
    except OSError as exc:
        if exc.filename is not None:  # the file itself could not be opened: permissions, a folder, ...
            raise ImageError(name, f"cannot read the file ({exc.strerror})") from None
        raise ImageError(name, f"cannot decode image ({exc})") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(name, f"cannot decode image ({exc})") from None
    width, height = img.size
    if width * height > max_pixels or width < 1 or height < 1:
        img.close()  # a file Pillow opened for a path would stay open until garbage collection
    if width * height > max_pixels:
        raise ImageTooLarge(name, f"{width}x{height} is larger than the {max_pixels:,}-pixel limit")
    if width < 1 or height < 1:
        raise ImageError(name, "image has no pixels")
    return img


def open_stored(data: bytes | Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Open and decode an image as stored (its mode, EXIF and format untouched), with the refusals
    and wording of every other decode here: for looking at a file's facts (the data check)."""
    return _load(_open(data, max_pixels=max_pixels, name=name), name)


def _load(img: Image.Image, name: str) -> Image.Image:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        img.close()
        raise ImageError(name, f"cannot decode image ({exc})") from None
    return img


def _decode(img: Image.Image, name: str) -> Image.Image:
    return to_rgb(_load(img, name))


def _draft(img: Image.Image, size: tuple[int, int]) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while keeping REDUCING_GAP x the target size."""
    height, width = size
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8):  # stored turned by 90 degrees
        height, width = width, height
    img.draft("RGB", (int(width * REDUCING_GAP), int(height * REDUCING_GAP)))


def to_rgb(img: Image.Image) -> Image.Image:
    # In place and no RGB-to-RGB convert: each copy of a full-size image is another copy in memory.
    ImageOps.exif_transpose(img, in_place=True)
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
    return img if img.mode == "RGB" else img.convert("RGB")


def to_array(img: Image.Image | np.ndarray, size: tuple[int, int] | None,
             interpolation: str = DEFAULT_INTERPOLATION) -> np.ndarray:
    """RGB image → uint8 array (H, W, 3), resized to size=(height, width) if given; an array
    load_array already made at that size passes through."""
    if isinstance(img, np.ndarray):
        if size is not None and img.shape[:2] != tuple(size):
            raise ValueError(f"array of shape {img.shape} is not of size {tuple(size)}")
        return img
    if size is not None and (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), INTERPOLATIONS[interpolation], reducing_gap=REDUCING_GAP)
    return np.asarray(img, dtype=np.uint8)


def is_image_path(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
