"""The fleet path against real parts: PostgreSQL and Redis from Debian's packages, real `hy3d-pipeline worker`
(Celery) processes, `hy3d-pipeline dev` for the webserver and daemon, and real SIGKILLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import ROOT, DevProcess, wait_for
from hy3d_pipeline_tests.services import PostgresServer, RedisServer


@pytest.fixture(scope="module")
def pg():
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


def test_postgresql_url_as_users_write_it(pg, s3_env, monkeypatch, tmp_path):
    """`postgresql://` (psycopg 3 to SQLAlchemy 2.1, which is not installed) works: the installed psycopg2 is
    used. Sensor ticks, a batched run with its checks, and the report all go through Postgres storage."""
    from dagster import AssetKey, DagsterInstance, materialize

    from hy3d_pipeline.fleet.instance import prepare_dagster_home
    from hy3d_pipeline_tests.conftest import Ticker

    monkeypatch.setenv("DAGSTER_PG_URL", pg.database("url_forms"))
    monkeypatch.setenv("HY3D_HOME", str(tmp_path / "home"))
    home = prepare_dagster_home()
    text = (home / "dagster.yaml").read_text()
    assert "{env: DAGSTER_PG_URL}" in text and pg.password not in text  # the file refers to the URL, never holds it
    storage = s3_env["server"]
    client = __import__("boto3").client("s3", endpoint_url=storage.endpoint_url, region_name="us-east-1",
                                        aws_access_key_id=storage.access_key, aws_secret_access_key=storage.secret_key)
    for i in range(3):
        client.put_object(Bucket=s3_env["bucket"], Key=f"pg/{i}.png", Body=png_bytes((64 + 8 * i, 64)))
    with DagsterInstance.get() as instance:
        assert type(instance.run_storage).__module__ == "hy3d_pipeline.fleet.postgres"
        ticker = Ticker(instance)
        data = ticker()
        assert sorted(ticker.requested(data)) == [f"pg/{i}.png" for i in range(3)]
        from hy3d_pipeline.models.assets import image_to_model

        request = data.run_requests[0]
        result = materialize([image_to_model], instance=instance, resources=ticker.defs.resources,
                             tags=request.tags, selection=request.asset_selection)
        assert result.success
        assert set(instance.get_materialized_partitions(AssetKey("models_3d"))) == {f"pg/{i}.png" for i in range(3)}
        assert not ticker().run_requests  # nothing new: the catalog rows live in Postgres too
        from hy3d_pipeline.report import collect

        entries = collect(instance, ticker.defs.resources["storage"], [f"pg/{i}.png" for i in range(3)])
        assert [e.status for e in entries] == ["ok"] * 3
        assert all(c["passed"] for e in entries for c in e.checks if c["name"] == "mesh_not_empty")


def _worker(folder: Path, env: dict[str, str], log: str) -> subprocess.Popen:
    out = open(folder / log, "w")
    return subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "worker", "--concurrency", "1"],
                            cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _models(s3, prefix: str) -> set[str]:
    found = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="hy3d-images", Prefix="models/" + prefix):
        found |= {o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".glb")}
    return found


def _upload(s3, prefix: str, n: int) -> set[str]:
    for i in range(n):
        s3.put_object(Bucket="hy3d-images", Key=f"{prefix}{i:02d}.png", Body=png_bytes((48 + 2 * i, 64), "box"))
    return {f"models/{prefix}{i:02d}.png.glb" for i in range(n)}


def _started_run_on(dev, prefix: str) -> dict:
    def find():
        for run in dev.runs():
            if run["status"] == "STARTED" and run["tags"].get("dagster/asset_partition_range_start", "").startswith(prefix):
                if run["tags"].get("hy3d/worker_run") == run["id"]:
                    return run
        return None
    return wait_for(find, 120, f"a started run for {prefix}", every=0.2)


def test_fleet_warm_workers_survive_sigkills(pg, redis_server, tmp_path):
    """Two `hy3d-pipeline worker` processes on Redis, Postgres storage, `dev` starting no worker of its own.
    Every model records the worker that made it; each worker process loads the generator once, whatever the
    number of runs. A pool process SIGKILLed mid-run and a whole worker SIGKILLed mid-run each cost only the run
    they held: it is marked failed, frees its `gpu` slot, is retried, and every image ends with a model."""
    folder = tmp_path / "fleet"
    env = {"DAGSTER_PG_URL": pg.database("warm_workers"), "HY3D_BROKER_URL": redis_server.url, "HY3D_GPU_SLOTS": "2",
           "HY3D_BATCH_SIZE": "12", "HY3D_MAX_BATCH_SIZE": "12", "HY3D_GENERATOR": "extrude"}
    with DevProcess(folder, sensor_interval=2, env=env) as dev:
        assert "runs wait for `hy3d-pipeline worker`" in dev.log_path.read_text()
        worker_env = {**dev.env, **dev.s3_env(), "PYTHONPATH": str(ROOT)}
        workers = [_worker(folder, worker_env, f"worker{i}.log") for i in range(2)]
        try:
            s3 = dev.s3_client()
            wait_for(lambda: _models(s3, "samples/") and len(_models(s3, "samples/")) == 5, 180, "the samples' models")

            # a pool process killed mid-run: Celery fails its task, monitoring fails the run, a retry redoes it
            wanted = _upload(s3, "a/", 12)
            run = _started_run_on(dev, "a/")
            host, _, pid = run["tags"]["hy3d/worker"].rpartition(":")
            wait_for(lambda: _models(s3, "a/"), 60, "the first model of the batch", every=0.1)
            os.kill(int(pid), signal.SIGKILL)
            wait_for(lambda: _models(s3, "a/") == wanted, 240, "every model of batch a")

            # a whole worker killed mid-run (master and pool): the run goes to the other worker
            wanted_b = _upload(s3, "b/", 12)
            run_b = _started_run_on(dev, "b/")
            pid_b = int(run_b["tags"]["hy3d/worker"].rpartition(":")[2])
            victim = next(w for w in workers if pid_b in {c.pid for c in __import__("psutil").Process(w.pid).children()})
            wait_for(lambda: _models(s3, "b/"), 60, "the first model of batch b", every=0.1)
            os.killpg(victim.pid, signal.SIGKILL)
            wait_for(lambda: _models(s3, "b/") == wanted_b, 300, "every model of batch b")

            # nothing left hanging: every run ends (a retry may still be recording its checks)
            runs = wait_for(lambda: (r := dev.runs()) and all(x["status"] in ("SUCCESS", "FAILURE") for x in r) and r,
                            120, "every run to end")
            killed = {r["id"]: r["status"] for r in runs if r["id"] in (run["id"], run_b["id"])}
            assert killed == {run["id"]: "FAILURE", run_b["id"]: "FAILURE"}, killed
            retried = {r["tags"].get("dagster/parent_run_id") for r in runs}
            assert {run["id"], run_b["id"]} <= retried  # each killed run was retried by Dagster's run retries
            materialized = dev.materializations()
            loads = {m["worker"]: m["generator_loads"] for m in materialized}
            assert all(v == 1 for v in loads.values()), loads  # one load per worker process, however many runs
            per_worker = Counter(m["worker"] for m in materialized)
            assert len(per_worker) >= 2, per_worker
        finally:
            for w in workers:
                if w.poll() is None:
                    os.killpg(w.pid, signal.SIGTERM)
                    try:
                        w.wait(20)
                    except subprocess.TimeoutExpired:
                        os.killpg(w.pid, signal.SIGKILL)


def test_worker_warm_up_loads_the_generator_or_says_why_not(monkeypatch):
    """What each pool process runs as it starts (fleet.workers._warm_up's thread): a load that fails is said in
    the worker's log and does not stop the process; the first run then loads again and reports the error."""
    from hy3d_pipeline.fleet.workers import warm_generator
    from hy3d_pipeline.models.generators import base

    said: list[str] = []
    monkeypatch.setenv("HY3D_GENERATOR", "extrude")
    before = base.total_loads
    assert warm_generator(out=lambda m, **_: said.append(m)) is True
    assert "generator 'extrude' loaded in" in said[-1] and base.total_loads in (before, before + 1)
    monkeypatch.setenv("HY3D_GENERATOR", "no-such-backend")
    assert warm_generator(out=lambda m, **_: said.append(m)) is False
    assert "generator not loaded at start (the first run will try again)" in said[-1]
    assert "no-such-backend" in said[-1]
