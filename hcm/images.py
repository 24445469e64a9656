"""Decoding screening images safely: every image becomes 8-bit RGB, or a clear error.

Datasets come from users and scrapers: images may be truncated, decompression bombs, CMYK,
palette, 16-bit greyscale, carry alpha or an EXIF rotation, or be something else entirely.

- Only the formats in IMAGE_FORMATS are opened: PIL's other plugins include EPS, which runs
  Ghostscript on the file.
- Sizes are checked from the header, before any pixel is decoded (MAX_PIXELS, and PIL's own
  decompression-bomb limit turned into an error); then the whole image is decoded at once, so a
  truncated file fails in `load_image`, not later inside the image processor.
- Alpha (RGBA, LA, PA, and the tRNS colour key of P, L and RGB PNGs) is composited over white,
  the background of the paper's product images, rather than dropped (dropping it turns
  transparent areas black or the key colour).
- 16-bit greyscale is scaled to 8 bits (PIL's own conversion clips everything above 255 to white).
- The EXIF orientation is applied: annotators saw the image upright.

`hcm.data.records.load_sample` names the record and field of a bad image ("record train-000003 field
'candidates[2]': ..."), also when it is found in a DataLoader worker: torch re-raises the
worker's ImageError with that message. `probe_image` is the cheap header check that
`hcm.data.manifest.load_manifest(check_images=True)` runs on every image up front; it cannot
see a truncated pixel stream, which `load_image` still catches, naming the record.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000  # ~8000x8000; the model sees 448-px tiles, anything larger is suspect
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image that cannot be used, with the file (and, from load_sample, record and field).

    Constructed from one message, so that torch can re-raise it from a DataLoader worker.
    """


def _peak(a: np.ndarray, mode: str) -> float:
    """The value that maps to 255: the bit depth's maximum, guessed from the data for I and F."""
    if mode in _SIXTEEN_BIT:
        return 65535.0
    top = float(np.nanmax(a)) if a.size else 0.0
    if mode == "F" and top <= 1.0:
        return 1.0  # float images in [0, 1]
    for peak in (255.0, 65535.0):  # 8- or 16-bit data stored in a 32-bit mode
        if top <= peak:
            return peak
    return top


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency over white."""
    mode = image.mode
    if "transparency" in image.info and mode in ("P", "L", "RGB", "1"):
        image, mode = image.convert("RGBA"), "RGBA"  # the tRNS palette alpha or colour key
    if mode == "RGB":
        return image
    if mode in (*_SIXTEEN_BIT, "I", "F"):
        a = np.nan_to_num(np.asarray(image, dtype=np.float64))
        grey = np.clip(a / _peak(a, mode) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")  # CMYK, YCbCr, L, 1, P, ...
    except ValueError as e:  # LAB, HSV and other modes PIL cannot convert to RGB
        raise ImageError(f"unsupported image mode {mode} ({e})") from None


def _open(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """Open (header only) and check the size; the caller decodes and closes."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(source, formats=IMAGE_FORMATS)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"{w}x{h} image exceeds {max_pixels} pixels (decompression bomb?)")
    if w < 1 or h < 1:
        im.close()
        raise ImageError(f"empty {w}x{h} image")
    return im


def _reading(path: str | Path, action):
    """Run `action(path)`, turning every way PIL fails on bad bytes into an ImageError naming
    `path` (a file, or what an in-memory image is: "rwqa-0003 image 0")."""
    path = Path(path)
    try:
        return action(path)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: refused as a decompression bomb ({e})") from None
    except FileNotFoundError:
        raise ImageError(f"{path}: image file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a directory, not an image file") from None
    except Image.UnidentifiedImageError:
        raise ImageError(
            f"{path}: not an image in a supported format {IMAGE_FORMATS} (empty or corrupt?)"
        ) from None
    # PIL's errors for unreadable, truncated or inconsistent data
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def probe_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Check an image's header (format, size) without decoding it; returns (width, height)."""

    def probe(p: Path) -> tuple[int, int]:
        with _open(p, max_pixels) as im:
            return im.size

    return _reading(path, probe)


def _decode(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    with _open(source, max_pixels) as im:
        im.load()  # decode now: a truncated file fails here, not inside a training step
        if im.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            return to_rgb(ImageOps.exif_transpose(im))
        return to_rgb(im)


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open, fully decode and convert an image; raise ImageError naming the file otherwise."""
    return _reading(path, lambda p: _decode(p, max_pixels))


def decode_image(data: bytes, what: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`load_image` for an image held in memory (a benchmark's parquet cell), named `what`."""
    return _reading(what, lambda _: _decode(io.BytesIO(data), max_pixels))
