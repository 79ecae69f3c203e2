"""Thumbnails: the CPU render of a model, the inline previews in Dagster metadata, and the PNG next to the model
in S3 (which the sensor must never take for a new image)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw

from hy3d_pipeline.models.export import export_model
from hy3d_pipeline.models.generators.base import GenerationSettings, PreparedImage
from hy3d_pipeline.models.generators.extrude import build
from hy3d_pipeline.models.thumbnails import (
    INLINE_MARKDOWN_LIMIT,
    THUMBNAIL_SIZE,
    decode_inline,
    inline_markdown,
    png_bytes,
    render_mesh,
    thumbnail_key,
)
from hy3d_pipeline_tests.conftest import png_bytes as drawn_png
from hy3d_pipeline_tests.test_pipeline import latest_metadata, run_sensor_once

RED, BLUE = (220, 30, 30), (30, 40, 220)


def two_tone(size=128) -> PreparedImage:
    """A disc, red on the left half and blue on the right."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = (10, 10, size - 10, size - 10)
    draw.pieslice(box, 90, 270, fill=RED + (255,))
    draw.pieslice(box, 270, 90, fill=BLUE + (255,))
    return PreparedImage(name="two-tone", rgba=image, mask=np.asarray(image)[..., 3] > 0, foreground_method="alpha")


@pytest.fixture(scope="module")
def textured():
    return build(GenerationSettings(generator="extrude")).generate(two_tone(), seed=0)


def covered(image: Image.Image) -> np.ndarray:
    rgba = np.asarray(image)
    return rgba[rgba[..., 3] == 255][:, :3].astype(int)


def share(pixels: np.ndarray, colour, tolerance=90) -> float:
    """Fraction of pixels of roughly this hue (shading scales brightness, so compare directions too)."""
    target = np.asarray(colour, dtype=float)
    norms = np.linalg.norm(pixels, axis=1) * np.linalg.norm(target)
    cosine = pixels @ target / np.maximum(norms, 1e-9)
    return float(((cosine > 0.97) & (np.abs(pixels - target).max(axis=1) < tolerance + 60)).mean())


def test_render_is_a_valid_png_that_is_not_blank(textured):
    data = png_bytes(render_mesh(textured))
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE) and image.mode == "RGBA"
    alpha = np.asarray(image)[..., 3]
    assert 0.15 < (alpha > 0).mean() < 0.9  # the model fills the frame, with a margin
    assert np.asarray(image)[..., :3][alpha == 255].std() > 20  # shaded and coloured, not one flat colour


def test_render_shows_the_texture(textured):
    pixels = covered(render_mesh(textured))
    assert share(pixels, RED) > 0.15 and share(pixels, BLUE) > 0.15
    # seen from the front-right: the picture's left half (red) is on the left of the render
    image = np.asarray(render_mesh(textured))
    opaque = image[..., 3] == 255
    columns = np.nonzero(opaque.any(axis=0))[0]
    middle = (columns.min() + columns.max()) // 2
    left, right = image[:, :middle][opaque[:, :middle]][:, :3], image[:, middle:][opaque[:, middle:]][:, :3]
    assert left[:, 0].mean() > left[:, 2].mean() and right[:, 2].mean() > right[:, 0].mean()


def test_texture_survives_a_glb_round_trip(textured):
    data = export_model(textured, "glb", "m")[0][1]
    loaded = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")
    pixels = covered(render_mesh(loaded))
    assert share(pixels, RED) > 0.15 and share(pixels, BLUE) > 0.15


def test_vertex_colours_and_plain_meshes():
    box = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=np.tile([30, 200, 60, 255], (len(box.vertices), 1)))
    assert share(covered(render_mesh(box)), (30, 200, 60)) > 0.9
    plain = trimesh.creation.box(extents=(1.0, 0.6, 0.4))
    pixels = covered(render_mesh(plain))
    assert len(pixels) > 0.1 * THUMBNAIL_SIZE ** 2
    # three faces of the box are seen, each lit differently: that is what makes it read as a solid
    assert len(np.unique(pixels.sum(axis=1) // 30)) >= 3


def test_empty_and_broken_meshes_still_give_a_picture():
    empty = render_mesh(trimesh.Trimesh())
    assert empty.size == (THUMBNAIL_SIZE, THUMBNAIL_SIZE) and not np.asarray(empty)[..., 3].any()
    box = trimesh.creation.box()
    vertices = np.array(box.vertices)
    vertices[0] = np.nan
    broken = render_mesh(trimesh.Trimesh(vertices, box.faces, process=False))
    assert np.asarray(broken)[..., 3].any()  # the faces that are still whole are drawn


def test_inline_markdown_fits_the_ui_limit_and_holds_the_picture(textured):
    picture = render_mesh(textured)
    text = inline_markdown(picture, "model [x](y)")
    assert len(text) < INLINE_MARKDOWN_LIMIT
    assert text.startswith("![model xy](data:image/webp;base64,")
    small = decode_inline(text)
    assert small is not None and max(small.size) >= 64
    assert share(covered(small.convert("RGBA")), RED, tolerance=110) > 0.05


def test_pipeline_uploads_thumbnails_and_shows_previews(instance, storage, s3):
    bucket = storage.images_bucket
    s3.put_object(Bucket=bucket, Key="t/disc.png", Body=drawn_png((120, 120)))
    runs, failures = run_sensor_once(instance)
    assert (runs, failures) == (1, {})
    model_key = "models/t/disc.png.glb"
    head = s3.head_object(Bucket=bucket, Key=thumbnail_key(model_key))
    assert head["ContentType"] == "image/png"
    body = s3.get_object(Bucket=bucket, Key=thumbnail_key(model_key))["Body"].read()
    thumb = Image.open(io.BytesIO(body))
    assert thumb.format == "PNG" and np.asarray(thumb.convert("RGBA"))[..., 3].any()
    assert share(covered(thumb.convert("RGBA")), (200, 60, 40)) > 0.5  # the drawn disc's colour

    meta = latest_metadata(instance, "models_3d", "t/disc.png")
    assert list(meta)[:2] == ["thumbnail", "input"]  # first in the UI
    for name in ("thumbnail", "input"):
        assert len(meta[name]) < INLINE_MARKDOWN_LIMIT and decode_inline(meta[name]) is not None
    assert meta["thumbnail_url"] == f"s3://{bucket}/{thumbnail_key(model_key)}"
    local = latest_metadata(instance, "local_images", "t/disc.png")
    assert decode_inline(local["thumbnail"]) is not None

    # the thumbnail sits under the models prefix: the next tick must not take it for a new image
    assert storage.is_model_key(bucket, thumbnail_key(model_key))
    runs, failures = run_sensor_once(instance)
    assert runs == 0 and set(instance.get_dynamic_partitions("images")) == {"t/disc.png"}
