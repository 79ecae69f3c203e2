"""Every wrapper of `hy3d_pipeline.dagster_private` against real Dagster instances (SQLite, and PostgreSQL and
MySQL servers where the wrapper is about storage), so a Dagster upgrade that changes a private API we use fails
the test named for it. Also: no other module of the package uses a private Dagster API."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSpec,
    AssetKey,
    AssetRecordsFilter,
    DagsterInstance,
    Definitions,
    DynamicPartitionsDefinition,
    Output,
    RunRequest,
    SensorResult,
    SkipReason,
    asset,
    build_sensor_context,
    instance_for_test,
    materialize,
    sensor,
)

from hy3d_pipeline import dagster_private as private
from hy3d_pipeline_tests.conftest import STORAGES, instance_on

PACKAGE = Path(private.__file__).parent


@pytest.fixture(scope="module", params=STORAGES)
def any_instance(request):
    with instance_on(request.param, request) as inst:
        yield inst


# --- key-value table ------------------------------------------------------------------------------------------

def test_kv_new_and_existing_keys_in_one_call(any_instance):
    a, b = f"t/{uuid.uuid4().hex}", f"t/{uuid.uuid4().hex}"
    private.kv_set(any_instance, {a: "1"})
    private.kv_set(any_instance, {a: "2", b: "3"})  # Dagster's own call alone drops b on SQLite and Postgres
    assert private.kv_get(any_instance, [a, b, "t/absent"]) == {a: "2", b: "3"}


def test_kv_many_rows_and_large_batches(any_instance):
    tag = uuid.uuid4().hex[:8]
    small = {f"{tag}/{i}": str(i) for i in range(1_200)}  # more keys than one SQLite statement takes
    large = {f"{tag}/big/{i}": chr(65 + i) * 60_000 for i in range(40)}  # 2.4 MB: several writes on MySQL too
    private.kv_set(any_instance, {**small, **large})
    assert private.kv_get(any_instance, [*small, *large]) == {**small, **large}


# --- dynamic partitions ---------------------------------------------------------------------------------------

def test_partitions_query_reads_dagsters_table(any_instance):
    """The one-query lookup itself (not its key-by-key fallback) agrees with the public API."""
    name = f"p{uuid.uuid4().hex[:8]}"
    keys = [f"k{i}.png" for i in range(600)]  # more than one query's worth
    any_instance.add_dynamic_partitions(name, keys[::3])
    probe = keys + ["odd...key.png", "absent.png"]
    public = [k for k in probe if any_instance.has_dynamic_partition(name, k)]
    assert private.partitions_by_query(any_instance, name, probe) == set(public)
    assert private.existing_dynamic_partitions(any_instance, name, probe) == public
    assert len(public) == 200


# --- asset checks ---------------------------------------------------------------------------------------------

things = DynamicPartitionsDefinition(name="things")


@asset(partitions_def=things, check_specs=[AssetCheckSpec("positive", asset="thing", partitions_def=things)])
def thing(context):
    """As models_3d records its verdicts: evaluations naming the materialization just made, per partition."""
    yield Output(1)
    record = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("thing"), asset_partitions=[context.partition_key]), limit=1).records[0]
    yield AssetCheckEvaluation(asset_key=AssetKey("thing"), check_name="positive", partition=context.partition_key,
                               passed=context.partition_key == "good",
                               target_materialization_data=private.check_target(record))
    [(name, _spec)] = context.assets_def.check_specs_by_output_name.items()
    yield Output(None, output_name=name)


def test_check_verdicts_per_partition_name_their_materialization(any_instance):
    any_instance.add_dynamic_partitions("things", ["good", "bad"])
    for key in ("good", "bad", "good"):
        assert materialize([thing], instance=any_instance, partition_key=key).success
    check = AssetCheckKey(AssetKey("thing"), "positive")
    latest = {}
    for key in ("good", "bad"):
        [(found, record)] = private.latest_check_executions(any_instance, [check], key).items()
        assert found == check
        latest[key] = record
    assert latest["good"].evaluation.passed and not latest["bad"].evaluation.passed
    newest_good = any_instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("thing"), asset_partitions=["good"]), limit=1).records[0]
    assert latest["good"].evaluation.target_materialization_data.storage_id == newest_good.storage_id
    assert private.latest_check_executions(any_instance, [check], "never") == {}


# --- sensors and backfills ------------------------------------------------------------------------------------

pictures = DynamicPartitionsDefinition(name="pictures")


@asset(partitions_def=pictures)
def picture():
    return 1


@sensor(asset_selection=[picture])
def adds_and_requests(context):
    return SensorResult(run_requests=[RunRequest(run_key="r1", partition_key="new.png")], cursor="c2",
                        dynamic_partitions_requests=[pictures.build_add_request(["new.png"])])


@sensor(asset_selection=[picture])
def skips(context):
    context.update_cursor("moved")
    return SkipReason("nothing new")


@sensor(asset_selection=[picture])
def requests_unknown_partition(context):
    return SensorResult(run_requests=[RunRequest(run_key="r2", partition_key="never-added.png")])


def test_evaluate_sensor_is_the_daemons_view():
    defs = Definitions(assets=[picture], sensors=[adds_and_requests, skips, requests_unknown_partition])
    with instance_for_test() as instance:
        def evaluate(name):
            context = build_sensor_context(instance=instance, definitions=defs, cursor="c1",
                                           instance_ref=instance.get_ref())
            return private.evaluate_sensor(defs.resolve_sensor_def(name), context)

        data = evaluate("adds_and_requests")
        [request] = data.run_requests
        assert (request.partition_key, request.tags["dagster/sensor_name"]) == ("new.png", "adds_and_requests")
        assert data.cursor == "c2" and data.skip_message is None
        assert [list(r.partition_keys) for r in data.dynamic_partitions_requests] == [["new.png"]]
        skipped = evaluate("skips")
        assert (skipped.run_requests, skipped.cursor, skipped.skip_message) == ([], "moved", "nothing new")
        with pytest.raises(Exception, match="never-added.png"):  # what the daemon would refuse, refused here
            evaluate("requests_unknown_partition")


def test_backfill_partition_keys(instance):
    from dagster._core.execution.backfill import PartitionBackfill

    from hy3d_pipeline.definitions import build_defs

    graph = build_defs().resolve_asset_graph()
    instance.add_dynamic_partitions("images", ["a.png", "b.png", "c.png"])
    instance.add_backfill(PartitionBackfill.from_asset_partitions(
        backfill_id="bf", asset_graph=graph, partition_names=["c.png", "a.png"],
        asset_selection=[AssetKey("models_3d")], backfill_timestamp=time.time(), tags={}, dynamic_partitions_store=instance, all_partitions=False, title=None,
        description=None, run_config=None))
    assert private.backfill_partition_keys(instance, "bf", graph) == ["a.png", "c.png"]
    assert private.backfill_partition_keys(instance, "no-such-backfill", graph) is None


# --- runs: retries, launchers, pools --------------------------------------------------------------------------

@asset
def fails():
    raise RuntimeError("fails on purpose")


@pytest.mark.parametrize("on_failure", [True, False])
def test_will_retry_tag_is_what_run_retries_set(on_failure):
    overrides = {"run_retries": {"enabled": True, "max_retries": 1, "retry_on_asset_or_op_failure": on_failure}}
    with instance_for_test(overrides=overrides) as instance:
        result = materialize([fails], instance=instance, raise_on_error=False)
        assert not result.success
        assert instance.get_run_by_id(result.run_id).tags[private.WILL_RETRY_TAG] == str(on_failure).lower()


def test_launcher_instance_and_health_check(tmp_path):
    """WorkerRunLauncher, loaded by an instance as dagster.yaml names it, reaches its instance and answers run
    monitoring's health check with Dagster's own result types."""
    from hy3d_pipeline.fleet import liveness
    from hy3d_pipeline.fleet.launcher import WorkerRunLauncher

    launcher = {"module": "hy3d_pipeline.fleet.launcher", "class": "WorkerRunLauncher",
                "config": {"local_folder": str(tmp_path / "workers")}}
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        assert isinstance(instance.run_launcher, WorkerRunLauncher)
        assert private.launcher_instance(instance.run_launcher) is instance
        run = instance.get_run_by_id(materialize([picture_free], instance=instance).run_id)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        for pid, status in ((os.getpid(), private.WorkerStatus.RUNNING), (gone.pid, private.WorkerStatus.FAILED)):
            instance.add_run_tags(run.run_id, {liveness.WORKER_TAG: liveness.worker_id(pid),
                                               liveness.WORKER_RUN_TAG: run.run_id})
            result = instance.run_launcher.check_run_worker_health(instance.get_run_by_id(run.run_id))
            assert isinstance(result, private.CheckRunHealthResult) and result.status == status


@asset
def picture_free():
    return 1


@pytest.mark.parametrize("kind", STORAGES)
def test_pool_wrappers(kind, request):
    with instance_on(kind, request, {"concurrency": {"pools": {"default_limit": 3}}}) as instance:
        pools = private.pool_limits(instance)
        if kind == "mysql" and pools is None:
            pytest.skip("this dagster-mysql has no global concurrency limits")
        assert pools is not None
        pool = f"pool-{uuid.uuid4().hex[:8]}"
        private.init_pool_to_default(instance, pool)
        made = private.pool_limits(instance)[pool]
        assert (made.limit, made.from_default) == (3, True)
        private.set_pool_slots(instance, pool, 5)
        assert private.pool_limits(instance)[pool].limit == 5
        instance.event_log_storage.claim_concurrency_slot(pool, "run-1", "step")
        assert instance.event_log_storage.get_concurrency_info(pool).active_slot_count == 1
        private.free_pool_slots_for_run(instance, "run-1")
        assert instance.event_log_storage.get_concurrency_info(pool).active_slot_count == 0


def test_pooled_postgres_storage(request):
    """The storages `demo`/`dev`/`worker` write into dagster.yaml keep one pooled connection each."""
    from sqlalchemy.pool import QueuePool

    with instance_on("postgres", request) as instance:
        for storage in (instance.run_storage, instance.event_log_storage, instance.schedule_storage):
            assert type(storage).__module__ == "hy3d_pipeline.fleet.postgres"
            assert isinstance(storage._engine.pool, QueuePool) and storage._engine.pool.size() == 1
        private.kv_set(instance, {"pooled": "yes"})
        assert private.kv_get(instance, ["pooled"]) == {"pooled": "yes"}


def test_postgres_events_stored_without_notify(request):
    """Our Postgres event log sends no NOTIFY (dagster-postgres's sends one after every event, a commit of its own),
    and what it stores is whole: events, the asset's latest materialization, check verdicts, and a watcher (the
    webserver's live run view, which polls) still sees new events."""
    import threading

    from dagster import DagsterEventType, EventLogEntry
    from dagster_postgres.event_log import PostgresEventLogStorage
    from sqlalchemy import event as sqlalchemy_event

    def statements_of(storage) -> list[str]:
        seen: list[str] = []
        sqlalchemy_event.listen(storage._engine, "before_cursor_execute",
                                lambda conn, cursor, statement, *rest: seen.append(statement))
        return seen

    def log_entry(run_id: str, message: str) -> EventLogEntry:
        return EventLogEntry(error_info=None, level="INFO", user_message=message, run_id=run_id,
                             timestamp=time.time())

    with instance_on("postgres", request) as instance:
        storage = instance.event_log_storage
        ours = statements_of(storage)
        instance.add_dynamic_partitions("things", ["good", "bad"])
        for key in ("good", "bad"):
            result = materialize([thing], instance=instance, partition_key=key)
            assert result.success
        assert ours and not [s for s in ours if "NOTIFY" in s.upper()]
        stored = instance.get_records_for_run(result.run_id).records
        assert any(r.event_log_entry.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION for r in stored)
        latest = instance.get_latest_materialization_event(AssetKey("thing"))
        assert latest is not None and latest.run_id == result.run_id
        check = AssetCheckKey(AssetKey("thing"), "positive")
        assert not private.latest_check_executions(instance, [check], "bad")[check].evaluation.passed
        assert instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("thing"), asset_partitions=["good"]), limit=1).records

        seen, arrived = [], threading.Event()

        def watcher(entry, cursor):
            seen.append(entry.user_message)
            arrived.set()

        storage.watch("watched-run", None, watcher)
        try:
            storage.store_event(log_entry("watched-run", "after the watch began"))
            assert arrived.wait(30), "the polling watcher never saw the new event"
            assert seen == ["after the watch began"]
        finally:
            storage.end_watch("watched-run", watcher)

        # the same write through dagster-postgres's own class sends the NOTIFY this test looks for
        stock = PostgresEventLogStorage(storage.postgres_url, should_autocreate_tables=False)
        try:
            theirs = statements_of(stock)
            stock.store_event(log_entry("stock-run", "hello"))
            assert [s for s in theirs if "NOTIFY" in s.upper()]
        finally:
            stock.dispose()


# --- the rest of the instance API we call, and nothing private elsewhere ---------------------------------------

INSTANCE_CALLS = {  # DagsterInstance members we use outside this module, not marked @public: name -> arguments
    "add_run_tags": ("run_id", "new_tags"),
    "report_run_failed": ("dagster_run", "message"),
    "get_records_for_run": ("run_id", "of_type", "limit"),
    "get_runs": ("filters", "cursor", "limit"),
    "get_run_records": ("filters",),
    "get_ref": (),
    "run_launcher": None,  # properties
    "root_directory": None,
    "run_monitoring_enabled": None,
}


@pytest.mark.parametrize("name", sorted(INSTANCE_CALLS))
def test_instance_members_we_call_exist(name):
    member = inspect.getattr_static(DagsterInstance, name)
    if INSTANCE_CALLS[name] is None:
        assert isinstance(member, property)
    else:
        assert set(INSTANCE_CALLS[name]) <= set(inspect.signature(member).parameters)


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.startswith("dagster._") or node.module.startswith("dagster_postgres.utils")):
            found.append(f"line {node.lineno}: from {node.module} import")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name.startswith("dagster._")]
        elif isinstance(node, ast.Attribute) and node.attr in {
                "run_storage", "event_log_storage", "evaluate_tick", "get_cursor_values", "set_cursor_values",
                "optimize_for_webserver", "get_backfill"}:
            found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "_instance" and not (
                isinstance(node.value, ast.Name) and node.value.id == "self" and path.name != "launcher.py"):
            found.append(f"line {node.lineno}: ._instance")
    return found


def test_no_private_dagster_api_outside_its_module():
    uses = {str(p.relative_to(PACKAGE)): _private_uses(p) for p in PACKAGE.rglob("*.py")
            if p.name != "dagster_private.py"}
    assert {p: u for p, u in uses.items() if u} == {}
    assert _private_uses(PACKAGE / "dagster_private.py")  # the scan does see them where they are


def test_sqlite_storages_have_what_fleet_sqlite_overrides(tmp_path):
    """fleet/sqlite.py replaces these of Dagster's SQLite classes (test_sqlite_storage.py runs them for real)."""
    runs, events, schedules, busy_timeout = private.sqlite_storages()
    for cls in (runs, schedules):
        assert callable(cls.from_local) and callable(cls.connect)
        assert cls.from_local(str(tmp_path / cls.__name__))._conn_string.startswith("sqlite:///")
    for name in ("_connect", "_initdb", "has_table", "wipe", "conn_string_for_shard", "dispose"):
        assert callable(getattr(events, name)), name
    storage = events(str(tmp_path / "events"))
    assert isinstance(storage._initialized_dbs, set) and hasattr(storage._db_lock, "acquire")
    assert list(inspect.signature(events._connect).parameters) == ["self", "shard"]
    assert busy_timeout > 0
