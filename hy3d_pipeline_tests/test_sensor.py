"""`new_images_sensor` against a real bucket: nothing missed, nothing requested twice, bursts batched."""

from __future__ import annotations

import pytest

from hy3d_pipeline.images.partitions import partition_key_for, relative_key_for
from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline.images.planner import SHARDS, Cursor
from hy3d_pipeline_tests.conftest import put, put_many


def test_new_images_become_partitions_and_runs(ticker, s3, storage, monkeypatch):
    b = storage.images_bucket
    for key in ("a.png", "b.JPG", "c.Jpeg", "d.webp", "e.TIFF", "f.bmp", "notes.txt", "g.gif", "dir/"):
        put(s3, b, key)
    data = ticker()
    assert sorted(ticker.requested(data)) == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "e.TIFF", "f.bmp"]
    assert sorted(ticker.instance.get_dynamic_partitions("images")) == sorted(ticker.requested(data))
    again = ticker()
    assert again.run_requests == [] and again.skip_message  # nothing changed: nothing requested


def test_overwrite_requests_again_once(ticker, s3, storage):
    b = storage.images_bucket
    put(s3, b, "a.png", b"v1")
    put(s3, b, "b.png", b"v1")
    ticker()
    put(s3, b, "a.png", b"v2")
    data = ticker()
    assert ticker.requested(data) == ["a.png"]
    assert ticker().run_requests == []


def test_nothing_lost_around_the_last_seen_key(ticker, s3, storage):
    """The cases dagster-aws's cursors lose: same second, sorting before, last key deleted or overwritten."""
    b = storage.images_bucket
    put(s3, b, "m.png")
    put(s3, b, "z.png")
    ticker()
    put(s3, b, "a-before.png")  # sorts before every key seen; same second as the tick, most likely
    s3.delete_object(Bucket=b, Key="z.png")  # the last-seen key disappears
    put(s3, b, "m.png", b"changed")  # and the other is overwritten
    put(s3, b, "zz-after.png")
    data = ticker()
    assert sorted(ticker.requested(data)) == ["a-before.png", "m.png", "zz-after.png"]


def test_models_and_prefix(ticker, s3, storage, monkeypatch):
    b = storage.images_bucket
    monkeypatch.setenv("S3_IMAGES_PREFIX", "in/")
    put(s3, b, "in/x/a.png")
    put(s3, b, "other/b.png")
    put(s3, b, "models/in/x/a.png.glb")
    put(s3, b, "models/thumb.png")  # our own outputs are never taken for new images
    ticker.defs = build_defs()
    assert ticker.requested(ticker()) == ["x/a.png"]


def test_burst_over_1000_objects_is_batched(ticker, s3, storage, monkeypatch):
    monkeypatch.setenv("HY3D_BATCH_SIZE", "50")
    b = storage.images_bucket
    keys = [f"burst/{i:05d}.png" for i in range(1105)]
    put_many(s3, b, keys)
    put(s3, b, "burst/readme.md")
    data = ticker()
    assert len(ticker.instance.get_dynamic_partitions("images")) == 1105
    assert sorted(ticker.requested(data)) == keys
    assert len(data.run_requests) == 23  # ceil(1105 / 50): contiguous ranges of at most 50
    assert all(int(r.tags.get("hy3d/batch_size", 1)) <= 50 for r in data.run_requests)
    assert len(data.cursor) < 64 * 1024
    assert ticker().run_requests == []


def test_uncommitted_tick_loses_nothing(ticker, s3, storage):
    """The daemon dies after the sensor ran but before its runs and cursor were stored: the next tick asks again."""
    b = storage.images_bucket
    put(s3, b, "a.png")
    ticker()
    put(s3, b, "b.png")
    first = ticker(commit=False)
    assert ticker.requested(first) == ["b.png"]
    second = ticker()
    assert ticker.requested(second) == ["b.png"]
    assert second.run_requests[0].run_key == first.run_requests[0].run_key  # Dagster dedupes a repeat


def test_lost_cursor_does_not_reprocess(ticker, s3, storage):
    b = storage.images_bucket
    put(s3, b, "a.png")
    ticker()
    ticker.cursor = None  # e.g. the sensor was reset in the UI
    assert ticker().run_requests == []


def test_partition_deleted_by_hand_is_requested_again(ticker, s3, storage):
    put(s3, storage.images_bucket, "a.png")
    ticker()
    ticker.instance.delete_dynamic_partition("images", "a.png")
    assert ticker.requested(ticker()) == ["a.png"]


@pytest.mark.parametrize("key", ["plain/key.png", "dots...png", "tab\there.png", "%!marker.png", "ünï.png", "a b+c.png"])
def test_partition_key_escape_round_trips(key):
    pk = partition_key_for(key)
    assert relative_key_for(pk) == key
    if "..." not in key and "\t" not in key and not key.startswith("%!"):
        assert pk == key  # unchanged wherever Dagster accepts it
    assert "..." not in pk and "\t" not in pk


def test_escaped_key_processed(ticker, s3, storage):
    put(s3, storage.images_bucket, "odd...name.png")
    data = ticker()
    [pk] = ticker.requested(data)
    assert pk != "odd...name.png" and relative_key_for(pk) == "odd...name.png"


def test_cursor_is_small():
    assert len(Cursor(seq=10**9, shards=[2**64 - 1] * SHARDS, reconciled_at=1e9, pending=[10**9]).dump()) < 64 * 1024


def test_bursts_get_bigger_batches(ticker, s3, storage, monkeypatch):
    """A big backlog goes in bigger runs (fewer per-run costs), bounded by HY3D_MAX_BATCH_SIZE."""
    monkeypatch.setenv("HY3D_BATCH_SIZE", "8")
    b = storage.images_bucket
    keys = [f"big/{i:03d}.png" for i in range(100)]
    put_many(s3, b, keys)
    data = ticker()
    sizes = [int(r.tags.get("hy3d/batch_size", 1)) for r in data.run_requests]
    assert sorted(ticker.requested(data)) == keys
    assert all(8 <= n <= 32 for n in sizes) and len(sizes) >= 4
    assert len(sizes) < 13  # fewer runs than ceil(100 / 8)
    for i in range(5):
        put(s3, b, f"small/{i}.png")
    small = ticker()
    assert sorted(ticker.requested(small)) == [f"small/{i}.png" for i in range(5)]
    assert all(int(r.tags.get("hy3d/batch_size", 1)) <= 8 for r in small.run_requests)


@pytest.mark.parametrize("slots, runs", [("1", [29] * 6 + [26]), ("2", [25] * 8)])
def test_burst_runs_come_in_whole_rounds_of_the_gpu_slots(ticker, s3, storage, monkeypatch, slots, runs):
    """200 images on two workers: 8 runs of 25 (4 each), not 6 of 32 and one of 8 that one worker does alone."""
    monkeypatch.setenv("HY3D_BATCH_SIZE", "8")
    monkeypatch.setenv("HY3D_GPU_SLOTS", slots)
    keys = [f"w/{i:03d}.png" for i in range(200)]
    put_many(s3, storage.images_bucket, keys)
    data = ticker()
    assert sorted(ticker.requested(data)) == keys
    assert sorted((int(r.tags["hy3d/batch_size"]) for r in data.run_requests), reverse=True) == runs



@pytest.mark.parametrize("images_prefix, models_prefix", [("", ""), ("in/", ""), ("models/in/", "models/"),
                                                           ("models/", "models/")])
def test_layout_where_outputs_become_inputs_is_refused(ticker, s3, storage, monkeypatch, s3_env, images_prefix,
                                                        models_prefix):
    monkeypatch.setenv("S3_IMAGES_PREFIX", images_prefix)
    monkeypatch.setenv("S3_MODELS_PREFIX", models_prefix)
    put(s3, storage.images_bucket, f"{images_prefix}a.png")
    put(s3, storage.images_bucket, f"{models_prefix}{images_prefix}a.png.glb.thumb.png")  # what a model run leaves
    ticker.defs = build_defs()
    with pytest.raises(Exception, match="S3_MODELS_PREFIX") as info:
        ticker()
    assert "S3_IMAGES_PREFIX" in str(info.value) and "separate" in str(info.value)
    assert ticker.instance.get_dynamic_partitions("images") == []
    # the same prefixes with the models in a bucket of their own are sound
    models = s3_env["bucket"] + "-m"
    s3_env["server"].create_buckets(models)
    monkeypatch.setenv("S3_MODELS_BUCKET", models)
    s3.delete_object(Bucket=storage.images_bucket, Key=f"{models_prefix}{images_prefix}a.png.glb.thumb.png")
    ticker.defs = build_defs()
    assert ticker.requested(ticker()) == ["a.png"]



def test_cursor_reset_then_new_image_requests_only_it(ticker, s3, storage):
    """After a reset the tick numbers must not restart below those of the rows already written, or those rows
    look written by an uncommitted tick and are requested again when their shard is next looked at."""
    from hy3d_pipeline.images.planner import shard_of

    b = storage.images_bucket
    put(s3, b, "old.png")
    put(s3, b, "other.png")
    for _ in range(4):  # the cursor's tick number climbs past the rows' (rows at tick 1)
        ticker()
    put(s3, b, "old.png", b"changed")  # its row now carries tick 5
    assert ticker.requested(ticker()) == ["old.png"]
    ticker.cursor = None  # the sensor is reset in the UI
    assert ticker().run_requests == []
    # a new image in the same shard as old.png, so the next tick looks old.png's row up again
    new = next(k for k in (f"new-{i}.png" for i in range(100000)) if shard_of(k) == shard_of("old.png"))
    put(s3, b, new)
    assert ticker.requested(ticker()) == [new]
