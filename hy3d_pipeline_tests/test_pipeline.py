"""The three assets materialized in-process over several partitions, the way sensor runs execute them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import trimesh
from dagster import AssetKey

from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline.embedded.demo import execute_sensor_result, tick
from hy3d_pipeline.models.processing import META_SETTINGS, META_SOURCE_ETAG
from hy3d_pipeline_tests.conftest import png_bytes

MODELS = AssetKey("models_3d")


def materialized(instance, asset: str) -> set[str]:
    return set(instance.get_materialized_partitions(AssetKey(asset)))


def latest_metadata(instance, asset: str, partition: str) -> dict:
    from dagster import AssetRecordsFilter

    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def run_sensor_once(instance):
    defs = build_defs()
    return execute_sensor_result(defs, instance, tick(defs, instance), log_level="ERROR")


@pytest.fixture
def bucket_with_batch(s3, storage):
    b = storage.images_bucket
    s3.put_object(Bucket=b, Key="good/disc.png", Body=png_bytes())
    s3.put_object(Bucket=b, Key="good/box.PNG", Body=png_bytes(shape="box"))
    s3.put_object(Bucket=b, Key="good/three.png", Body=png_bytes((120, 80)))
    s3.put_object(Bucket=b, Key="bad/notes.png", Body=b"this is not an image at all")
    s3.put_object(Bucket=b, Key="bad/truncated.png", Body=png_bytes()[:200])
    return b


def test_batch_with_broken_images(instance, storage, s3, bucket_with_batch, monkeypatch):
    monkeypatch.setenv("HY3D_BATCH_SIZE", "10")
    runs, failures = run_sensor_once(instance)
    assert runs == 1  # one batch run covers all five
    assert set(failures) == {"bad/notes.png", "bad/truncated.png"}
    assert "s3://" in failures["bad/notes.png"] and "bad/notes.png" in failures["bad/notes.png"]
    assert "truncated" in failures["bad/truncated.png"].lower() or "corrupt" in failures["bad/truncated.png"].lower()
    good = {"good/disc.png", "good/box.PNG", "good/three.png"}
    assert materialized(instance, "models_3d") == good
    assert materialized(instance, "source_images") == good | set(failures)  # the objects exist, bad or not
    for key in good:
        head = s3.head_object(Bucket=bucket_with_batch, Key=f"models/{key}.glb")
        assert head["Metadata"][META_SOURCE_ETAG] == s3.head_object(Bucket=bucket_with_batch, Key=key)["ETag"].strip('"')
        body = s3.get_object(Bucket=bucket_with_batch, Key=f"models/{key}.glb")["Body"].read()
        mesh = trimesh.load(io.BytesIO(body), file_type="glb", force="mesh")
        assert mesh.is_watertight and len(mesh.faces) > 0
    meta = latest_metadata(instance, "models_3d", "good/disc.png")
    for field in ("backend", "vertices", "faces", "bounds", "watertight", "file_size", "model_url", "generate_s",
                  "download_s", "upload_s"):
        assert field in meta, field
    assert meta["backend"] == "extrude" and meta["watertight"] is True
    assert meta["model_url"] == f"s3://{bucket_with_batch}/models/good/disc.png.glb"
    assert latest_metadata(instance, "source_images", "good/disc.png")["etag"]
    assert list(Path(storage.temp_dir).iterdir()) == []  # nothing left behind, bad images included


def test_rerun_skips_existing_and_overwrite_regenerates(instance, storage, s3, bucket_with_batch):
    run_sensor_once(instance)
    key = "good/disc.png"
    first = s3.head_object(Bucket=bucket_with_batch, Key=f"models/{key}.glb")
    # a re-executed range (e.g. a retried run) finds the model made from the same ETag and settings
    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model

    defs = build_defs()
    result = materialize([image_to_model], instance=instance, resources=defs.resources, partition_key=key)
    assert result.success
    assert latest_metadata(instance, "models_3d", key)["skipped_existing"] is True
    assert s3.head_object(Bucket=bucket_with_batch, Key=f"models/{key}.glb")["LastModified"] == first["LastModified"]
    s3.put_object(Bucket=bucket_with_batch, Key=key, Body=png_bytes((64, 64), shape="box"))
    runs, failures = run_sensor_once(instance)
    assert runs == 1 and failures == {}
    assert latest_metadata(instance, "models_3d", key)["skipped_existing"] is False
    head = s3.head_object(Bucket=bucket_with_batch, Key=f"models/{key}.glb")
    assert head["Metadata"][META_SOURCE_ETAG] == s3.head_object(Bucket=bucket_with_batch, Key=key)["ETag"].strip('"')


def test_settings_change_regenerates(instance, storage, s3, bucket_with_batch, monkeypatch):
    """A model recorded with other settings is made again; a setting the backend ignores is no change (extrude
    has no use for a seed, and regenerating would only write the same file again)."""
    run_sensor_once(instance)
    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model

    key, model = "good/box.PNG", "models/good/box.PNG.glb"
    before = s3.head_object(Bucket=bucket_with_batch, Key=model)
    monkeypatch.setenv("HY3D_SEED", "99")
    run = dict(instance=instance, partition_key=key, selection=[MODELS])
    assert materialize([image_to_model], resources=build_defs().resources, **run).success
    assert latest_metadata(instance, "models_3d", key)["skipped_existing"] is True
    assert s3.head_object(Bucket=bucket_with_batch, Key=model)["ETag"] == before["ETag"]

    # the same file, recorded as made with other settings (another configuration, an older version)
    body = s3.get_object(Bucket=bucket_with_batch, Key=model)["Body"].read()
    s3.put_object(Bucket=bucket_with_batch, Key=model, Body=body, ContentType=before["ContentType"],
                  Metadata={**before["Metadata"], META_SETTINGS: "0" * 16})
    assert materialize([image_to_model], resources=build_defs().resources, **run).success
    assert latest_metadata(instance, "models_3d", key)["skipped_existing"] is False
    assert s3.head_object(Bucket=bucket_with_batch, Key=model)["Metadata"][META_SETTINGS] == before["Metadata"][META_SETTINGS]


def test_local_images_alone_keeps_verified_copy(instance, storage, s3, bucket_with_batch):
    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model

    defs = build_defs()
    instance.add_dynamic_partitions("images", ["good/disc.png"])
    result = materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="good/disc.png",
                         selection=[AssetKey("local_images")])
    assert result.success
    meta = latest_metadata(instance, "local_images", "good/disc.png")
    assert meta["format"] == "PNG" and Path(meta["path"]).exists()
    assert materialized(instance, "models_3d") == set()


def test_output_format_run_config(instance, storage, s3, bucket_with_batch):
    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model

    defs = build_defs()
    instance.add_dynamic_partitions("images", ["good/disc.png"])
    result = materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="good/disc.png",
                         run_config={"ops": {"image_to_model": {"config": {"output_format": "stl"}}}})
    assert result.success
    body = s3.get_object(Bucket=bucket_with_batch, Key="models/good/disc.png.stl")["Body"].read()
    assert trimesh.load(io.BytesIO(body), file_type="stl").is_watertight


def test_generator_loaded_once_per_batch(instance, storage, s3, bucket_with_batch):
    from hy3d_pipeline.models.generators import base

    before = dict(base.load_count)
    base._cache.clear()
    run_sensor_once(instance)
    assert base.load_count.get("extrude", 0) - before.get("extrude", 0) == 1


def test_hunyuan_without_weights_fails_clearly(instance, storage, s3, monkeypatch, tmp_path):
    """Asking for the real model without weights is an error, never a silent fallback to extrude."""
    monkeypatch.setenv("HY3D_GENERATOR", "hunyuan3d")
    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path / "no-weights"))
    s3.put_object(Bucket=storage.images_bucket, Key="x.png", Body=png_bytes())
    runs, failures = run_sensor_once(instance)
    assert "no-weights" in failures["x.png"]
    assert materialized(instance, "models_3d") == set()


def test_hunyuan_batch_through_assets_loads_model_once(instance, storage, s3, monkeypatch, tmp_path):
    """The real hy3dgen code path (tiny random model built by the test) through the Dagster assets: one load
    for a batch of three partitions, a non-empty mesh for each."""
    from hy3d_pipeline.models.generators import base
    from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model

    build_tiny_model(tmp_path / "models", model_path="tiny/Hunyuan3D-tiny", subfolder="hunyuan3d-dit-v2-0")
    for name, value in {"HY3DGEN_MODELS": str(tmp_path / "models"), "HY3D_GENERATOR": "hunyuan3d",
                        "HY3D_MODEL_PATH": "tiny/Hunyuan3D-tiny", "HY3D_MODEL_SUBFOLDER": "hunyuan3d-dit-v2-0",
                        "HY3D_OCTREE_RESOLUTION": "64", "HY3D_STEPS": "2", "HY3D_DEVICE": "cpu",
                        "HY3D_BATCH_SIZE": "8"}.items():
        monkeypatch.setenv(name, value)
    for i in range(3):
        s3.put_object(Bucket=storage.images_bucket, Key=f"h/{i}.png", Body=png_bytes((64 + 8 * i, 64)))
    base._cache.clear()
    before = base.load_count.get("hunyuan3d", 0)
    runs, failures = run_sensor_once(instance)
    assert (runs, failures) == (1, {})
    assert base.load_count["hunyuan3d"] - before == 1
    for i in range(3):
        meta = latest_metadata(instance, "models_3d", f"h/{i}.png")
        assert meta["backend"] == "hunyuan3d" and meta["faces"] > 0
        described = meta["generator"]  # the loaded model, as Hunyuan3DGenerator.describe() tells it
        assert (described["model_path"], described["device"], described["dtype"]) == ("tiny/Hunyuan3D-tiny", "cpu",
                                                                                      "float32")
        assert described["weights"].startswith(str(tmp_path / "models"))


def _tiny_hunyuan_env(monkeypatch, tmp_path):
    from hy3d_pipeline.models.generators import base
    from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model

    build_tiny_model(tmp_path / "models", model_path="tiny/Hunyuan3D-tiny", subfolder="hunyuan3d-dit-v2-0")
    for name, value in {"HY3DGEN_MODELS": str(tmp_path / "models"), "HY3D_GENERATOR": "hunyuan3d",
                        "HY3D_MODEL_PATH": "tiny/Hunyuan3D-tiny", "HY3D_MODEL_SUBFOLDER": "hunyuan3d-dit-v2-0",
                        "HY3D_OCTREE_RESOLUTION": "64", "HY3D_STEPS": "2", "HY3D_DEVICE": "cpu"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(base, "_cache", {})


def test_seed_api_and_asset_make_the_same_mesh_under_a_prefix(instance, storage, s3, monkeypatch, tmp_path):
    """With S3_IMAGES_PREFIX set the partition key is the key without the prefix; the seed API used to seed with
    the full key, so one image gave two different meshes (hy3dgen's own code on the tiny model)."""
    from dagster import materialize

    from hy3d_pipeline import generate_3d_from_image_core
    from hy3d_pipeline.models.assets import image_to_model

    _tiny_hunyuan_env(monkeypatch, tmp_path)
    monkeypatch.setenv("S3_IMAGES_PREFIX", "in/")
    s3.put_object(Bucket=storage.images_bucket, Key="in/x/a.png", Body=png_bytes((80, 64)))
    instance.add_dynamic_partitions("images", ["x/a.png"])
    defs = build_defs()
    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="x/a.png").success
    body = s3.get_object(Bucket=storage.images_bucket, Key="models/x/a.png.glb")["Body"].read()
    from_asset = trimesh.load(io.BytesIO(body), file_type="glb", force="mesh")
    result = generate_3d_from_image_core(f"s3://{storage.images_bucket}/in/x/a.png")
    assert result["status"] == "success" and result["backend"] == "hunyuan3d", result
    from_api = trimesh.load(result["model_path"], force="mesh")
    assert len(from_api.faces) > 0
    assert np.array_equal(from_api.vertices, from_asset.vertices) and np.array_equal(from_api.faces, from_asset.faces)


def test_cuda_oom_fallback_records_the_resolution_used(instance, storage, s3, monkeypatch, tmp_path):
    """A model made at half resolution after a CUDA OOM is recorded with the settings it was made with, so a
    run with the requested settings regenerates it. There is no GPU here: the first pipeline call raising
    torch.OutOfMemoryError is a mock (the retry then runs hy3dgen's real code on the tiny model)."""
    import dataclasses

    import torch
    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model
    from hy3d_pipeline.models.generators.hunyuan3d import Hunyuan3DGenerator
    from hy3d_pipeline.models.processing import existing_model
    from hy3d_pipeline.models.resources import GeneratorResource

    _tiny_hunyuan_env(monkeypatch, tmp_path)
    monkeypatch.setenv("HY3D_OCTREE_RESOLUTION", "256")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    real, calls = Hunyuan3DGenerator._call_pipeline, []

    def oom_first(self, settings, cond, seed, resolution):
        calls.append(resolution)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB (mocked)")
        return real(self, settings, cond, seed, resolution)

    monkeypatch.setattr(Hunyuan3DGenerator, "_call_pipeline", oom_first)
    s3.put_object(Bucket=storage.images_bucket, Key="big.png", Body=png_bytes())
    instance.add_dynamic_partitions("images", ["big.png"])
    defs = build_defs()
    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="big.png").success
    assert calls == [256, 128]
    requested = GeneratorResource.from_env().settings()
    used = dataclasses.replace(requested, octree_resolution=128)
    head = s3.head_object(Bucket=storage.images_bucket, Key="models/big.png.glb")
    assert head["Metadata"][META_SETTINGS] == used.fingerprint() != requested.fingerprint()
    meta = latest_metadata(instance, "models_3d", "big.png")
    assert meta["octree_resolution"] == 128 and meta["settings"] == used.fingerprint()
    source = storage.head(storage.images_bucket, "big.png")
    assert existing_model(storage, "models/big.png.glb", source, requested) is None  # a later run regenerates
    assert existing_model(storage, "models/big.png.glb", source, used) is not None


def test_worker_and_generator_loads_in_metadata(instance, storage, s3, monkeypatch):
    import os
    import socket

    from dagster import materialize

    from hy3d_pipeline.models.assets import image_to_model
    from hy3d_pipeline.models.generators import base

    monkeypatch.setattr(base, "_cache", {})
    monkeypatch.setattr(base, "total_loads", 0, raising=False)
    defs = build_defs()
    for key in ("one.png", "two.png"):
        s3.put_object(Bucket=storage.images_bucket, Key=key, Body=png_bytes())
        instance.add_dynamic_partitions("images", [key])
        assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key=key).success
    for key in ("one.png", "two.png"):
        meta = latest_metadata(instance, "models_3d", key)
        assert meta["skipped_existing"] is False
        assert meta["worker"] == f"{socket.gethostname()}:{os.getpid()}" and meta["generator_loads"] == 1
        assert meta["generator"] == {"backend": "extrude"}  # Generator.describe() of the backend that made it
    # not regenerated, by a process that never loaded a generator: the model's maker, as stored with it
    monkeypatch.setattr(base, "total_loads", 0, raising=False)
    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="one.png").success
    meta = latest_metadata(instance, "models_3d", "one.png")
    assert meta["skipped_existing"] is True and meta["generator_loads"] == 1
    assert "generator" not in meta  # no backend was loaded for it
    assert meta["worker"] == f"{socket.gethostname()}:{os.getpid()}"
