"""Reliability: S3 going away mid-batch and coming back, and a run dying mid-batch then retried. Every image ends
with a model, none is generated twice for the same ETag and settings, and no local copy is left behind."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from pathlib import Path

import pytest
from dagster import AssetKey, materialize

from hy3d_pipeline.embedded.seaweedfs import SeaweedS3
from hy3d_pipeline_tests.conftest import png_bytes

KEYS = [f"r/{i}.png" for i in range(6)]


@pytest.fixture
def own_server(tmp_path, monkeypatch):
    """A server of this test's own, so it can be stopped and started again on the same port and data."""
    server = SeaweedS3(data_dir=tmp_path / "s3").start()
    bucket = f"r-{uuid.uuid4().hex[:10]}"
    server.create_buckets(bucket)
    for name, value in server.client_env().items():
        monkeypatch.setenv(name, value)
    for name in ("S3_IMAGES_PREFIX", "S3_MODELS_BUCKET", "S3_MODELS_PREFIX", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_IMAGES_BUCKET", bucket)
    monkeypatch.setenv("S3_TEMP_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("S3_DOWNLOAD_TIMEOUT", "5")
    monkeypatch.setenv("HY3D_GENERATOR", "extrude")
    from hy3d_pipeline.storage.resources import ImageStorage

    storage = ImageStorage.from_env(max_attempts=1)
    for i, key in enumerate(KEYS):
        storage.upload(bucket, key, png_bytes((64 + 8 * i, 64)))
    yield server, storage
    server.stop()


def _count_generations(monkeypatch) -> Counter:
    from hy3d_pipeline.models import processing

    counts: Counter = Counter()
    original = processing.generate_mesh

    def counting(path, name, settings, seed_key, timer):
        counts[seed_key] += 1
        return original(path, name, settings, seed_key, timer)

    monkeypatch.setattr(processing, "generate_mesh", counting)
    return counts


def _after_uploads(monkeypatch, n: int, action) -> Counter:
    """Runs `action` after the n-th model upload; the uploads per model key, counted."""
    from hy3d_pipeline.models import processing

    original, uploads = processing.upload_model, Counter()

    def hooked(storage, model_key, *args, **kwargs):
        out = original(storage, model_key, *args, **kwargs)
        uploads[model_key] += 1
        if sum(uploads.values()) == n:
            action()
        return out

    monkeypatch.setattr(processing, "upload_model", hooked)
    return uploads


def _run(instance, storage, **kwargs):
    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.models.assets import image_to_model

    defs = build_defs()
    resources = {**defs.resources, "storage": storage}
    return materialize([image_to_model], instance=instance, resources=resources, raise_on_error=False,
                       tags={"dagster/asset_partition_range_start": KEYS[0],
                             "dagster/asset_partition_range_end": KEYS[-1]}, **kwargs)


def _models(storage) -> set[str]:
    return {key for page in storage.list_keys(storage.images_bucket, "models/") for key, _, _ in page
            if key.endswith(".glb")}


def test_s3_outage_mid_batch_then_back(own_server, instance, monkeypatch):
    server, storage = own_server
    counts = _count_generations(monkeypatch)

    def outage():
        server.stop()  # S3 disappears after the second model...
        threading.Timer(3.0, server.start).start()  # ...and is back a few seconds later, same port and data

    _after_uploads(monkeypatch, 2, outage)
    instance.add_dynamic_partitions("images", KEYS)
    result = _run(instance, storage)
    assert result.success  # the step's retry policy carried it over the outage
    assert _models(storage) == {f"models/{k}.glb" for k in KEYS}
    assert all(counts[k] == 1 for k in KEYS), counts  # the two made before the outage were not made again
    assert set(instance.get_materialized_partitions(AssetKey("models_3d"))) == set(KEYS)
    assert list(Path(storage.temp_dir).iterdir()) == []


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing in the step catches it."""


def test_run_killed_mid_batch_then_retried(own_server, instance, monkeypatch):
    server, storage = own_server
    counts = _count_generations(monkeypatch)

    def die():
        raise Killed()

    uploads = _after_uploads(monkeypatch, 3, die)
    instance.add_dynamic_partitions("images", KEYS)
    first = _run(instance, storage)
    assert not first.success  # the run died after its third model
    assert len(_models(storage)) == 3
    retry = _run(instance, storage)  # the re-executed range (the hook fires at the third upload only)
    assert retry.success
    assert _models(storage) == {f"models/{k}.glb" for k in KEYS}
    # nothing made twice for the same ETag and settings: every model uploaded once, the three made before the
    # death not made again. The one image being made while the third uploaded (the step makes the next model
    # during an upload) died with the run, unfinished and never uploaded: that one alone is made again.
    assert set(uploads.values()) == {1} and len(uploads) == len(KEYS), uploads
    assert all(counts[k] == 1 for k in KEYS[:3]) and all(counts[k] == 1 for k in KEYS[4:]), counts
    assert counts[KEYS[3]] in (1, 2), counts
    assert list(Path(storage.temp_dir).glob("*.png")) == []


def _count_downloads(monkeypatch) -> Counter:
    from hy3d_pipeline.storage.resources import ImageStorage

    counts: Counter = Counter()
    original = ImageStorage.download

    def counting(self, info, dest=None):
        counts[info.key] += 1
        return original(self, info, dest)

    monkeypatch.setattr(ImageStorage, "download", counting)
    return counts


def _overwritten_between_head_and_get(monkeypatch, storage, key: str) -> None:
    """A real transient fault, once: the object is overwritten right after its HEAD, so the download's GET
    (conditional on the ETag the HEAD saw) gets 412 from SeaweedFS."""
    from hy3d_pipeline.storage.resources import ImageStorage

    original, fired = ImageStorage.head, []

    def head(self, bucket, k):
        info = original(self, bucket, k)
        if k == key and not fired:
            fired.append(1)
            storage.client().put_object(Bucket=bucket, Key=k, Body=png_bytes((90, 70), shape="box"))
        return info

    monkeypatch.setattr(ImageStorage, "head", head)


@pytest.mark.parametrize("image_attempts", ["3", "1"])
def test_one_transient_failure_redoes_no_good_image(own_server, instance, monkeypatch, image_attempts):
    """With 3 attempts the flaky image is retried on its own; with 1 the step's retry policy takes over, and the
    retry skips what this run already recorded. Either way each good image is downloaded and generated once."""
    server, storage = own_server
    monkeypatch.setenv("HY3D_IMAGE_ATTEMPTS", image_attempts)
    monkeypatch.setenv("HY3D_IMAGE_RETRY_DELAY", "0.05")
    generated, downloaded = _count_generations(monkeypatch), _count_downloads(monkeypatch)
    flaky = KEYS[2]
    _overwritten_between_head_and_get(monkeypatch, storage, flaky)
    instance.add_dynamic_partitions("images", KEYS)
    result = _run(instance, storage)
    assert result.success
    step_retried = any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert step_retried == (image_attempts == "1")
    assert _models(storage) == {f"models/{k}.glb" for k in KEYS}
    assert all(generated[k] == 1 for k in KEYS), generated
    assert all(downloaded[k] == 1 for k in KEYS if k != flaky), downloaded
    assert downloaded[flaky] == 2  # the 412, then the new version
    current = storage.head(storage.images_bucket, flaky).etag
    head = storage.client().head_object(Bucket=storage.images_bucket, Key=f"models/{flaky}.glb")
    assert head["Metadata"]["hy3d-source-etag"] == current
    models = [e for e in result.all_events if e.is_step_materialization and e.asset_key == AssetKey("models_3d")]
    assert len(models) == len(KEYS)  # recorded once each, step retry or not
    assert list(Path(storage.temp_dir).iterdir()) == []


def test_transient_upload_fault_retries_the_upload_alone(own_server, instance, monkeypatch):
    """The step makes a model in one thread and uploads it in another: an upload that fails transiently (here a
    503 from S3, injected into the upload: SeaweedFS cannot be made to fail one request) is tried again with the
    model in memory, not made again, and the run goes on with the other images."""
    from hy3d_pipeline.models import processing
    from hy3d_pipeline.storage.base import StorageError

    monkeypatch.setenv("HY3D_IMAGE_RETRY_DELAY", "0.1")
    server, storage = own_server
    counts = _count_generations(monkeypatch)
    original, calls = processing.upload_model, Counter()

    def flaky(storage_, model_key, *args, **kwargs):
        calls[model_key] += 1
        if model_key == f"models/{KEYS[2]}.glb" and calls[model_key] == 1:
            raise StorageError(f"s3://{storage_.models_bucket_name}/{model_key}: 503 SlowDown (try again)",
                               transient=True, code="SlowDown")
        return original(storage_, model_key, *args, **kwargs)

    monkeypatch.setattr(processing, "upload_model", flaky)
    instance.add_dynamic_partitions("images", KEYS)
    assert _run(instance, storage).success
    assert _models(storage) == {f"models/{k}.glb" for k in KEYS}
    assert calls[f"models/{KEYS[2]}.glb"] == 2 and all(counts[k] == 1 for k in KEYS), (calls, counts)
    assert set(instance.get_materialized_partitions(AssetKey("models_3d"))) == set(KEYS)
