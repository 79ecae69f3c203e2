"""What each output format carries, read back by readers other than the one that wrote it; settings a backend
ignores; and messages that say what to do (seed API and `hy3d-pipeline generate`).

Readers: pygltflib and the Khronos glTF validator (npm `gltf-validator`, run with node) for GLB; MeshLab
(pymeshlab), trimesh and meshio for OBJ, PLY and STL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image, ImageDraw
from scipy.spatial import cKDTree

from hy3d_pipeline import generate_3d_from_image_core
from hy3d_pipeline.embedded.samples import sample_images
from hy3d_pipeline.images.prepared import PreparedImage
from hy3d_pipeline.images.validation import prepare_image
from hy3d_pipeline.models.export import ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER, export_model, shading_normals
from hy3d_pipeline.models.generators.base import GenerationSettings
from hy3d_pipeline.models.generators.extrude import build
from hy3d_pipeline.models.generators.hunyuan3d import project_vertex_colors
from hy3d_pipeline_tests.conftest import png_bytes

VALIDATOR_VERSION = "2.0.0-dev.3.10"
ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (220, 20, 20), (20, 20, 220)


@pytest.fixture(scope="module")
def mug(tmp_path_factory):
    path = tmp_path_factory.mktemp("mug") / "mug.png"
    path.write_bytes(sample_images()["samples/mug.png"])
    return build(GenerationSettings(generator="extrude")).generate(prepare_image(path, "mug"), seed=1)


@pytest.fixture(scope="module")
def coloured():
    """A sphere coloured by Hunyuan3D's own projection (`texture=projected`): red left, blue right on the
    front, the mean colour behind."""
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(rgba)
    draw.ellipse((4, 4, 60, 60), fill=(*RED, 255))
    draw.rectangle((32, 0, 64, 64), fill=(0, 0, 0, 0))
    draw.pieslice((4, 4, 60, 60), -90, 90, fill=(*BLUE, 255))
    mask = np.asarray(rgba)[..., 3] > 127
    image = PreparedImage(name="two-tone", rgba=rgba, mask=mask, foreground_method="alpha")
    return project_vertex_colors(trimesh.creation.icosphere(subdivisions=3), image)


def write(files, folder: Path) -> Path:
    for name, data in files:
        (folder / name).write_bytes(data)
    return folder / files[0][0]


def original_colours(mesh, loaded_vertices) -> np.ndarray:
    """The written mesh's colour at each vertex a reader loaded (matched by position)."""
    distance, index = cKDTree(mesh.vertices).query(loaded_vertices)
    assert distance.max() < 1e-6
    return np.asarray(mesh.visual.vertex_colors)[index, :3].astype(int)


def gpu_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear texture filtering as OpenGL and WebGL define it: texel centres at (i + 0.5) / size, v up."""
    height, width = texture.shape[:2]
    x, y = uv[:, 0] * width - 0.5, (1 - uv[:, 1]) * height - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    texel = lambda row, col: texture[np.clip(row, 0, height - 1), np.clip(col, 0, width - 1)].astype(float)  # noqa: E731
    return ((1 - fx) * (1 - fy) * texel(y0, x0) + fx * (1 - fy) * texel(y0, x0 + 1)
            + (1 - fx) * fy * texel(y0 + 1, x0) + fx * fy * texel(y0 + 1, x0 + 1))


# --- GLB ---------------------------------------------------------------------------------------------------

def gltf_of(data: bytes):
    import pygltflib

    return pygltflib.GLTF2.load_from_bytes(data)


@pytest.mark.parametrize("which", ["mug", "coloured"])
def test_glb_has_normals_and_a_target_on_every_vertex_and_index_view(which, request):
    mesh = request.getfixturevalue(which)
    gltf = gltf_of(export_model(mesh, "glb", "m")[0][1])
    primitive, = gltf.meshes[0].primitives
    attributes = {k: v for k, v in vars(primitive.attributes).items() if v is not None}
    assert {"POSITION", "NORMAL"} <= set(attributes)
    assert ("TEXCOORD_0" if which == "mug" else "COLOR_0") in attributes
    assert gltf.accessors[attributes["NORMAL"]].count == len(mesh.vertices)
    targets = {gltf.accessors[a].bufferView: ARRAY_BUFFER for a in attributes.values()}
    targets[gltf.accessors[primitive.indices].bufferView] = ELEMENT_ARRAY_BUFFER
    images = {image.bufferView for image in gltf.images}
    assert len(images) == (1 if which == "mug" else 0)
    for index, view in enumerate(gltf.bufferViews):
        assert view.target == targets.get(index), index  # an image's view has none
    assert set(targets) | images == set(range(len(gltf.bufferViews)))


def test_glb_normals_keep_flat_faces_flat_and_round_ones_round(mug, coloured):
    """The slab's front and back shade flat (plain averaging would tilt them by ~40 degrees towards the
    walls), a sphere shades smooth, and the GLB is still a closed solid as loaded."""
    normals = shading_normals(mug)
    front = mug.vertices[:, 2] > 0
    assert np.allclose(normals[front], [0, 0, 1]) and np.allclose(normals[~front], [0, 0, -1])
    plain = np.asarray(mug.vertex_normals)
    assert plain[front, 2].min() < 0.9  # what plain averaging gives the same vertices
    radial = coloured.vertices / np.linalg.norm(coloured.vertices, axis=1)[:, None]
    assert (shading_normals(coloured) * radial).sum(axis=1).min() > 0.99

    import io

    loaded = trimesh.load(io.BytesIO(export_model(mug, "glb", "m")[0][1]), file_type="glb", force="mesh")
    assert loaded.is_watertight and len(loaded.vertices) == len(mug.vertices)


@pytest.fixture(scope="session")
def gltf_validator():
    """The Khronos glTF validator from npm, installed once per machine into a cache folder."""
    if not (shutil.which("npm") and shutil.which("node")):
        pytest.skip("npm/node are not installed: the Khronos glTF validator cannot run")
    folder = Path(os.path.expanduser("~/.cache/hy3d-pipeline-tests")) / f"gltf-validator-{VALIDATOR_VERSION}"
    if not (folder / "node_modules" / "gltf-validator" / "package.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder),
                        f"gltf-validator@{VALIDATOR_VERSION}"], check=True, capture_output=True, timeout=300)
    script = folder / "validate.js"
    script.write_text(
        "const fs = require('fs'); const validator = require('gltf-validator');\n"
        "validator.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), {maxIssues: 200})\n"
        "  .then(r => console.log(JSON.stringify(r.issues)), e => { console.error(String(e)); process.exit(2); });\n"
    )

    def validate(path: Path) -> dict:
        done = subprocess.run(["node", str(script), str(path)], capture_output=True, text=True, timeout=120,
                              cwd=folder)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return validate


@pytest.mark.parametrize("which", ["mug", "coloured"])
def test_glb_passes_the_khronos_validator(which, request, tmp_path, gltf_validator):
    path = write(export_model(request.getfixturevalue(which), "glb", "m"), tmp_path)
    issues = gltf_validator(path)
    codes = [m["code"] for m in issues["messages"]]
    assert issues["numErrors"] == issues["numWarnings"] == issues["numHints"] == 0, codes
    # the only remark left: the picture's own size (glTF 2.0 allows any), the mug's is 320 x 288
    assert set(codes) <= {"IMAGE_NPOT_DIMENSIONS"}


# --- OBJ ---------------------------------------------------------------------------------------------------

def test_obj_of_vertex_colours_bakes_them_into_a_texture_that_readers_show(coloured, tmp_path):
    files = export_model(coloured, "obj", "sphere")
    assert [name for name, _ in files] == ["sphere.obj", "sphere.mtl", "sphere.png"]
    main = write(files, tmp_path)
    text = main.read_text()
    assert "mtllib sphere.mtl" in text and "map_Kd sphere.png" in (tmp_path / "sphere.mtl").read_text()
    v_lines = [line.split() for line in text.splitlines() if line.startswith("v ")]
    assert len(v_lines) == len(coloured.vertices) and {len(v) for v in v_lines} == {4}  # x y z, no colours

    # MeshLab: one vertex per position, the texture by name, and at every face corner's texture coordinate
    # the colour of that corner's vertex
    import pymeshlab

    meshset = pymeshlab.MeshSet()
    meshset.load_new_mesh(str(main))
    loaded = meshset.current_mesh()
    assert loaded.vertex_number() == len(coloured.vertices) and loaded.has_wedge_tex_coord()
    assert list(loaded.textures()) == ["sphere.png"]
    texture = np.asarray(Image.open(tmp_path / "sphere.png").convert("RGB"))
    height, width = texture.shape[:2]
    corners = loaded.wedge_tex_coord_matrix().reshape(-1, 3, 2)
    at_corners = texture[np.floor((1 - corners[..., 1]) * height).astype(int), np.floor(corners[..., 0] * width).astype(int)]
    expected = original_colours(coloured, loaded.vertex_matrix())[loaded.face_matrix()]
    assert np.array_equal(at_corners.astype(int), expected)

    # trimesh: the same colours at the vertices, and inside each face the linear blend vertex colours give
    mesh = trimesh.load(main, force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    at_vertices = np.asarray(mesh.visual.to_color().vertex_colors)[:, :3].astype(int)
    assert np.abs(at_vertices - original_colours(coloured, mesh.vertices)).max() <= 1
    # drawn as a GPU draws it (bilinear filtering), a point inside a face gets the blend of its corners
    weights = np.array([0.6, 0.3, 0.1])
    uv = (mesh.visual.uv[mesh.faces] * weights[None, :, None]).sum(axis=1)
    inside = gpu_bilinear(np.asarray(mesh.visual.material.image.convert("RGB")), uv)
    blend = (original_colours(coloured, mesh.vertices)[mesh.faces] * weights[None, :, None]).sum(axis=1)
    assert np.abs(inside - blend).max() <= 1

    # meshio reads OBJ files with one texture coordinate per position only: it refuses this one (and any
    # OBJ with seams), as the README says; its geometry readers for the other formats are below
    import meshio

    with pytest.raises(ValueError, match="obj:vt"):
        meshio.read(main)


def test_obj_of_a_textured_model_keeps_its_texture_and_reads_everywhere(mug, tmp_path):
    main = write(export_model(mug, "obj", "mug"), tmp_path)
    import meshio
    import pymeshlab

    read = meshio.read(main)
    assert read.points.shape == (len(mug.vertices), 3) and "obj:vt" in read.point_data
    meshset = pymeshlab.MeshSet()
    meshset.load_new_mesh(str(main))
    assert list(meshset.current_mesh().textures()) == ["mug.png"]


# --- PLY, STL ----------------------------------------------------------------------------------------------

def test_ply_colours_and_stl_geometry_in_meshio_and_meshlab(coloured, tmp_path):
    import meshio
    import pymeshlab

    ply = write(export_model(coloured, "ply", "sphere"), tmp_path)
    read = meshio.read(ply)
    rgb = np.stack([read.point_data[c] for c in ("red", "green", "blue")], axis=1).astype(int)
    # meshio 5.3 reads a binary PLY's `uchar` as a signed byte (the README says so): 220 comes out as -36
    assert np.array_equal(rgb % 256, original_colours(coloured, read.points))
    meshset = pymeshlab.MeshSet()
    meshset.load_new_mesh(str(ply))
    assert meshset.current_mesh().has_vertex_color()

    stl = write(export_model(coloured, "stl", "sphere"), tmp_path)
    assert len(meshio.read(stl).cells_dict["triangle"]) == len(coloured.faces)


# --- settings a backend ignores ----------------------------------------------------------------------------

def test_an_ignored_setting_leaves_the_fingerprint_alone():
    extrude = GenerationSettings(generator="extrude")
    for change in ({"texture": "projected"}, {"texture": "paint"}, {"steps": 5}, {"seed": 7}, {"max_faces": 10},
                   {"model_path": "tencent/Hunyuan3D-2mini"}, {"flashvdm": True}):
        assert dataclasses.replace(extrude, **change).fingerprint() == extrude.fingerprint(), change
    # a model made with default settings keeps the fingerprint from before backends declared what they honour
    legacy = {k: v for k, v in dataclasses.asdict(extrude).items() if k != "device"}
    assert extrude.fingerprint() == hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:16]
    notes = dataclasses.replace(extrude, texture="projected").ignored_notes()
    assert len(notes) == 1 and notes[0].startswith("texture='projected' is ignored by extrude: its front")


def test_a_honoured_setting_still_changes_the_fingerprint():
    extrude, hunyuan = GenerationSettings(generator="extrude"), GenerationSettings(generator="hunyuan3d")
    assert dataclasses.replace(extrude, output_format="obj").fingerprint() != extrude.fingerprint()
    assert extrude.fingerprint() != hunyuan.fingerprint()
    for change in ({"texture": "projected"}, {"steps": 5}, {"seed": 7}, {"max_faces": 10}, {"flashvdm": True}):
        assert dataclasses.replace(hunyuan, **change).fingerprint() != hunyuan.fingerprint(), change
        assert dataclasses.replace(hunyuan, **change).ignored_notes() == []
    assert dataclasses.replace(hunyuan, device="cpu").fingerprint() == hunyuan.fingerprint()


def generate_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hy3d_pipeline.cli", "generate", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def test_texture_under_extrude_is_noted_and_the_file_is_the_same(s3_env, tmp_path):
    image = tmp_path / "disc.png"
    image.write_bytes(png_bytes())
    plain = generate_3d_from_image_core(str(image), output_dir=tmp_path / "plain")
    projected = generate_3d_from_image_core(str(image), texture="projected", output_dir=tmp_path / "projected")
    assert plain["status"] == projected["status"] == "success", projected
    assert plain["notes"] == [] and plain["texture"] == projected["texture"] == "image"
    assert len(projected["notes"]) == 1 and "texture='projected' is ignored by extrude" in projected["notes"][0]
    assert Path(plain["model_path"]).read_bytes() == Path(projected["model_path"]).read_bytes()

    done = generate_cli(str(image), "--texture", "--out", str(tmp_path / "cli"))  # alone: paint
    assert done.returncode == 0, done.stderr
    assert "texture='paint' is ignored by extrude" in json.loads(done.stdout)["notes"][0]
    refused = generate_cli(str(image), "--texture", "shiny")
    assert refused.returncode == 2 and "choose from 'none', 'projected', 'paint'" in refused.stderr


def test_an_ignored_texture_regenerates_nothing_in_the_pipeline(instance, storage, s3, monkeypatch):
    from dagster import materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.models.assets import image_to_model
    from hy3d_pipeline_tests.test_pipeline import latest_metadata

    s3.put_object(Bucket=storage.images_bucket, Key="disc.png", Body=png_bytes())
    instance.add_dynamic_partitions("images", ["disc.png"])
    run = dict(instance=instance, partition_key="disc.png")
    assert materialize([image_to_model], resources=build_defs().resources, **run).success
    first = s3.head_object(Bucket=storage.images_bucket, Key="models/disc.png.glb")
    assert latest_metadata(instance, "models_3d", "disc.png")["texture"] == "image"

    monkeypatch.setenv("HY3D_TEXTURE", "projected")
    assert materialize([image_to_model], resources=build_defs().resources, **run).success
    meta = latest_metadata(instance, "models_3d", "disc.png")
    assert meta["skipped_existing"] is True and meta["texture"] == "image"
    assert "texture='projected' is ignored by extrude" in meta["notes"][0]
    assert s3.head_object(Bucket=storage.images_bucket, Key="models/disc.png.glb")["ETag"] == first["ETag"]


# --- messages that say what to do --------------------------------------------------------------------------

def photo(path: Path) -> Path:
    """Opaque and busy to the edge, like a cup on a table: only rembg can find its object."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def test_photo_without_the_rembg_model_says_fetch_weights_once(s3_env, tmp_path, monkeypatch):
    missing = tmp_path / "u2net" / "u2net.onnx"
    monkeypatch.setenv("HY3D_REMBG_MODEL", str(missing))
    image = photo(tmp_path / "cup.jpg")
    result = generate_3d_from_image_core(str(image))
    message = result["message"]
    assert result["status"] == "error" and message.startswith(f"{image}: ")
    assert message.count(str(missing)) == 1 and message.count("hy3d-pipeline fetch-weights") == 1
    assert message.count("plain background") == 2  # why rembg is needed, once; the other way out, once
    assert "HY3D_REMBG_MODEL" in message

    done = generate_cli(str(image), env={"HY3D_REMBG_MODEL": str(missing)})
    assert done.returncode == 1
    said = done.stdout + done.stderr
    assert json.loads(done.stdout)["message"] == message
    assert said.count(str(missing)) == 1 and said.count("fetch-weights") == 1  # not again in a log line


def test_hunyuan3d_without_weights_says_fetch_weights_and_extrude(s3_env, tmp_path, monkeypatch):
    env = {"HY3D_GENERATOR": "hunyuan3d", "HY3DGEN_MODELS": str(tmp_path / "no-weights")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    image = tmp_path / "disc.png"
    image.write_bytes(png_bytes())
    for message in (generate_3d_from_image_core(str(image))["message"],
                    json.loads(generate_cli(str(image), env=env).stdout)["message"]):
        assert str(tmp_path / "no-weights" / "tencent/Hunyuan3D-2" / "hunyuan3d-dit-v2-0") in message
        assert "hy3d-pipeline fetch-weights" in message and "HY3D_GENERATOR=extrude" in message
