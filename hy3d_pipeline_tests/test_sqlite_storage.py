"""hy3d_pipeline.fleet.sqlite: the SQLite storages `demo`/`dev`/`worker` write into dagster.yaml keep their database
engines, on the same files as Dagster's own classes.

Connections are counted with SQLAlchemy's `connect` event on every engine: Dagster's classes open a new DB-API
connection for each operation, ours one per file, and the count is what a regression back to per-operation
engines would change."""

from __future__ import annotations

import os

import pytest
import yaml
from dagster import AssetKey
from sqlalchemy import event
from sqlalchemy.engine import Engine

from hy3d_pipeline.fleet.instance import instance_yaml, sqlite_storage


class _Connects:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *_args) -> None:
        self.count += 1

    def __enter__(self):
        event.listen(Engine, "connect", self)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(Engine, "connect", self)


def _home(folder, ours: bool):
    from dagster import DagsterInstance

    folder.mkdir(parents=True, exist_ok=True)
    config = {"telemetry": {"enabled": False}, **(sqlite_storage(folder) if ours else {})}
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config))
    return DagsterInstance.from_config(str(folder))


def _materialize(instance, keys):
    from dagster import AssetMaterialization, asset, materialize

    @asset
    def many(context):
        for k in keys:
            context.log.info(f"image {k}")
            context.log_event(AssetMaterialization("many_images", partition=k))
        return len(keys)

    return materialize([many], instance=instance)


def test_generated_home_uses_the_kept_engine_classes_on_dagsters_files(tmp_path):
    from dagster import DagsterInstance

    from hy3d_pipeline.fleet import sqlite

    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(instance_yaml(home, launcher="default"))
    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage) is sqlite.RunStorage
        assert type(instance.event_log_storage) is sqlite.EventLogStorage
        assert type(instance.schedule_storage) is sqlite.ScheduleStorage
        run_id = _materialize(instance, ["a", "b"]).run_id
    # Dagster's default layout: the same files (runs.db, a shard per run, index.db, schedules.db)
    assert (home / "history" / "runs.db").exists() and (home / "history" / "runs" / f"{run_id}.db").exists()
    assert (home / "history" / "runs" / "index.db").exists() and (home / "schedules" / "schedules.db").exists()

    # ...which Dagster's own classes read as their own: a home keeps its history either way
    (home / "dagster.yaml").write_text(yaml.safe_dump({"telemetry": {"enabled": False}}))
    with DagsterInstance.from_config(str(home)) as plain:
        assert type(plain.event_log_storage).__module__.startswith("dagster.")
        assert plain.get_run_by_id(run_id).is_success
        records = plain.fetch_materializations(AssetKey("many_images"), limit=10).records
        assert sorted(r.partition_key for r in records) == ["a", "b"]
        second = _materialize(plain, ["c"]).run_id
    with _home(home, ours=True) as instance:
        assert instance.get_run_by_id(second).is_success
        assert len(instance.fetch_materializations(AssetKey("many_images"), limit=10).records) == 3


def test_events_reuse_connections_where_dagsters_classes_open_one_per_operation(tmp_path):
    keys = [f"k{i}" for i in range(20)]
    counts = {}
    for ours in (False, True):
        with _home(tmp_path / str(ours), ours) as instance:
            _materialize(instance, keys[:1])  # tables made, code warm: count a run's own operations
            with _Connects() as connects:
                run = _materialize(instance, keys)
            assert run.success
            assert len(instance.fetch_materializations(AssetKey("many_images"),
                                                       limit=100).records) == 21
        counts[ours] = connects.count
    # a run of 20 images: 40+ events; Dagster's classes connect for each (101 here), ours once per file the run
    # touches (2: its shard; the index and runs were open already)
    assert counts[False] > 50, counts
    assert counts[True] <= 4, counts


def test_run_shard_engines_are_bounded_and_wipe_still_deletes_their_files(tmp_path):
    from hy3d_pipeline.fleet.sqlite import KEPT_SHARDS

    with _home(tmp_path, ours=True) as instance:
        runs = [_materialize(instance, [f"k{i}"]).run_id for i in range(KEPT_SHARDS + 4)]
        kept = instance.event_log_storage._kept._engines
        assert len(kept) <= KEPT_SHARDS + 1  # the run shards most recently used, and the index
        # an engine let go is reopened on demand: the oldest run's events still read
        assert any(r.dagster_event and r.dagster_event.is_successful_output
                   for r in instance.all_logs(runs[0]))
        instance.event_log_storage.wipe()
        assert not [p for p in (tmp_path / "history" / "runs").glob("*.db") if p.name != "index.db"]
        assert _materialize(instance, ["after"]).success  # and the storage goes on afterwards


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_opens_its_own_connections_and_the_parents_go_on(tmp_path):


    with _home(tmp_path, ours=True) as instance:
        assert _materialize(instance, ["parent-1"]).success  # the parent holds open connections now
        pid = os.fork()
        if pid == 0:  # the child: what a Celery pool process does after the worker forks
            code = 1
            try:
                code = 0 if _materialize(instance, ["child"]).success else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _materialize(instance, ["parent-2"]).success
        keys = {r.partition_key for r in instance.fetch_materializations(AssetKey("many_images"), limit=10).records}
        assert keys == {"parent-1", "child", "parent-2"}


def test_dagster_tests_own_instance_fixture_is_ours(instance):
    """The suite's `instance` fixture is this storage, so every pipeline test runs on it."""
    assert type(instance.event_log_storage).__module__ == "hy3d_pipeline.fleet.sqlite"
