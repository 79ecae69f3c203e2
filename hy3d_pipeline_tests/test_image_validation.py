"""What `images.validation` accepts, what it refuses and how it normalises: fixtures are drawn into tmp_path."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hy3d_pipeline.images.validation import (
    IMAGE_EXTENSIONS,
    ImageRejected,
    has_image_extension,
    prepare_image,
    to_rgba8,
    verify_image,
)


def disc_on(background, size=(160, 120), colour=(200, 30, 30), mode="RGBA"):
    """A disc on `background`; with a transparent background it is an alpha cut-out."""
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).ellipse((40, 20, 120, 100), fill=colour if mode != "RGBA" else (*colour, 255))
    return image


def save(image, path, fmt=None, **options):
    image.save(path, format=fmt, **options)
    return path


@pytest.fixture
def cutout():
    return disc_on((0, 0, 0, 0))


@pytest.fixture
def on_white():
    return disc_on((255, 255, 255), mode="RGB")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_claiming(width, height):
    """A few hundred bytes of PNG whose header claims any dimensions: the pixels would never fit in memory."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def rejection(path, name="input", **kwargs):
    with pytest.raises(ImageRejected) as info:
        prepare_image(path, name, **kwargs)
    assert name in str(info.value)
    return str(info.value)


# --- extensions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a.jpg", "b/c.JPEG", "d.Png", "e.bmp", "f.TIF", "g.tiff", "h.webp"])
def test_image_extensions_are_case_insensitive(key):
    assert has_image_extension(key)


@pytest.mark.parametrize("key", ["a.gif", "b.pdf", "c.txt", "jpg", "d.jpg.zip"])
def test_other_extensions_are_not_images(key):
    assert not has_image_extension(key)
    assert ".jpg" in IMAGE_EXTENSIONS


# --- accepted by content ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, filename, options",
    [
        ("JPEG", "x.jpg", {"quality": 95}),
        ("PNG", "x.png", {}),
        ("BMP", "x.bmp", {}),
        ("TIFF", "x.tif", {}),
        ("WEBP", "x.webp", {"lossless": True}),
        ("PNG", "really_a_png.jpg", {}),  # the extension lies
        ("JPEG", "UPPER.JPG", {"quality": 95}),
        ("WEBP", "no_extension", {"lossless": True}),
    ],
)
def test_accepted_formats_are_recognised_by_content(tmp_path, on_white, fmt, filename, options):
    path = save(on_white, tmp_path / filename, fmt, **options)
    facts = verify_image(path, str(path))
    assert facts == {"format": fmt, "width": 160, "height": 120, "mode": "RGB"}
    prepared = prepare_image(path, str(path))
    assert prepared.rgba.mode == "RGBA" and prepared.rgba.size == (160, 120)
    assert prepared.foreground_method == "uniform-background"
    assert prepared.mask[60, 80] and not prepared.mask[5, 5]
    # the cut-out is in the alpha channel for later steps
    assert np.array_equal(np.asarray(prepared.rgba)[..., 3] > 127, prepared.mask)


def test_alpha_cutout_gives_alpha_mask(tmp_path, cutout):
    prepared = prepare_image(save(cutout, tmp_path / "c.png"), "c.png")
    assert prepared.foreground_method == "alpha"
    assert prepared.mask.sum() == (np.asarray(cutout)[..., 3] > 127).sum()


def test_nearly_opaque_alpha_is_not_a_cutout(tmp_path, on_white):
    image = on_white.convert("RGBA")
    image.putalpha(254)
    prepared = prepare_image(save(image, tmp_path / "a254.png"), "a254.png")
    assert prepared.foreground_method == "uniform-background"
    assert 0.2 < prepared.mask.mean() < 0.4


# --- refused ------------------------------------------------------------------------------------------------


def test_gif_is_refused_by_name(tmp_path, on_white):
    message = rejection(save(on_white, tmp_path / "anim.png", "GIF"), "s3://b/anim.png")
    assert "GIF" in message


def test_ico_and_pdf_are_refused(tmp_path, on_white):
    assert "ICO" in rejection(save(on_white, tmp_path / "i.png", "ICO"), "i.png")
    assert "PDF" in rejection(save(on_white, tmp_path / "p.png", "PDF"), "p.png")


def test_text_empty_and_random_bytes_are_refused(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "text" in rejection(tmp_path / "notes.jpg", "notes.jpg")
    assert "empty" in rejection(tmp_path / "empty.png", "empty.png")
    assert "unrecognised" in rejection(tmp_path / "noise.png", "noise.png")
    with pytest.raises(ImageRejected, match="empty.png"):
        verify_image(tmp_path / "empty.png", "empty.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    whole = save(noisy, tmp_path / f"whole.{fmt.lower()}", fmt).read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole[: len(whole) // 2])
    message = rejection(cut, "cut-upload")
    assert "truncated or corrupt" in message
    with pytest.raises(ImageRejected, match="truncated or corrupt"):
        verify_image(cut, "cut-upload")


@pytest.mark.parametrize(
    "width, height",
    [
        (9000, 8000),  # 72 MP: over our 64 MP default, under Pillow's own warning
        (10000, 10000),  # 100 MP: Pillow warns
        (100000, 100000),  # 10 GP: Pillow raises
    ],
)
def test_decompression_bombs_are_refused_from_the_header(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_claiming(width, height))
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may leak out as a warning either
        assert "decompression bomb" in rejection(path, "bomb.png")
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_pixel_limit_from_argument_and_environment(tmp_path, on_white, monkeypatch):
    path = save(on_white, tmp_path / "small.png")
    assert "19200 pixels exceeds the limit of 10000" in rejection(path, "small.png", max_pixels=10_000)
    monkeypatch.setenv("HY3D_MAX_IMAGE_PIXELS", "5000")
    with pytest.raises(ImageRejected, match="decompression bomb"):
        verify_image(path, "small.png")
    assert verify_image(path, "small.png", max_pixels=20_000)["width"] == 160


def test_pillow_bomb_warning_yields_to_a_deliberately_higher_limit(tmp_path, on_white, monkeypatch):
    # Pillow's thresholds are lowered so a small image sits between its warning (1x) and error (2x) levels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12_000)
    path = save(on_white, tmp_path / "w.png")  # 19200 pixels
    assert "decompression bomb" in rejection(path, "w.png", max_pixels=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert prepare_image(path, "w.png", max_pixels=50_000).rgba.size == (160, 120)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 9_000)  # now past Pillow's hard error
    assert "decompression bomb" in rejection(path, "w.png", max_pixels=50_000)


def test_png_cut_inside_its_header_is_called_truncated(tmp_path):
    path = tmp_path / "stub.png"
    path.write_bytes(png_header_claiming(100, 100)[:30])
    assert "truncated or corrupt PNG" in rejection(path, "stub.png")


def test_fully_transparent_png_has_no_foreground(tmp_path):
    path = save(Image.new("RGBA", (100, 100), (255, 0, 0, 0)), tmp_path / "clear.png")
    assert "no foreground" in rejection(path, "clear.png")


def test_uniform_image_has_no_foreground(tmp_path):
    path = save(Image.new("RGB", (100, 100), (40, 90, 200)), tmp_path / "flat.jpg", "JPEG")
    assert "no foreground" in rejection(path, "flat.jpg")


def test_busy_background_needs_background_removal(tmp_path):
    noise = np.random.default_rng(2).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    path = save(Image.fromarray(noise), tmp_path / "photo.png")
    message = rejection(path, "photo.png")
    assert "no plain background" in message and "HY3D_REMBG_MODEL" in message


# --- normalisation ------------------------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    # stored landscape 200x100 with a red block near the top-left; orientation 6 means "rotate 90 degrees
    # clockwise to display", which carries the block to the top-right
    stored = Image.new("RGB", (200, 100), (255, 255, 255))
    ImageDraw.Draw(stored).rectangle((10, 10, 59, 39), fill=(220, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(stored, tmp_path / "phone.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    assert verify_image(path, "phone.jpg")["width"] == 200  # verification reports the file as stored
    prepared = prepare_image(path, "phone.jpg")
    assert prepared.rgba.size == (100, 200)
    pixels = np.asarray(prepared.rgba)
    assert pixels[30, 75, 0] > 180 and pixels[30, 75, 1] < 60
    assert pixels[30, 25, 0] > 200 and pixels[30, 25, 1] > 200  # the top-left is background now
    assert prepared.mask[30, 75] and not prepared.mask[30, 25] and not prepared.mask[150, 50]


def test_cmyk_jpeg_and_tiff(tmp_path, on_white):
    for fmt, name in (("JPEG", "cmyk.jpg"), ("TIFF", "cmyk.tif")):
        path = save(on_white.convert("CMYK"), tmp_path / name, fmt)
        assert verify_image(path, name)["mode"] == "CMYK"
        prepared = prepare_image(path, name)
        red = np.asarray(prepared.rgba)[60, 80]
        assert red[0] > 150 and red[1] < 80 and red[3] == 255
        assert prepared.foreground_method == "uniform-background"


@pytest.mark.parametrize("fmt, dtype", [("PNG", "<u2"), ("TIFF", "<u2"), ("TIFF", ">u2")])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt, dtype):
    values = np.full((100, 100), 65535, dtype=np.uint16)
    values[30:70, 30:70] = 32768  # mid-grey object on a white background
    path = save(Image.fromarray(values.astype(dtype)), tmp_path / f"deep.{fmt.lower()}", fmt)
    assert verify_image(path, "deep")["mode"].startswith("I")
    prepared = prepare_image(path, "deep")
    pixels = np.asarray(prepared.rgba)
    assert abs(int(pixels[50, 50, 0]) - 128) <= 1  # clipping would give 255
    assert pixels[5, 5, 0] == 255
    assert prepared.mask[50, 50] and not prepared.mask[5, 5]


def test_float_and_32_bit_modes_are_scaled():
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgba8(floats))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgba8(wide))[0, :, 0].tolist() == [0, 128, 255]


def test_palette_with_and_without_transparency(tmp_path, on_white):
    opaque = save(on_white.convert("P", palette=Image.Palette.ADAPTIVE), tmp_path / "p.png")
    assert prepare_image(opaque, "p.png").foreground_method == "uniform-background"

    palette = Image.new("P", (120, 120), 0)
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    ImageDraw.Draw(palette).ellipse((20, 20, 100, 100), fill=1)
    path = save(palette, tmp_path / "pt.png", transparency=0)
    assert verify_image(path, "pt.png")["mode"] == "P"
    prepared = prepare_image(path, "pt.png")
    assert prepared.foreground_method == "alpha"
    assert prepared.mask[60, 60] and not prepared.mask[2, 2]
    assert tuple(np.asarray(prepared.rgba)[60, 60]) == (200, 30, 30, 255)


@pytest.mark.parametrize("mode, method", [("L", "uniform-background"), ("LA", "alpha"), ("1", "uniform-background")])
def test_grayscale_modes(tmp_path, cutout, on_white, mode, method):
    source = cutout if mode == "LA" else on_white
    converted = source.convert(mode, dither=Image.Dither.NONE) if mode == "1" else source.convert(mode)
    path = save(converted, tmp_path / f"{mode}.png")
    assert verify_image(path, "g")["mode"] == mode
    prepared = prepare_image(path, "g")
    assert prepared.rgba.mode == "RGBA" and prepared.foreground_method == method
    assert prepared.mask[60, 80] and not prepared.mask[3, 3]


def test_premultiplied_modes_become_rgba(cutout):
    for mode in ("RGBa", "La"):
        image = to_rgba8(cutout.convert(mode) if mode == "RGBa" else cutout.convert("LA").convert("La"))
        assert image.mode == "RGBA"
        assert np.asarray(image)[60, 80, 3] == 255 and np.asarray(image)[2, 2, 3] == 0


def test_large_images_are_reduced_for_generation(tmp_path):
    big = disc_on((255, 255, 255), size=(1600, 400), mode="RGB")
    path = save(big, tmp_path / "wide.png")
    assert prepare_image(path, "wide.png").rgba.size == (1024, 256)
    assert prepare_image(path, "wide.png", max_side=400).rgba.size == (400, 100)
    assert prepare_image(path, "wide.png", max_side=None).rgba.size == (1600, 400)
