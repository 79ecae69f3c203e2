"""The seed API `generate_3d_from_image_core`: local paths and S3 URLs, every format, errors as dicts."""

from __future__ import annotations

from pathlib import Path

import pytest
import trimesh

from hy3d_pipeline import generate_3d_from_image_core
from hy3d_pipeline_tests.conftest import png_bytes


@pytest.mark.parametrize("fmt", ["glb", "obj", "ply", "stl"])
def test_local_image_every_format(s3_env, tmp_path, fmt):
    image = tmp_path / "Disc.PNG"
    image.write_bytes(png_bytes())
    progress = []
    result = generate_3d_from_image_core(str(image), output_format=fmt, progress_callback=lambda p, s: progress.append((p, s)))
    assert result["status"] == "success", result
    path = Path(result["model_path"])
    assert path.suffix == f".{fmt}" and path.stat().st_size > 0
    mesh = trimesh.load(path, force="mesh")
    assert len(mesh.faces) > 0 and result["backend"] == "extrude"
    percents = [p for p, _ in progress]
    assert percents == sorted(percents) and percents[0] == 0 and percents[-1] == 100


def test_s3_url_forms(s3_env, storage, s3):
    s3.put_object(Bucket=storage.images_bucket, Key="in dir/cat.png", Body=png_bytes())
    result = generate_3d_from_image_core(f"s3://{storage.images_bucket}/in dir/cat.png")
    assert result["status"] == "success", result
    assert Path(result["model_path"]).exists()
    assert list(Path(storage.temp_dir).iterdir()) == []  # the downloaded copy is cleaned up


@pytest.mark.parametrize("bad, expected", [
    ("http://169.254.169.254/latest/meta-data/", "neither a local path nor an S3 URL"),
    ("https://bucket.s3.amazonaws.com.evil.com/x.png", "neither a local path nor an S3 URL"),
    ("/no/such/file.png", "not found"),
    ("", "must be a local path or an S3 URL"),
    (None, "must be a local path or an S3 URL"),
])
def test_bad_input_returns_error(s3_env, bad, expected):
    result = generate_3d_from_image_core(bad)
    assert result["status"] == "error" and expected in result["message"]


def test_bad_image_and_format(s3_env, tmp_path, storage):
    text = tmp_path / "notes.png"
    text.write_text("hello")
    result = generate_3d_from_image_core(str(text))
    assert result["status"] == "error" and "notes.png" in result["message"]
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    result = generate_3d_from_image_core(str(image), output_format="fbx")
    assert result["status"] == "error" and "fbx" in result["message"]
    missing = generate_3d_from_image_core(f"s3://{storage.images_bucket}/missing.png")
    assert missing["status"] == "error" and "missing.png" in missing["message"]


def test_broken_progress_callback_is_ignored(s3_env, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())

    def boom(percent, status):
        raise RuntimeError("display went away")

    assert generate_3d_from_image_core(str(image), progress_callback=boom)["status"] == "success"


def test_sources_with_one_name_get_distinct_model_paths(s3_env, storage, s3, tmp_path):
    """Stems alone collide: two folders' photo.png, two buckets' ring.png, an S3 object and a local file."""
    other = f"{storage.images_bucket}-2"
    s3_env["server"].create_buckets(other)
    paths = set()
    for bucket, key, shape in ((storage.images_bucket, "a/photo.png", "disc"), (storage.images_bucket, "b/photo.png", "box"),
                               (storage.images_bucket, "ring.png", "disc"), (other, "ring.png", "box")):
        s3.put_object(Bucket=bucket, Key=key, Body=png_bytes(shape=shape))
        result = generate_3d_from_image_core(f"s3://{bucket}/{key}")
        assert result["status"] == "success", result
        paths.add(result["model_path"])
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "photo.png").write_bytes(png_bytes())
        paths.add(generate_3d_from_image_core(str(tmp_path / folder / "photo.png"))["model_path"])
    assert len(paths) == 6
    assert all(Path(p).exists() and Path(p).name.startswith(("photo-", "ring-")) for p in paths)
    # the same source again lands on its own path, not a new one
    assert generate_3d_from_image_core(str(tmp_path / "x" / "photo.png"))["model_path"] in paths


def test_output_folder_per_call_and_per_command(s3_env, tmp_path):
    from hy3d_pipeline.cli import main

    image = tmp_path / "a.png"
    image.write_bytes(png_bytes())
    result = generate_3d_from_image_core(str(image), output_format="obj", output_dir=tmp_path / "mine")
    assert result["status"] == "success", result
    written = sorted(p.name for p in (tmp_path / "mine").iterdir())
    assert Path(result["model_path"]).parent == (tmp_path / "mine").resolve() and len(written) == 3  # obj, mtl, png
    assert main(["generate", str(image), "--format", "stl", "--out", str(tmp_path / "cli")]) == 0
    assert [p.suffix for p in (tmp_path / "cli").iterdir()] == [".stl"]
    assert not (tmp_path / "out").exists()  # HY3D_OUTPUT_DIR was not used by either
