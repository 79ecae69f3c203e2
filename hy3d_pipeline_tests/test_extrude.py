"""The CPU `extrude` backend and mesh export: closed solids that look like the picture from the front."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import shapely
import trimesh
from PIL import Image, ImageDraw

from hy3d_pipeline.embedded.samples import sample_images
from hy3d_pipeline.images.validation import prepare_image
from hy3d_pipeline.models.export import crop_to_content, export_model, front_silhouette, mask_iou, mesh_stats
from hy3d_pipeline.models.generators.base import (
    GenerationError,
    GenerationSettings,
    PreparedImage,
    load_generator,
)
from hy3d_pipeline.models.generators.extrude import DEPTH, ExtrudeGenerator, build

SAMPLES = sample_images()


@pytest.fixture(scope="module")
def generator():
    return build(GenerationSettings(generator="extrude"))


@pytest.fixture(scope="module")
def prepared_samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    prepared = {}
    for key, data in SAMPLES.items():
        path = folder / key.replace("/", "_")
        path.write_bytes(data)
        prepared[key] = prepare_image(path, key)
    return prepared


def from_mask(mask: np.ndarray, name: str = "drawn") -> PreparedImage:
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[mask] = (90, 160, 220, 255)
    return PreparedImage(name=name, rgba=Image.fromarray(rgba, "RGBA"), mask=mask, foreground_method="alpha")


def ring_mask(size=300) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse((30, 30, size - 30, size - 30), fill=255)
    draw.ellipse((110, 110, size - 110, size - 110), fill=0)
    return np.asarray(canvas) > 127


def glb_round_trip(mesh) -> trimesh.Trimesh:
    (_, data), = export_model(mesh, "glb", "model")
    return trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")


def assert_closed_solid(mesh: trimesh.Trimesh) -> None:
    """Closed as loaded, and still closed once every coincident position is one vertex (what a slicer or a
    stricter loader does): parts touching at a point would only show up then."""
    assert mesh.is_watertight and mesh.is_volume
    welded = mesh.copy()
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    assert welded.is_watertight and welded.is_volume


def front_iou(mesh, mask) -> float:
    target = crop_to_content(mask)
    return mask_iou(target, front_silhouette(mesh, target.shape))


# --- shape ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_samples_become_closed_solids_that_match_the_picture(generator, prepared_samples, key):
    image = prepared_samples[key]
    mesh = generator.generate(image, seed=1)
    loaded = glb_round_trip(mesh)
    assert_closed_solid(loaded)
    assert len(loaded.faces) == len(mesh.faces)
    iou = front_iou(loaded, image.mask)
    assert iou >= 0.9, f"{key}: front silhouette IoU {iou:.3f}"


def test_samples_are_small_and_deterministic():
    assert 4 <= len(SAMPLES) <= 6
    assert sample_images() == SAMPLES
    for key, data in SAMPLES.items():
        with Image.open(io.BytesIO(data)) as image:
            assert 256 <= max(image.size) <= 384, key


def test_hole_is_kept(generator):
    mask = ring_mask()
    mesh = generator.generate(from_mask(mask, "ring.png"), seed=0)
    loaded = glb_round_trip(mesh)
    assert_closed_solid(loaded)
    assert loaded.euler_number == 0  # a torus-like solid: genus one
    assert front_iou(loaded, mask) >= 0.9
    assert not front_silhouette(loaded, (64, 64))[32, 32]


def test_earcut_fallback_for_shapely_without_constrained_delaunay(generator, monkeypatch):
    monkeypatch.delattr(shapely, "constrained_delaunay_triangles")
    assert_closed_solid(generator.generate(from_mask(ring_mask(), "ring.png"), seed=0))


def test_separate_parts_are_separate_bodies(generator, prepared_samples):
    mesh = generator.generate(prepared_samples["samples/cherries.png"], seed=0)
    assert len(mesh.split(only_watertight=True)) == 2


def test_parts_touching_at_a_corner_stay_manifold(generator):
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:32, 10:32] = True
    mask[32:54, 32:54] = True  # meets the first square at one point only
    assert_closed_solid(glb_round_trip(generator.generate(from_mask(mask, "corners.png"), seed=0)))


def test_orientation_and_size(generator):
    # quadrants: red top-left, green top-right, blue bottom-left, yellow bottom-right, on a wide canvas
    rgba = np.zeros((100, 200, 4), dtype=np.uint8)
    rgba[10:50, 20:100] = (255, 0, 0, 255)
    rgba[10:50, 100:180] = (0, 255, 0, 255)
    rgba[50:90, 20:100] = (0, 0, 255, 255)
    rgba[50:90, 100:180] = (255, 255, 0, 255)
    image = PreparedImage("quadrants.png", Image.fromarray(rgba, "RGBA"), rgba[..., 3] > 0, "alpha")
    mesh = glb_round_trip(generator.generate(image, seed=0))

    extents = mesh.extents
    assert extents[0] == pytest.approx(1.0, abs=1e-6) and extents[1] == pytest.approx(0.5, abs=0.02)
    assert extents[2] == pytest.approx(DEPTH, abs=1e-6)
    assert np.allclose(mesh.bounds.mean(axis=0), 0, atol=1e-6)
    front = mesh.face_normals[:, 2] > 0.99
    assert np.allclose(mesh.triangles_center[front][:, 2], DEPTH / 2)  # the +Z cap faces the viewer

    colours = mesh.visual.to_color().vertex_colors[:, :3].astype(int)
    x, y = mesh.vertices[:, 0], mesh.vertices[:, 1]
    expected = {(-1, 1): (255, 0, 0), (1, 1): (0, 255, 0), (-1, -1): (0, 0, 255), (1, -1): (255, 255, 0)}
    for (sx, sy), colour in expected.items():
        corner = np.argmax(sx * x + sy * y)  # the vertex furthest into that quadrant
        assert tuple(colours[corner]) == colour, (sx, sy)


def test_deterministic(generator, prepared_samples):
    image = prepared_samples["samples/teapot.jpg"]
    first = generator.generate(image, seed=1)
    second = build(GenerationSettings(generator="extrude")).generate(image, seed=2)
    assert np.array_equal(first.vertices, second.vertices)
    assert np.array_equal(first.faces, second.faces)
    assert export_model(first, "glb", "m") == export_model(second, "glb", "m")


@pytest.mark.parametrize("mask", [np.zeros((80, 80), bool), np.pad(np.ones((1, 1), bool), 300)])
def test_no_outline_raises_naming_the_image(generator, mask):
    with pytest.raises(GenerationError, match="s3://images/empty.png"):
        generator.generate(from_mask(mask, "s3://images/empty.png"), seed=0)


def test_loaded_through_the_interface():
    generator = load_generator(GenerationSettings(generator="extrude"))
    assert isinstance(generator, ExtrudeGenerator)
    assert generator.describe() == {"backend": "extrude"}
    assert load_generator(GenerationSettings(generator="extrude", output_format="obj")) is generator


# --- export -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mug(generator, prepared_samples):
    return generator.generate(prepared_samples["samples/mug.png"], seed=0)


def test_glb_embeds_the_texture(mug):
    loaded = glb_round_trip(mug)
    texture = loaded.visual.material.baseColorTexture
    assert isinstance(texture, Image.Image) and texture.size == (320, 288)
    assert loaded.visual.uv.shape == (len(loaded.vertices), 2)


def test_every_format_exports_loadable_files(mug, tmp_path):
    for fmt in ("glb", "obj", "ply", "stl"):
        files = export_model(mug, fmt, "mug")
        assert files[0][0] == f"mug.{fmt}"
        for name, data in files:
            assert data, name
            (tmp_path / name).write_bytes(data)
        loaded = trimesh.load(tmp_path / f"mug.{fmt}", force="mesh")
        assert len(loaded.faces) == len(mug.faces), fmt
        assert loaded.is_watertight, fmt


def test_obj_comes_with_its_material_and_texture(mug, tmp_path):
    files = dict(export_model(mug, "obj", "mug-01"))
    assert list(files) == ["mug-01.obj", "mug-01.mtl", "mug-01.png"]
    assert b"mtllib mug-01.mtl" in files["mug-01.obj"]
    assert b"map_Kd mug-01.png" in files["mug-01.mtl"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    loaded = trimesh.load(tmp_path / "mug-01.obj", force="mesh")
    assert isinstance(loaded.visual.material.image, Image.Image)

    spaced = dict(export_model(mug, "obj", "my mug"))
    main, mtl, texture = list(spaced)
    assert main == "my mug.obj" and " " not in mtl + texture  # references must not contain spaces
    assert mtl.startswith("my_mug-") and mtl.endswith(".mtl") and texture == mtl[:-4] + ".png"
    assert f"mtllib {mtl}".encode() in spaced["my mug.obj"]
    plain = export_model(trimesh.creation.box(), "obj", "box")
    assert [name for name, _ in plain] == ["box.obj"]


def test_obj_companions_of_names_that_sanitise_alike_never_collide(mug, tmp_path):
    """`a b.png` and `a_b.png` in one folder: before, both wrote `a_b.png.mtl` and its texture, so one model
    showed the other's picture."""
    def textured(colour):
        box = trimesh.creation.box()
        uv = np.full((len(box.vertices), 2), 0.5)
        return trimesh.Trimesh(box.vertices, box.faces, process=False, visual=trimesh.visual.TextureVisuals(
            uv=uv, image=Image.new("RGB", (8, 8), colour)))

    red, blue = textured((255, 0, 0)), textured((0, 0, 255))
    spaced, underscored = dict(export_model(red, "obj", "a b.png")), dict(export_model(blue, "obj", "a_b.png"))
    assert not set(spaced) & set(underscored)
    for files, colour in ((spaced, (255, 0, 0)), (underscored, (0, 0, 255))):
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
    for main, colour in (("a b.png.obj", (255, 0, 0)), ("a_b.png.obj", (0, 0, 255))):
        loaded = trimesh.load(tmp_path / main, force="mesh")
        assert loaded.visual.material.image.convert("RGB").getpixel((0, 0)) == colour, main


def test_ply_carries_colours_and_stl_geometry_only(mug):
    (_, ply), = export_model(mug, "ply", "mug")
    colours = trimesh.load(io.BytesIO(ply), file_type="ply").visual.vertex_colors
    assert len(np.unique(colours[:, :3], axis=0)) > 2  # blue body, white band, dark rim...
    assert (colours[:, 3] == 255).all()
    (_, stl), = export_model(mug, "stl", "mug")
    assert len(trimesh.load(io.BytesIO(stl), file_type="stl").faces) == len(mug.faces)


def test_scene_and_unknown_format(mug):
    scene = trimesh.Scene([mug, trimesh.creation.box(extents=(0.1, 0.1, 0.1))])
    assert export_model(scene, "stl", "both")[0][0] == "both.stl"
    assert mesh_stats(scene)["faces"] == len(mug.faces) + 12
    with pytest.raises(ValueError, match="fbx"):
        export_model(mug, "fbx", "mug")


def test_mesh_stats_are_plain_json(mug):
    stats = mesh_stats(mug)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["watertight"] is True and stats["is_volume"] is True
    assert stats["vertices"] == len(mug.vertices) and stats["faces"] == len(mug.faces)
    assert max(stats["extents"]) == pytest.approx(1.0)


def test_silhouette_and_iou_helpers():
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    assert front_silhouette(box, (10, 20)).all()
    full, empty = np.ones((4, 4), bool), np.zeros((4, 4), bool)
    assert mask_iou(full, full) == 1.0 and mask_iou(full, empty) == 0.0 and mask_iou(empty, empty) == 1.0
    half = np.zeros((8, 8), bool)
    half[:, :4] = True
    assert mask_iou(half, np.repeat(np.repeat(half, 3, 0), 3, 1)) == 1.0  # resized before comparing
    assert mask_iou(half, full[:2, :2]) == pytest.approx(0.5)
