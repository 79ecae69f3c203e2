"""A model never goes back in time: when runs for two versions of one image overlap, the older run's model never
replaces the newer one's, whichever finishes last (real SeaweedFS, real Dagster instance)."""

from __future__ import annotations

from dagster import AssetKey, AssetRecordsFilter, materialize

from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline.models import processing
from hy3d_pipeline.models.processing import META_SOURCE_ETAG
from hy3d_pipeline.storage.resources import ImageStorage
from hy3d_pipeline_tests.conftest import png_bytes

MODELS = AssetKey("models_3d")
KEY = "cat.png"
MODEL = "models/cat.png.glb"


def _newer_run(storage, s3, settings) -> dict:
    """Run B: the object is overwritten (v2) and v2's model is made, through the same code the asset runs."""
    s3.put_object(Bucket=storage.images_bucket, Key=KEY, Body=png_bytes((80, 60), shape="box"))
    processing.process_object(storage, storage.head(storage.images_bucket, KEY), KEY, settings)
    thumb = s3.head_object(Bucket=storage.images_bucket, Key=MODEL + ".thumb.png")["ETag"]
    return {**s3.head_object(Bucket=storage.images_bucket, Key=MODEL), "thumb": thumb}


def _run_a(instance, storage):
    from hy3d_pipeline.models.assets import image_to_model

    instance.add_dynamic_partitions("images", [KEY])
    return materialize([image_to_model], instance=instance, resources={**build_defs().resources, "storage": storage},
                       partition_key=KEY)


def _assert_b_kept(instance, s3, storage, b_head):
    head = s3.head_object(Bucket=storage.images_bucket, Key=MODEL)
    v2 = s3.head_object(Bucket=storage.images_bucket, Key=KEY)["ETag"].strip('"')
    assert head["ETag"] == b_head["ETag"] and head["Metadata"][META_SOURCE_ETAG] == v2
    thumb = s3.head_object(Bucket=storage.images_bucket, Key=MODEL + ".thumb.png")["ETag"]
    assert thumb == b_head["thumb"]  # nor B's picture
    # A's result: an observation saying it was superseded, no materialization claiming the model
    assert KEY not in instance.get_materialized_partitions(MODELS)
    observed = instance.fetch_observations(AssetRecordsFilter(asset_key=MODELS, asset_partitions=[KEY]), limit=1)
    meta = {k: v.value for k, v in observed.records[0].asset_observation.metadata.items()}
    assert meta["superseded"] is True and meta["current_source_etag"] == v2 and meta["source_etag"] != v2
    assert "changed" in meta["message"]


def test_older_run_finishing_last_leaves_the_newer_model(instance, storage, s3, monkeypatch):
    s3.put_object(Bucket=storage.images_bucket, Key=KEY, Body=png_bytes())
    original, b_head = processing.generate_mesh, {}

    def a_generates_while_b_runs(path, name, settings, seed_key, timer):
        out = original(path, name, settings, seed_key, timer)
        if not b_head:  # A holds v1's mesh; B overwrites the object and finishes first
            monkeypatch.setattr(processing, "generate_mesh", original)
            b_head.update(_newer_run(storage, s3, settings))
        return out

    monkeypatch.setattr(processing, "generate_mesh", a_generates_while_b_runs)
    assert _run_a(instance, storage).success  # superseded is not a failure: nothing to retry
    _assert_b_kept(instance, s3, storage, b_head)


def test_newer_model_landing_between_check_and_write_is_not_overwritten(instance, storage, s3, monkeypatch):
    """B's model is written after A has looked at the source but before A's PUT: the conditional write refuses."""
    s3.put_object(Bucket=storage.images_bucket, Key=KEY, Body=png_bytes())
    original, b_head, settings_seen = ImageStorage.upload, {}, []

    def upload(self, bucket, key, data, **kwargs):
        if key == MODEL and not b_head and settings_seen:
            b_head["pending"] = True
            b_head.update(_newer_run(self, s3, settings_seen[0]))
            b_head.pop("pending")
        return original(self, bucket, key, data, **kwargs)

    real_generate = processing.generate_mesh

    def generate(path, name, settings, seed_key, timer):
        settings_seen.append(settings)
        return real_generate(path, name, settings, seed_key, timer)

    monkeypatch.setattr(ImageStorage, "upload", upload)
    monkeypatch.setattr(processing, "generate_mesh", generate)
    assert _run_a(instance, storage).success
    assert len(settings_seen) == 2  # A's generation and B's
    _assert_b_kept(instance, s3, storage, b_head)
