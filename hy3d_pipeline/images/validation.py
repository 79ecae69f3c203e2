"""Decide whether an uploaded file is an image we can turn into a 3D model, and normalise it for the generators.

Anything can land in the bucket: GIFs, PDFs, half-uploaded JPEGs, a 20000x20000 PNG that would exhaust memory on
decode. Refusing those here, with a message that names the input and the problem, keeps the generators simple:
they only ever see an RGBA 8-bit image, upright, with a foreground mask. The format is recognised by content,
never by extension, because keys are named by people.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hy3d_pipeline.images.formats import IMAGE_EXTENSIONS, has_image_extension
from hy3d_pipeline.images.foreground import find_foreground
from hy3d_pipeline.images.prepared import ImageRejected, PreparedImage
from hy3d_pipeline.settings import current

__all__ = [
    "IMAGE_EXTENSIONS", "ImageRejected", "has_image_extension", "prepare_image", "to_rgba8", "verify_image",
]
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")
# Pillow calls multi-picture JPEGs (most phone cameras) MPO; they are JPEGs to everyone else
_FORMAT_ALIASES = {"MPO": "JPEG"}
DEFAULT_MAX_SIDE = 1024




def resolve_max_pixels(max_pixels: int | None = None) -> int:
    """The decompression-bomb limit: the explicit argument, else HY3D_MAX_IMAGE_PIXELS."""
    return int(max_pixels) if max_pixels is not None else current().max_image_pixels


def verify_image(path: str | os.PathLike, name: str, *, max_pixels: int | None = None) -> dict[str, Any]:
    """Check that `path` holds a whole JPEG/PNG/BMP/TIFF/WEBP within the pixel limit; raise ImageRejected if not."""
    with _open_decoded(path, name, max_pixels) as image:
        return _facts(image)


def prepare_image(
    path: str | os.PathLike,
    name: str,
    *,
    max_pixels: int | None = None,
    max_side: int | None = DEFAULT_MAX_SIDE,
) -> PreparedImage:
    """Verify, orient, convert to RGBA 8-bit, shrink to `max_side` and find the foreground."""
    with _open_decoded(path, name, max_pixels) as decoded:
        rgba = to_rgba8(_upright(decoded))
    if max_side and max(rgba.size) > max_side:
        scale = max_side / max(rgba.size)
        size = (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale)))
        rgba = rgba.resize(size, Image.Resampling.LANCZOS)

    rgba, mask, method = find_foreground(rgba, name)
    return PreparedImage(name=name, rgba=rgba, mask=mask, foreground_method=method)



def to_rgba8(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGBA 8-bit. Deep grey and float images are rescaled, where Pillow would clip them."""
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_8bit(np.asarray(image), mode), "L").convert("RGBA")
    if mode == "La":  # Pillow has no direct La -> RGBA path
        image = image.convert("LA")
    return image.convert("RGBA")


def _scale_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode.startswith("I;16"):
        top, bottom = 65535.0, 0.0
    elif mode == "I" and values.size and values.min() >= 0 and values.max() <= 65535:
        top, bottom = 65535.0, 0.0  # a 16-bit PNG/TIFF that Pillow widened to 32-bit
    elif mode == "F" and values.size and values.min() >= 0 and values.max() <= 1:
        top, bottom = 1.0, 0.0
    else:  # arbitrary range: stretch what is there
        finite = values[np.isfinite(values)]
        bottom = float(finite.min()) if finite.size else 0.0
        top = float(finite.max()) if finite.size else 1.0
        top = top if top > bottom else bottom + 1.0
    scaled = (np.nan_to_num(values, nan=bottom) - bottom) * (255.0 / (top - bottom))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001
        # unreadable EXIF should not cost the whole image; it is shown as stored
        return image


# catch_warnings swaps process-wide state; images are verified from several prefetch threads at once, and
# without this lock two overlapping swaps can leave our "error" filter installed for the whole process
_warnings_lock = threading.Lock()


def _open_decoded(path: str | os.PathLike, name: str, max_pixels: int | None) -> Image.Image:
    limit = resolve_max_pixels(max_pixels)
    if os.path.getsize(path) == 0:
        raise ImageRejected(name, "empty file, not an image")
    image = _open_header(path, name, limit)
    try:
        fmt = _FORMAT_ALIASES.get(image.format or "", image.format or "unknown")
        if fmt not in ACCEPTED_FORMATS:
            raise ImageRejected(name, f"{fmt} images are not accepted; use one of {', '.join(ACCEPTED_FORMATS)}")
        width, height = image.size
        if width * height > limit:  # from the header alone: the pixels are never decoded
            raise ImageRejected(
                name,
                f"decompression bomb refused: {width}x{height} = {width * height} pixels exceeds the limit "
                f"of {limit} (HY3D_MAX_IMAGE_PIXELS)",
            )
        try:
            image.load()  # every pixel, so a cut-off upload fails here and not inside a generator
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(name, f"truncated or corrupt {fmt} image: {exc}") from None
    except BaseException:
        image.close()
        raise
    image.format = fmt  # callers report the canonical name (JPEG, not MPO)
    return image


def _open_header(path: str | os.PathLike, name: str, limit: int) -> Image.Image:
    """Image.open reads only the header; Pillow's own bomb check fires here, so its warning is made an error
    unless the configured limit deliberately goes above Pillow's."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    with _warnings_lock, warnings.catch_warnings():
        action = "error" if pillow_limit and limit <= pillow_limit else "ignore"
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except UnidentifiedImageError:
            damaged = _accepted_signature(path)
            if damaged:
                raise ImageRejected(name, f"truncated or corrupt {damaged} image: its header cannot be read") from None
            raise ImageRejected(name, f"not a supported image: content looks like {_sniff(path)}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(name, f"decompression bomb refused: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageRejected(name, f"truncated or corrupt image header: {exc}") from None


def _facts(image: Image.Image) -> dict[str, Any]:
    return {"format": image.format, "width": image.width, "height": image.height, "mode": image.mode}


def _accepted_signature(path: str | os.PathLike) -> str | None:
    """The accepted format a file claims by its magic bytes, when Pillow could not even read its header."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    signatures = {
        b"\x89PNG\r\n\x1a\n": "PNG",
        b"\xff\xd8\xff": "JPEG",
        b"II*\x00": "TIFF",
        b"MM\x00*": "TIFF",
        b"BM": "BMP",
    }
    for magic, fmt in signatures.items():
        if head.startswith(magic):
            return fmt
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _sniff(path: str | os.PathLike) -> str:
    """A human name for content Pillow does not recognise, for the refusal message."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypavif"):
        return "a HEIF/AVIF image"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<svg", b"<?xml")):
        return "SVG/XML text"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognised binary data"
    if all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "plain text"
    return "unrecognised binary data"
