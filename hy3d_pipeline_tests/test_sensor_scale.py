"""Sensor at scale: huge first scans spread over ticks, deletions and overwrites (SeaweedFS, listing mode)."""

from __future__ import annotations

from dagster import AssetKey, AssetRecordsFilter

from hy3d_pipeline_tests.conftest import put, put_many


def observations(instance, partition):
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=AssetKey("source_images"), asset_partitions=[partition]), limit=100).records
    return [r.event_log_entry.asset_observation.metadata for r in records]


def test_huge_first_scan_is_spread_and_resumes_exactly(ticker, s3, storage, monkeypatch):
    monkeypatch.setenv("HY3D_SENSOR_MAX_IMAGES", "100")
    keys = [f"scan/{i:04d}.png" for i in range(250)]
    put_many(s3, storage.images_bucket, keys)
    seen = []
    for expected in (100, 100, 50, 0):
        data = ticker()
        got = ticker.requested(data)
        assert len(got) == expected
        seen += got
    assert sorted(seen) == keys  # each exactly once, nothing missed


def test_deleted_source_is_marked_and_model_kept(ticker, s3, storage):
    b = storage.images_bucket
    put(s3, b, "keep.png")
    put(s3, b, "gone.png")
    put(s3, b, "models/gone.png.glb", b"a model")  # stands for the model generated earlier
    ticker()
    s3.delete_object(Bucket=b, Key="gone.png")
    data = ticker()
    assert data.run_requests == []
    assert [m["deleted"].value for m in observations(ticker.instance, "gone.png")] == [True]
    assert "gone.png" in ticker.instance.get_dynamic_partitions("images")  # policy "mark": partition stays
    assert s3.head_object(Bucket=b, Key="models/gone.png.glb")["ContentLength"] == 7  # never deleted
    ticker()
    assert len(observations(ticker.instance, "gone.png")) == 1  # reported once
    put(s3, b, "gone.png", b"back again")
    assert ticker.requested(ticker()) == ["gone.png"]


def test_remove_partition_policy(ticker, s3, storage, monkeypatch):
    monkeypatch.setenv("HY3D_DELETED_SOURCES", "remove-partition")
    b = storage.images_bucket
    put(s3, b, "a.png")
    put(s3, b, "b.png")
    ticker()
    s3.delete_object(Bucket=b, Key="a.png")
    ticker()
    assert ticker.instance.get_dynamic_partitions("images") == ["b.png"]


def test_overwrite_during_burst_processed_once_per_etag(ticker, s3, storage):
    b = storage.images_bucket
    put(s3, b, "x.png", b"1")
    first = ticker.requested(ticker())
    put(s3, b, "x.png", b"2")
    put(s3, b, "x.png", b"3")  # two overwrites between ticks: one new version to process
    second = ticker.requested(ticker())
    assert first == second == ["x.png"]
    assert ticker().run_requests == []


def test_existing_partitions_lookup_agrees_with_dagster(instance):
    """The one-query lookup event mode uses reads Dagster's own table; it must agree with the public API."""
    from hy3d_pipeline.images.planner import existing_partitions

    keys = [f"k{i}.png" for i in range(1200)]
    instance.add_dynamic_partitions("images", keys[::3])
    probe = keys + ["odd...key.png", "absent.png"]
    assert existing_partitions(instance, probe) == [k for k in probe if instance.has_dynamic_partition("images", k)]
    assert len(existing_partitions(instance, probe)) == 400
