"""The Hunyuan3D backend, loaded through hy3dgen's real `from_pretrained` from a tiny checkpoint on disk.

The tiny checkpoint (see tiny_hunyuan.py) has the published config structure and a hand-set geometry decoder
that yields a smooth closed blob, so everything here runs on CPU in seconds: octree resolution 64, 3 steps.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys

import numpy as np
import pytest

from hy3d_pipeline.images.prepared import ImageRejected
from PIL import Image, ImageDraw

from hy3d_pipeline.models.generators import base
from hy3d_pipeline.models.generators.base import GenerationError, GenerationSettings, PreparedImage
from hy3d_pipeline_tests.tiny_hunyuan import build_empty_surface_model, build_tiny_model

TINY = "tiny/Hunyuan3D-tiny"
EMPTY = "tiny/Hunyuan3D-empty"
SUBFOLDER = "hunyuan3d-dit-v2-0"
RED = (220, 20, 20)
BLUE = (20, 20, 220)


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hy3dgen-models")
    build_tiny_model(root, TINY, SUBFOLDER)
    build_empty_surface_model(root, EMPTY, SUBFOLDER)
    return root


@pytest.fixture
def models(models_root, monkeypatch):
    monkeypatch.setenv("HY3DGEN_MODELS", str(models_root))
    # a fresh load_generator cache per test, so load counts are this test's own
    monkeypatch.setattr(base, "_cache", {})
    monkeypatch.setattr(base, "load_count", {})
    return models_root


@pytest.fixture(scope="module")
def hy():
    from hy3d_pipeline.models.generators import hunyuan3d

    return hunyuan3d


def settings(**overrides) -> GenerationSettings:
    values = dict(
        generator="hunyuan3d",
        model_path=TINY,
        model_subfolder=SUBFOLDER,
        device="auto",
        steps=3,
        octree_resolution=64,
        num_chunks=20000,
        max_faces=40000,
    )
    values.update(overrides)
    return GenerationSettings(**values)


def two_tone_image(name: str = "s3://inputs/two-tone.png", size: int = 96) -> PreparedImage:
    """A disc, red on its left half and blue on its right, on a transparent background."""
    rgba = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(rgba)
    box = (12, 12, size - 12, size - 12)
    draw.pieslice(box, 90, 270, fill=RED + (255,))  # PIL angles run clockwise from 3 o'clock: left half
    draw.pieslice(box, 270, 90, fill=BLUE + (255,))
    mask = np.asarray(rgba)[..., 3] > 0
    return PreparedImage(name=name, rgba=rgba, mask=mask, foreground_method="alpha")


def test_generates_a_watertight_mesh(models, hy):
    gen = hy.build(settings())
    mesh = gen.generate(two_tone_image(), seed=1)
    assert len(mesh.faces) > 100
    assert mesh.is_watertight
    assert mesh.volume > 0  # outward normals
    assert mesh.metadata["octree_resolution"] == 64
    described = gen.describe()
    assert described["backend"] == "hunyuan3d"
    assert (described["model_path"], described["model_subfolder"]) == (TINY, SUBFOLDER)
    assert (described["device"], described["dtype"], described["flashvdm"]) == ("cpu", "float32", False)
    assert described["weights"].endswith("model.fp16.safetensors")
    assert described["load_seconds"] >= 0


def test_same_seed_same_vertices(models, hy):
    gen = hy.build(settings())
    image = two_tone_image()
    first = gen.generate(image, seed=7)
    again = gen.generate(image, seed=7)
    other = gen.generate(image, seed=8)  # may differ; it must still be a valid mesh
    assert np.array_equal(first.vertices, again.vertices)
    assert np.array_equal(first.faces, again.faces)
    assert other.is_watertight


def test_two_images_share_one_load(models):
    s = settings()
    meshes = [
        base.load_generator(s).generate(two_tone_image(f"s3://inputs/{n}.png"), seed=s.seed_for(n)) for n in ("a", "b")
    ]
    # texture mode is applied after generation, so it must not force a reload either
    base.load_generator(dataclasses.replace(s, texture="projected"))
    assert base.load_count == {"hunyuan3d": 1}
    assert all(len(m.faces) > 0 for m in meshes)


def test_no_surface_is_a_clear_error(models, hy):
    gen = hy.build(settings(model_path=EMPTY))
    with pytest.raises(GenerationError, match="marching cubes found no surface") as info:
        gen.generate(two_tone_image("s3://inputs/blank.png"), seed=1)
    assert "s3://inputs/blank.png" in str(info.value)


def test_missing_weights_folder_names_the_path(models, hy):
    with pytest.raises(GenerationError) as info:
        hy.build(settings(model_path="tencent/Not-Here"))
    message = str(info.value)
    assert str(models / "tencent/Not-Here" / SUBFOLDER) in message
    assert "hy3d-pipeline fetch-weights" in message and "HY3DGEN_MODELS" in message


def test_folder_without_weights_names_the_folder(models, hy):
    folder = models / "tiny/No-Weights" / SUBFOLDER
    folder.mkdir(parents=True)
    shutil.copy(models / TINY / SUBFOLDER / "config.yaml", folder / "config.yaml")
    with pytest.raises(GenerationError, match="has no weights") as info:
        hy.build(settings(model_path="tiny/No-Weights"))
    assert str(folder) in str(info.value)


def test_corrupt_safetensors_names_the_file(models, hy):
    folder = models / "tiny/Corrupt-Weights" / SUBFOLDER
    shutil.copytree(models / TINY / SUBFOLDER, folder)
    (folder / "model.fp16.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(GenerationError) as info:
        hy.build(settings(model_path="tiny/Corrupt-Weights"))
    assert str(folder / "model.fp16.safetensors") in str(info.value)


def test_corrupt_config_names_the_file(models, hy):
    folder = models / "tiny/Corrupt-Config" / SUBFOLDER
    shutil.copytree(models / TINY / SUBFOLDER, folder)
    (folder / "config.yaml").write_text("model: [unclosed\n  target: {")
    with pytest.raises(GenerationError) as info:
        hy.build(settings(model_path="tiny/Corrupt-Config"))
    assert str(folder / "config.yaml") in str(info.value)


def test_cuda_device_without_cuda_is_refused(models, hy):
    with pytest.raises(GenerationError, match="CUDA is not available"):
        hy.build(settings(device="cuda"))


def test_paint_on_cpu_names_what_is_missing(models, hy):
    with pytest.raises(GenerationError) as info:
        hy.build(settings(texture="paint"))
    message = str(info.value)
    assert "CUDA" in message and "custom_rasterizer" in message
    assert str(models / TINY / "hunyuan3d-paint-v2-0") in message

    # a generator loaded for another texture mode refuses paint per call, before spending time on the shape
    gen = hy.build(settings())
    with pytest.raises(GenerationError, match="custom_rasterizer") as info:
        gen.generate(two_tone_image("s3://inputs/paint.png"), seed=1, texture="paint")
    assert "s3://inputs/paint.png" in str(info.value)


def test_projected_texture_uses_the_image_colours_on_the_front(models, hy):
    gen = hy.build(settings(texture="projected"))
    mesh = gen.generate(two_tone_image(), seed=3)
    colors = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)
    normals = np.asarray(mesh.vertex_normals)
    x = mesh.vertices[:, 0]
    centre, span = (x.max() + x.min()) / 2, x.max() - x.min()
    front = normals[:, 2] > 0.5
    left = front & (x < centre - 0.15 * span)
    right = front & (x > centre + 0.15 * span)
    assert left.sum() > 20 and right.sum() > 20
    assert (colors[left] == RED).all(axis=1).mean() > 0.9
    assert (colors[right] == BLUE).all(axis=1).mean() > 0.9
    # the back cannot be seen in the image: it gets the mean foreground colour (purple here)
    back = colors[normals[:, 2] < -0.5]
    assert len(back) > 20
    mean = np.array(RED) / 2 + np.array(BLUE) / 2
    assert np.abs(back - mean).max() <= 3


def test_face_budget_is_applied(models, hy):
    gen = hy.build(settings(max_faces=2000))
    mesh = gen.generate(two_tone_image(), seed=1)
    assert 0 < len(mesh.faces) <= 2000
    assert mesh.is_watertight


def test_flashvdm_decoder(models, hy):
    gen = hy.build(settings(flashvdm=True))
    assert gen.describe()["flashvdm"] is True
    mesh = gen.generate(two_tone_image(), seed=1)
    assert len(mesh.faces) > 100 and mesh.is_watertight


def test_flashvdm_without_local_turbo_vae_names_the_path(models, hy):
    # hy3dgen's enable_flashvdm swaps in tencent/Hunyuan3D-2's turbo VAE for a model named Hunyuan3D-2 and would
    # download it when missing; the backend must refuse instead
    shutil.copytree(models / TINY / SUBFOLDER, models / "tencent/Hunyuan3D-2" / SUBFOLDER)
    with pytest.raises(GenerationError) as info:
        hy.build(settings(model_path="tencent/Hunyuan3D-2", flashvdm=True))
    assert str(models / "tencent/Hunyuan3D-2/hunyuan3d-vae-v2-0-turbo/model.fp16.safetensors") in str(info.value)


def test_rembg_without_model_file_names_the_file(tmp_path, monkeypatch):
    from hy3d_pipeline.images.foreground import remove_background

    missing = tmp_path / "models" / "u2net.onnx"
    monkeypatch.setenv("HY3D_REMBG_MODEL", str(missing))
    rembg_was_imported = "rembg" in sys.modules
    photo = Image.new("RGBA", (32, 32), (10, 200, 30, 255))
    with pytest.raises(ImageRejected) as info:
        remove_background(photo, "s3://inputs/photo.jpg")
    message = str(info.value)
    assert str(missing) in message and "HY3D_REMBG_MODEL" in message and "s3://inputs/photo.jpg" in message
    assert "hy3d-pipeline fetch-weights" in message and message.count("no alpha channel") == 1
    # the ~30 s rembg import is only paid when there is a model to run
    assert ("rembg" in sys.modules) == rembg_was_imported


def test_oom_retry_resolution(hy):
    assert hy.retry_octree_resolution(512) == 256
    assert hy.retry_octree_resolution(256) == 128
    assert hy.retry_octree_resolution(200) == 128
    assert hy.retry_octree_resolution(128) is None
    assert hy.retry_octree_resolution(64) is None


class OomOnce:
    """Stands in for the pipeline's __call__: raises CUDA OOM on the first `fail` calls, then runs the real one.

    This is a mock: no GPU exists on the test machine, so a real CUDA out-of-memory cannot happen here.
    """

    def __init__(self, real, fail: int = 1):
        self.real, self.fail, self.resolutions = real, fail, []

    def __call__(self, **kwargs):
        import torch

        self.resolutions.append(kwargs["octree_resolution"])
        if len(self.resolutions) <= self.fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (mocked)")
        return self.real(**kwargs)


def test_cuda_oom_retries_once_at_a_lower_resolution(models, hy, monkeypatch):
    import torch

    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    gen = hy.build(settings(octree_resolution=256))
    gen.pipeline = fake = OomOnce(gen.pipeline, fail=1)
    mesh = gen.generate(two_tone_image(), seed=1)
    assert fake.resolutions == [256, 128]
    assert mesh.metadata["octree_resolution"] == 128
    assert mesh.is_watertight
    assert emptied


def test_cuda_oom_twice_is_an_error_and_the_generator_stays_usable(models, hy, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    gen = hy.build(settings(octree_resolution=256))
    real = gen.pipeline
    gen.pipeline = fake = OomOnce(real, fail=2)
    with pytest.raises(GenerationError, match="out of memory at octree resolution 256 and again at 128") as info:
        gen.generate(two_tone_image("s3://inputs/huge.png"), seed=1)
    assert "s3://inputs/huge.png" in str(info.value)
    assert fake.resolutions == [256, 128]

    # the same instance serves the next image (at 64 here only to keep the CPU test fast)
    gen.pipeline = real
    gen.settings = dataclasses.replace(gen.settings, octree_resolution=64)
    assert len(gen.generate(two_tone_image(), seed=2).faces) > 0
