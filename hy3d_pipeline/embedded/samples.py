"""A few sample images the package draws itself, to seed an empty bucket for a demo or a test.

Drawing them (rather than shipping photos) keeps the wheel small and free of licensing questions, and each
one exercises a path the pipeline must handle: transparency, a hole, separate parts, a JPEG on a plain
background, a WEBP. Drawn at twice the size and reduced, so edges are anti-aliased like real cut-outs.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

_SUPERSAMPLE = 2


def sample_images() -> dict[str, bytes]:
    """{relative key: encoded bytes}; the same bytes on every call."""
    return {
        "samples/mug.png": _encode(_mug(), "PNG"),
        "samples/star.png": _encode(_star(), "PNG"),
        "samples/cherries.png": _encode(_cherries(), "PNG"),
        "samples/teapot.jpg": _encode(_teapot().convert("RGB"), "JPEG", quality=92),
        "samples/vase.webp": _encode(_vase().convert("RGB"), "WEBP", lossless=True),
    }


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _canvas(width: int, height: int, background=(0, 0, 0, 0)) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    image = Image.new("RGBA", (width * _SUPERSAMPLE, height * _SUPERSAMPLE), background)
    return image, ImageDraw.Draw(image), _SUPERSAMPLE


def _finish(image: Image.Image) -> Image.Image:
    return image.resize((image.width // _SUPERSAMPLE, image.height // _SUPERSAMPLE), Image.Resampling.LANCZOS)


def _mug() -> Image.Image:
    """A mug on transparency: the handle leaves a hole through the solid."""
    image, draw, s = _canvas(320, 288)
    body, handle = (40 * s, 40 * s, 210 * s, 250 * s), (160 * s, 90 * s, 290 * s, 200 * s)
    draw.ellipse(handle, fill=(30, 90, 170, 255))
    draw.ellipse((190 * s, 120 * s, 260 * s, 170 * s), fill=(0, 0, 0, 0))  # the hole in the handle
    draw.rounded_rectangle(body, radius=18 * s, fill=(40, 110, 200, 255))
    draw.rectangle((40 * s, 110 * s, 210 * s, 140 * s), fill=(245, 245, 240, 255))  # a painted band
    return _finish(image)


def _star() -> Image.Image:
    image, draw, s = _canvas(320, 320)
    centre, outer, inner = 160 * s, 150 * s, 62 * s
    points = []
    for i in range(10):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((centre + radius * math.cos(angle), centre + radius * math.sin(angle)))
    draw.polygon(points, fill=(250, 200, 30, 255))
    draw.ellipse((130 * s, 130 * s, 190 * s, 190 * s), fill=(235, 120, 20, 255))
    return _finish(image)


def _cherries() -> Image.Image:
    """Two cherries that do not touch: the model has two separate parts."""
    image, draw, s = _canvas(352, 288)
    for cx in (100, 250):
        draw.rectangle(((cx - 6) * s, 60 * s, (cx + 6) * s, 180 * s), fill=(60, 130, 40, 255))  # stem
        draw.ellipse(((cx - 70) * s, 150 * s, (cx + 70) * s, 275 * s), fill=(190, 20, 40, 255))
        draw.ellipse(((cx - 40) * s, 175 * s, (cx - 15) * s, 200 * s), fill=(250, 170, 170, 255))  # shine
        draw.ellipse(((cx - 10) * s, 30 * s, (cx + 50) * s, 70 * s), fill=(80, 160, 50, 255))  # leaf
    return _finish(image)


def _teapot() -> Image.Image:
    """A teapot on a white sheet, as a JPEG: no alpha, the background has to be recognised."""
    image, draw, s = _canvas(384, 288, (255, 255, 255, 255))
    brown, dark = (150, 80, 40, 255), (110, 55, 25, 255)
    draw.ellipse((250 * s, 95 * s, 350 * s, 215 * s), fill=dark)  # handle ring
    draw.ellipse((275 * s, 125 * s, 325 * s, 185 * s), fill=(255, 255, 255, 255))  # its hole
    draw.polygon([60 * s, 190 * s, 20 * s, 90 * s, 40 * s, 85 * s, 110 * s, 160 * s], fill=dark)  # spout
    draw.ellipse((80 * s, 90 * s, 290 * s, 260 * s), fill=brown)  # body
    draw.ellipse((145 * s, 65 * s, 225 * s, 105 * s), fill=dark)  # lid
    draw.ellipse((172 * s, 45 * s, 198 * s, 70 * s), fill=dark)  # knob
    return _finish(image)


def _vase() -> Image.Image:
    """A vase on a plain grey-blue backdrop, as a WEBP."""
    image, draw, s = _canvas(256, 320, (205, 215, 228, 255))
    draw.ellipse((58 * s, 120 * s, 198 * s, 290 * s), fill=(40, 140, 120, 255))  # belly
    draw.rectangle((98 * s, 40 * s, 158 * s, 180 * s), fill=(40, 140, 120, 255))  # neck
    draw.ellipse((84 * s, 28 * s, 172 * s, 56 * s), fill=(30, 110, 95, 255))  # lip
    draw.rectangle((58 * s, 200 * s, 198 * s, 215 * s), fill=(230, 200, 90, 255))  # a stripe
    return _finish(image)
