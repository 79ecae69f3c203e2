"""The sensor's record of what it requested (catalog rows, pending SQS deletes) on every instance storage Dagster
supports: SQLite, PostgreSQL and MySQL (a real MariaDB server with dagster-mysql).

MySQL is the strict one: the key-value table's unique index covers a key's first 64 characters (two longer keys
that share them are one row) and a value is TEXT (65,535 bytes). The tests read the table itself, so every key and
value the sensor writes is measured, for the longest S3 keys (1,024 bytes) and a tick of 5,000 receipt handles.
"""

from __future__ import annotations

import json
import uuid

import pytest

from hy3d_pipeline.dagster_private import KV_KEY_MAX, KV_VALUE_MAX, kv_get, kv_set
from hy3d_pipeline.images import catalog, events
from hy3d_pipeline.images.catalog import RequestedImages, Row
from hy3d_pipeline.images.partitions import partition_key_for
from hy3d_pipeline.images.planner import Cursor
from hy3d_pipeline_tests.conftest import STORAGES, Ticker, instance_on, put, write_first_format_rows


@pytest.fixture(scope="module", params=STORAGES)
def any_instance(request):
    with instance_on(request.param, request) as inst:
        yield inst


def table_rows(instance, prefix: str) -> dict[str, str]:
    """Every row of the instance's key-value table under `prefix`, read with SQL (not through our code)."""
    from dagster._core.storage.runs.schema import KeyValueStoreTable as kvs
    from dagster._core.storage.sqlalchemy_compat import db_select

    with instance.run_storage.connect() as conn:
        found = conn.execute(db_select([kvs.c.key, kvs.c.value]).where(kvs.c.key.startswith(prefix))).fetchall()
    return {row[0]: row[1] for row in found}


def assert_fits_mysql(rows: dict[str, str]) -> None:
    assert rows
    assert max(len(k) for k in rows) <= KV_KEY_MAX
    assert max(len(v.encode()) for v in rows.values()) <= KV_VALUE_MAX
    # no two keys are one row on MySQL: unique in their first 64 characters (all of them)
    assert len({k[:64] for k in rows}) == len(rows)


def longest_s3_keys(tag: str) -> list[str]:
    """Partition keys of S3 keys of 1,024 bytes or nearly: sharing their first 1,000 characters, multi-byte, and
    one Dagster refuses (escaped to three times its length)."""
    shared = f"{tag}/" + "x" * (1000 - len(tag))
    keys = [shared + "y" * (1024 - len(shared) - 7) + f"/{i:02d}.png" for i in range(3)]
    keys.append(f"{tag}/" + "猫" * 336 + ".png")
    keys.append(f"{tag}/" + ("a..." * 300)[:1000] + ".png")
    assert all(len(k.encode()) <= 1024 for k in keys)
    return [partition_key_for(k) for k in keys]


def test_catalog_rows_fit_every_storage_for_1024_byte_keys(any_instance):
    keys = longest_s3_keys(uuid.uuid4().hex[:8])
    assert max(len(k) for k in keys) > 2500  # the escaped one
    requested = RequestedImages(any_instance)
    requested.set({k: f"etag-{i}" for i, k in enumerate(keys)}, seq=7, attempts={keys[1]: 2}, gave_up=[keys[2]])
    rows = table_rows(any_instance, "hy3d/req/")
    assert_fits_mysql(rows)
    assert requested.get(keys + ["absent.png"]) == {
        k: Row(f"etag-{i}", 7, 2 if i == 1 else 1, i == 2) for i, k in enumerate(keys)}
    # rewritten in place: still one row per key
    requested.set({keys[0]: "etag-new"}, seq=8)
    assert requested.get([keys[0]])[keys[0]] == Row("etag-new", 8)
    assert len(table_rows(any_instance, "hy3d/req/")) == len(rows)
    assert RequestedImages(any_instance).high_seq() >= 8


def test_pending_deletes_of_5000_handles_fit_every_storage(any_instance):
    pending = events.PendingDeletes(any_instance)
    seq = 70
    handles = [f"{i:05d}-" + (uuid.uuid4().hex * 32)[:1018] for i in range(5000)]  # SQS allows 1,024 characters
    assert len(handles[0]) == 1024
    pending.save(seq, handles)
    rows = {k: v for k, v in table_rows(any_instance, "hy3d/sqs/pending/").items()
            if json.loads(v).get("seq") == seq}
    assert len(rows) > 75  # split over many rows
    assert_fits_mysql(rows)
    assert pending.load(seq) == (handles, 0)
    # the slot's next tick (64 later) with fewer handles: nothing of the first one is read back
    pending.save(seq + 64, handles[:3])
    assert pending.load(seq + 64) == (handles[:3], 0)
    assert pending.load(seq) is None


def test_key_value_limits_are_checked_on_every_storage(any_instance):
    ok_key, long_key = "k" * KV_KEY_MAX, "k" * (KV_KEY_MAX + 1)
    kv_set(any_instance, {ok_key: "é" * (KV_VALUE_MAX // 2)})  # 65,534 bytes
    assert kv_get(any_instance, [ok_key]) == {ok_key: "é" * (KV_VALUE_MAX // 2)}
    with pytest.raises(ValueError, match="65 characters; at most 64"):
        kv_set(any_instance, {long_key: "1"})
    with pytest.raises(ValueError, match="65536 bytes; at most 65535"):
        kv_set(any_instance, {ok_key: "x" * (KV_VALUE_MAX + 1)})


def test_the_limits_are_mysqls_own(request):
    """What the limits protect against, shown on MySQL with Dagster's own key-value calls."""
    with instance_on("mysql", request) as inst:
        storage = inst.run_storage
        a, b = "k" * 64 + "/a.png", "k" * 64 + "/b.png"
        storage.set_cursor_values({a: "etag-a"})
        storage.set_cursor_values({b: "etag-b"})
        assert storage.get_cursor_values({a, b}) == {a: "etag-b"}  # b's write landed on a's row
        with pytest.raises(Exception, match="Data too long"):
            storage.set_cursor_values({"big": "x" * (KV_VALUE_MAX + 1)})
        kv_set(inst, {"big": "x" * KV_VALUE_MAX})  # the largest value that fits
        assert len(kv_get(inst, ["big"])["big"]) == KV_VALUE_MAX
        # Dagster's own dynamic partitions have the same 64-character index on MySQL: two image keys that share
        # their first 64 characters cannot both be partitions there (README: Configuration, MySQL)
        with pytest.raises(Exception, match="Duplicate entry"):
            inst.add_dynamic_partitions("images", ["p" * 64 + "/a.png", "p" * 64 + "/b.png"])


def test_sensor_on_mysql_with_keys_longer_than_its_index(s3_env, s3, storage, request):
    """The sensor end to end on MySQL with 1,000-character keys that differ only at character 60: with the
    partition key in the row key (`hy3d/images/<key>`, the first format) their rows were one row on MySQL, and a
    cursor reset requested them all again. Each is requested once, an overwrite of one requests only it, and a
    reset requests nothing."""
    b = storage.images_bucket
    tail = "/".join(["q" * 200] * 4)  # SeaweedFS takes up to 255 characters between slashes
    keys = [f"album/{'p' * 53}/{n}/{tail}.png" for n in ("a", "b", "c")]
    assert len({("hy3d/images/" + k)[:64] for k in keys}) == 1 and len({k[:64] for k in keys}) == 3
    for key in keys:
        put(s3, b, key, key.encode())
    with instance_on("mysql", request) as inst:
        ticker = Ticker(inst)
        assert sorted(ticker.requested(ticker())) == keys
        assert ticker().run_requests == []
        put(s3, b, keys[1], b"v2")
        assert ticker.requested(ticker()) == [keys[1]]
        assert ticker().run_requests == []
        ticker.cursor = None  # reset in the UI: every row is looked up
        assert ticker().run_requests == []
        assert_fits_mysql(table_rows(inst, "hy3d/"))


def test_event_mode_on_mysql_deletes_every_committed_message(moto_server, monkeypatch, tmp_path, request):
    """Event mode on MySQL against moto's real SQS API, with rows made small so that a tick's receipt handles
    span several: every message of a committed tick is deleted from the queue."""
    from hy3d_pipeline_tests.test_sensor_events import make_events_env, queue_depth

    monkeypatch.setattr(events, "_ROW_BYTES", 1500)
    with instance_on("mysql", request) as inst:
        env = make_events_env(moto_server, monkeypatch, inst, tmp_path)
        ticker, s3 = env["ticker"], env["s3"]
        assert ticker().run_requests == []  # the first tick lists (an empty bucket)
        for i in range(30):
            s3.put_object(Bucket=env["bucket"], Key=f"ev/{i:02d}.png", Body=b"%d" % i)
        data = ticker()
        assert len(ticker.requested(data)) == 30
        [seq] = Cursor.load(ticker.cursor).pending
        rows = {k: v for k, v in table_rows(inst, "hy3d/sqs/pending/").items() if json.loads(v)["seq"] == seq}
        handles, _tries = events.PendingDeletes(inst).load(seq)
        assert len(rows) > 3 and len(handles) == 31  # moto's s3:TestEvent too
        assert queue_depth(env) == 31
        assert ticker().run_requests == []
        assert queue_depth(env) == 0


def test_rows_of_the_first_format_are_still_read(ticker, s3, storage):
    """An instance upgraded in place: rows written before keys had to fit MySQL (`hy3d/images/<partition key>`,
    `etag|tick`) count as requested, so the bucket is not requested again; only a changed image is."""
    b = storage.images_bucket
    put(s3, b, "old/a.png", b"a")
    put(s3, b, "old/b.png", b"b")
    etags = {k: s3.head_object(Bucket=b, Key=k)["ETag"].strip('"') for k in ("old/a.png", "old/b.png")}
    ticker.instance.add_dynamic_partitions("images", list(etags))
    write_first_format_rows(ticker.instance, {k: f"{e}|41" for k, e in etags.items()}, high=41)
    first = ticker()  # no cursor: as after an upgrade that reset it, or a first tick of the new version
    assert first.run_requests == []
    assert Cursor.load(ticker.cursor).seq == 42  # ticks go on above the old ones
    put(s3, b, "old/b.png", b"b2")
    assert ticker.requested(ticker()) == ["old/b.png"]
    assert ticker().run_requests == []
    assert catalog.RequestedImages(ticker.instance).get(["old/b.png"])["old/b.png"].seq == 43
    assert catalog.row_key("old/b.png") in table_rows(ticker.instance, "hy3d/req/")  # written in the new format


def test_pending_deletes_of_the_first_format_are_still_read(instance):
    """A head row of the first format (every handle in it, no row count) is read the same."""
    kv_set(instance, {"hy3d/sqs/pending/5": json.dumps({"seq": 69, "handles": ["h1", "h2"], "tries": 1})})
    assert events.PendingDeletes(instance).load(69) == (["h1", "h2"], 1)
    assert events.PendingDeletes(instance).load(5) is None  # the same slot, another tick


def test_client_submissions_fit_every_storage(any_instance):
    """The record of a client submission under way (images/submitted.py), for the longest keys."""
    from hy3d_pipeline.images import submitted

    keys = longest_s3_keys(uuid.uuid4().hex[:8])
    submitted.record_submissions(any_instance, {k: f"etag-{i}" for i, k in enumerate(keys)}, now=1000.0)
    assert_fits_mysql(table_rows(any_instance, submitted.INTENTS))
    asked = {k: f"etag-{i}" for i, k in enumerate(keys)} | {keys[0]: "another-etag", "absent.png": "e"}
    assert submitted.under_way(any_instance, asked, now=1001.0) == set(keys[1:])
    assert submitted.under_way(any_instance, asked, now=1000.0 + submitted.INTENT_TTL_S + 1) == set()
