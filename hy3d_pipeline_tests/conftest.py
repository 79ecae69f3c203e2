"""Shared fixtures: one real SeaweedFS S3 server for the session, a fresh bucket per test, a Dagster instance,
and PostgreSQL and MySQL servers (started for the session by the first test that needs one) for instances on
every storage Dagster supports."""

from __future__ import annotations

import contextlib
import io
import uuid

import pytest

from hy3d_pipeline.embedded.seaweedfs import SeaweedS3


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    # a bucket per test: small volumes, so hundreds of buckets fit in weed's volume budget
    server = SeaweedS3(data_dir=tmp_path_factory.mktemp("seaweedfs") / "data", volume_size_limit_mb=16).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(seaweed, monkeypatch, tmp_path):
    """Environment of a deployment pointed at the test server, with a bucket of its own."""
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    seaweed.create_buckets(bucket)
    for name, value in seaweed.client_env().items():
        monkeypatch.setenv(name, value)
    for name in ("S3_IMAGES_PREFIX", "S3_MODELS_BUCKET", "S3_MODELS_PREFIX", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                 "HY3D_OUTPUT_FORMAT", "HY3D_TEXTURE", "DAGSTER_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_IMAGES_BUCKET", bucket)
    monkeypatch.setenv("S3_TEMP_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HY3D_GENERATOR", "extrude")
    monkeypatch.setenv("HY3D_OUTPUT_DIR", str(tmp_path / "out"))
    return {"bucket": bucket, "tmp": tmp_path, "server": seaweed}


@pytest.fixture
def storage(s3_env):
    from hy3d_pipeline.storage.resources import ImageStorage

    return ImageStorage.from_env()


@pytest.fixture
def s3(storage):
    """A plain boto3 client for arranging test data."""
    return storage.client()


@pytest.fixture
def instance(tmp_path_factory):
    """A SQLite instance as `demo`/`dev`/`worker` write it (hy3d_pipeline.fleet.sqlite's classes)."""
    with instance_on("sqlite", None, folder=tmp_path_factory.mktemp("dagster")) as inst:
        yield inst


@pytest.fixture(scope="session")
def postgres_server():
    from hy3d_pipeline_tests.services import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def mysql_server():
    from hy3d_pipeline_tests.services import MySQLServer

    with MySQLServer() as server:
        yield server


# every instance storage Dagster ships: SQLite and PostgreSQL through this project's storages (what
# `demo`/`dev`/`worker` write into dagster.yaml), MySQL (dagster-mysql's own)
STORAGES = ("sqlite", "postgres", "mysql")


@contextlib.contextmanager
def instance_on(kind: str, request, overrides: dict | None = None, folder=None):
    """A Dagster instance on `kind` storage, in a database of its own; `request` is the calling fixture's (SQLite
    takes a `folder` instead, or a temporary one)."""
    import tempfile

    from dagster import instance_for_test

    from hy3d_pipeline.fleet.instance import sqlite_storage

    name = f"t{uuid.uuid4().hex[:12]}"
    storage: dict = {}
    stack = contextlib.ExitStack()
    if kind == "sqlite":
        storage = sqlite_storage(folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="hy3d-dagster-")))
    elif kind == "postgres":
        url = request.getfixturevalue("postgres_server").database(name)
        storage = {section: {"module": "hy3d_pipeline.fleet.postgres", "class": cls, "config": {"postgres_url": url}}
                   for section, cls in (("run_storage", "RunStorage"), ("event_log_storage", "EventLogStorage"),
                                        ("schedule_storage", "ScheduleStorage"))}
    elif kind == "mysql":
        storage = {"storage": {"mysql": {"mysql_url": request.getfixturevalue("mysql_server").database(name)}}}
    else:
        raise ValueError(kind)
    with stack, instance_for_test(overrides={**storage, **(overrides or {})}) as inst:
        yield inst


def png_bytes(size=(96, 96), shape="disc", color=(200, 60, 40, 255)) -> bytes:
    """A small RGBA PNG of one drawn object on a transparent background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    w, h = size
    if shape == "disc":
        draw.ellipse((w * 0.15, h * 0.15, w * 0.85, h * 0.85), fill=color)
    else:
        draw.rectangle((w * 0.2, h * 0.3, w * 0.8, h * 0.7), fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """moto's server on loopback: the real SQS API (and S3 that sends event notifications to it), used where
    SeaweedFS has no counterpart; moto is a stand-in for AWS, not a mock inside our process."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def write_first_format_rows(instance, rows: dict[str, str], high: int) -> None:
    """Catalog rows as the first format wrote them (before keys had to fit MySQL): key `hy3d/images/<partition
    key>`, value `etag|tick[|attempts|state]`, and the highest tick; for the tests of an upgrade in place."""
    instance.run_storage.set_cursor_values({"hy3d/images-tick-high": str(high)})
    instance.run_storage.set_cursor_values({"hy3d/images/" + k: v for k, v in rows.items()})


class Ticker:
    """Evaluates the sensor like the daemon: records its partitions and events, and commits the cursor."""

    def __init__(self, instance):
        from hy3d_pipeline.definitions import build_defs

        self.instance, self.defs, self.cursor = instance, build_defs(), None

    def __call__(self, commit: bool = True):
        from hy3d_pipeline.embedded.demo import apply_sensor_records, tick

        data = tick(self.defs, self.instance, self.cursor)
        apply_sensor_records(self.instance, data)
        if commit:
            self.cursor = data.cursor
        return data

    def requested(self, data) -> list[str]:
        """Every partition key the tick's run requests cover, expanding ranges."""
        from hy3d_pipeline.images.partitions import RANGE_END_TAG, RANGE_START_TAG

        order = self.instance.get_dynamic_partitions("images")
        keys = []
        for r in data.run_requests:
            if r.partition_key:
                keys.append(r.partition_key)
            else:
                a, b = order.index(r.tags[RANGE_START_TAG]), order.index(r.tags[RANGE_END_TAG])
                keys.extend(order[a:b + 1])
        return keys


@pytest.fixture
def ticker(s3_env, instance):
    return Ticker(instance)


def put(s3, bucket, key, body=b"img"):
    s3.put_object(Bucket=bucket, Key=key, Body=body)


def put_many(s3, bucket, keys, threads: int = 16) -> None:
    """Upload one small object per key, concurrently: a burst as many clients would make it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: put(s3, bucket, k), keys))
