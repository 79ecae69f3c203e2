"""Every Dagster API we use that Dagster does not promise to keep, in this one module.

Dagster's public API is what `dagster` exports and marks `@public`; modules under `dagster._*`, and the storages
reached through `instance.run_storage` / `instance.event_log_storage`, change without notice. Each use below has no
public equivalent (said for each); it is wrapped in a function named for what we need, and
`hy3d_pipeline_tests/test_dagster_private.py` exercises every wrapper against real instances (SQLite, and
PostgreSQL and MySQL where it is about storage), so a Dagster upgrade that changes one fails a test named for it
instead of a sensor tick in production. No other module of the package imports `dagster._*` or reaches into an
instance's storages: a test reads the package's source and fails if one does.

Each wrapper, what it uses, and why (the public API that is missing):
- `kv_get`, `kv_set`, `kv_key`: run storage `get_cursor_values` / `set_cursor_values` (the `kvs` table). The
  sensor's per-image rows (what it requested, client submissions, pending SQS deletes) are too big for a sensor
  cursor; Dagster has no public key-value API.
- `partitions_by_query`, `existing_dynamic_partitions`: `DynamicPartitionsTable`, `db_select`, the event log's
  `index_connection`. Which of N keys are partitions in one query; `has_dynamic_partition` costs a query (a
  connection on SQLite) per key.
- `check_target`: `AssetCheckEvaluationTargetMaterializationData`. Ties a partitioned check verdict to the
  materialization it judged (else the UI shows it stale); `AssetCheckResult` does that itself but takes no
  partition.
- `latest_check_executions`: the event log's `get_latest_asset_check_execution_by_key`, `PartitionKeyFilter`. A
  partition's latest verdicts; `instance.get_latest_asset_check_evaluation_record` is not public either and takes
  no partition.
- `evaluate_sensor`: `SensorDefinition.evaluate_tick`. A tick as the daemon evaluates it (run requests resolved
  and validated, sensor tags added), for `demo` and the tests; calling the sensor (public) returns its raw result.
- `backfill_partition_keys`: `instance.get_backfill`, `PartitionBackfill`, asset backfill data. The partitions a
  backfill targets (`report --backfill`); only the GraphQL API of a running webserver says so publicly.
- `WILL_RETRY_TAG`: `dagster._core.storage.tags`. The tag run retries set on a failed run; no public constant.
- `CheckRunHealthResult`, `WorkerStatus`, `launcher_instance`: `dagster._core.launcher`, `RunLauncher._instance`.
  A run launcher's answer to run monitoring; `RunLauncher` itself is not public.
- `pool_limits`, `init_pool_to_default`, `set_pool_slots`, `free_pool_slots_for_run`: the event log's concurrency
  methods. Create or resize the `gpu` pool, free a dead run's slots; only the `dagster instance concurrency` CLI
  does it publicly.
- `pooled_postgres_storage`: dagster-postgres's constructors, `dagster_postgres.utils`, `optimize_for_webserver`.
  One pooled connection per storage outside the webserver; there is no setting for it.
- `KnownTables`: an event log storage's `has_table`, asked before many writes (each asset event's tags): on
  Postgres it opened a second connection beside the pooled one for every such event. A table once there stays.
- `WithoutNotify`: `SqlEventLogStorage.store_event`, the generic SQL write of an event, in place of
  dagster-postgres's copy of it, which adds `NOTIFY run_events` after every insert. Dagster 1.13 watches a run's
  events by polling (`SqlPollingEventWatcher`); the NOTIFY is kept, its comment says, for older webservers. Under
  autocommit it is a transaction of its own: a second commit, a WAL flush, for every event. No setting drops it.
- `sqlite_storages`: Dagster's SQLite run, event log and schedule storages (`dagster._core.storage.*`) and their
  busy timeout (imported when called: they cost half a second, which `import hy3d_pipeline` must not pay).
  fleet/sqlite.py subclasses them to keep their database engines (they create one per operation); no setting or
  public class does it.

Key-value limits (`KV_KEY_MAX`, `KV_VALUE_MAX`): the `kvs` table is the same on every instance storage, but on
MySQL its unique index covers only a key's first 64 characters (two longer keys that share them are one row) and
`value` is TEXT (65,535 bytes). `kv_set` refuses keys and values beyond those on every storage, so SQLite and
Postgres runs catch what MySQL would corrupt.

DagsterInstance methods we call elsewhere that are not marked `@public` but are the instance's ordinary API
(`add_run_tags`, `report_run_failed`, `get_records_for_run`, `get_runs`, `get_run_records`, `run_launcher`,
`get_ref`, `root_directory`, `run_monitoring_enabled`): the same test module checks each still exists with the
arguments we pass. dagster-celery's extension points (`CeleryRunLauncher`, `make_app`, `create_execute_job_task`,
`DEFAULT_CONFIG`, `DAGSTER_CELERY_TASK_ID_TAG`) are exercised end to end by test_fleet.py.

The one private API of another library, botocore's `client._endpoint.http_session` (the fast bucket listing sends
its presigned requests through the client's own HTTP session), is kept with the listing in `s3/listing.py`
(`http_session`), tested in test_s3_resource.py: it is botocore's, upgraded separately.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.tags import WILL_RETRY_TAG

__all__ = [
    "KV_KEY_MAX", "KV_VALUE_MAX", "CheckRunHealthResult", "WILL_RETRY_TAG", "WorkerStatus",
    "backfill_partition_keys", "check_target", "evaluate_sensor", "existing_dynamic_partitions",
    "free_pool_slots_for_run", "init_pool_to_default", "kv_get", "kv_key", "kv_set", "latest_check_executions",
    "launcher_instance", "partitions_by_query", "pool_limits", "pooled_postgres_storage", "set_pool_slots",
    "KnownTables", "WithoutNotify", "sqlite_storages",
]

# --- the instance's key-value table -------------------------------------------------------------------------

KV_KEY_MAX = 64  # characters: MySQL's unique index on kvs.key covers this many
KV_VALUE_MAX = 65_535  # bytes (UTF-8): MySQL's TEXT
_KV_KEYS_PER_QUERY = 500  # under SQLite's bound-variable limit on every version
_KV_BYTES_PER_WRITE = 1 << 20  # well under MySQL's max_allowed_packet (16 MiB on MariaDB, 64 MiB on MySQL 8)


def _check_kv(key: str, value: str) -> None:
    if len(key) > KV_KEY_MAX:
        raise ValueError(f"key-value key {key[:80]!r} is {len(key)} characters; at most {KV_KEY_MAX} are unique "
                         "on every Dagster instance storage (MySQL indexes only that many)")
    if len(value.encode()) > KV_VALUE_MAX:
        raise ValueError(f"key-value value of {key!r} is {len(value.encode())} bytes; at most {KV_VALUE_MAX} fit "
                         "on every Dagster instance storage (MySQL TEXT)")


def kv_key(prefix: str, name: str) -> str:
    """A key for `name` (any length: an S3 key, a partition key) that fits KV_KEY_MAX: `prefix` + the 43
    characters of its SHA-256 (base64url). Keep `name` in the value and check it on read."""
    digest = hashlib.sha256(name.encode()).digest()
    key = prefix + base64.urlsafe_b64encode(digest).decode().rstrip("=")
    if len(key) > KV_KEY_MAX:
        raise ValueError(f"key-value prefix {prefix!r} is too long: {KV_KEY_MAX - 43} characters at most")
    return key


def kv_get(instance, keys: Iterable[str]) -> dict[str, str]:
    """key -> value for those of `keys` that have a row in the instance's key-value table. Keys past
    KV_KEY_MAX are read back whole on every storage (rows written before the limit was kept)."""
    keys = list(dict.fromkeys(keys))
    found: dict[str, str] = {}
    for i in range(0, len(keys), _KV_KEYS_PER_QUERY):
        found.update(instance.run_storage.get_cursor_values(set(keys[i:i + _KV_KEYS_PER_QUERY])))
    return found


def kv_set(instance, pairs: Mapping[str, str]) -> None:
    """Insert or replace rows. Dagster's SQL storages insert every pair and, on a conflict, only update: new and
    existing keys given together would lose the new ones, so they are written apart. Batches stay under
    `_KV_KEYS_PER_QUERY` keys and `_KV_BYTES_PER_WRITE` bytes."""
    for key, value in pairs.items():
        _check_kv(key, value)
    existing = set(kv_get(instance, pairs))
    fresh = {k: v for k, v in pairs.items() if k not in existing}
    for group in (fresh, {k: v for k, v in pairs.items() if k in existing}):
        batch: dict[str, str] = {}
        size = 0
        for key, value in group.items():
            cost = len(key) + len(value.encode())
            if batch and (len(batch) >= _KV_KEYS_PER_QUERY or size + cost > _KV_BYTES_PER_WRITE):
                instance.run_storage.set_cursor_values(batch)
                batch, size = {}, 0
            batch[key] = value
            size += cost
        if batch:
            instance.run_storage.set_cursor_values(batch)


# --- dynamic partitions ---------------------------------------------------------------------------------------


def partitions_by_query(instance, partitions_def_name: str, keys: Sequence[str]) -> set[str]:
    """Which of `keys` are partitions of `partitions_def_name`, one query per 500 keys, read from Dagster's own
    table. Raises ImportError/AttributeError where Dagster or the storage has no such table."""
    from dagster._core.storage.event_log.schema import DynamicPartitionsTable
    from dagster._core.storage.sqlalchemy_compat import db_select

    storage = instance.event_log_storage
    table = DynamicPartitionsTable
    found: set[str] = set()
    for i in range(0, len(keys), _KV_KEYS_PER_QUERY):
        chunk = keys[i:i + _KV_KEYS_PER_QUERY]
        query = db_select([table.c.partition]).where(
            (table.c.partitions_def_name == partitions_def_name) & table.c.partition.in_(chunk))
        with storage.index_connection() as conn:
            found.update(row[0] for row in conn.execute(query).fetchall())
    return found


def existing_dynamic_partitions(instance, partitions_def_name: str, keys: Sequence[str]) -> list[str]:
    """Those of `keys` (in their order) that are partitions; key by key through the public API where the
    storage is not SQL."""
    try:
        found = partitions_by_query(instance, partitions_def_name, keys)
    except (ImportError, AttributeError):
        return [k for k in keys if instance.has_dynamic_partition(partitions_def_name, k)]
    return [k for k in keys if k in found]


# --- asset checks ---------------------------------------------------------------------------------------------


def check_target(record) -> AssetCheckEvaluationTargetMaterializationData:
    """What an AssetCheckEvaluation names as the materialization it judged, from that materialization's
    EventLogRecord (`instance.fetch_materializations(...).records[i]`)."""
    return AssetCheckEvaluationTargetMaterializationData(
        storage_id=record.storage_id, run_id=record.run_id, timestamp=record.timestamp)


def latest_check_executions(instance, check_keys: Sequence[Any], partition: str) -> dict:
    """AssetCheckKey -> the latest AssetCheckExecutionRecord for `partition`, for the keys that have one."""
    from dagster._core.event_api import PartitionKeyFilter

    return dict(instance.event_log_storage.get_latest_asset_check_execution_by_key(
        list(check_keys), partition_filter=PartitionKeyFilter(key=partition)))


# --- sensors and backfills ------------------------------------------------------------------------------------


def evaluate_sensor(sensor_def, context):
    """One tick as the daemon evaluates it: SensorExecutionData with `run_requests` (resolved, validated, with
    Dagster's sensor tags), `cursor`, `dynamic_partitions_requests`, `asset_events` and `skip_message`."""
    return sensor_def.evaluate_tick(context)


def backfill_partition_keys(instance, backfill_id: str, asset_graph) -> list[str] | None:
    """The partition keys backfill `backfill_id` targets, on any of its assets (None when there is no such
    backfill)."""
    backfill = instance.get_backfill(backfill_id)
    if backfill is None:
        return None
    if not backfill.is_asset_backfill:
        return list(backfill.partition_names or [])
    data = backfill.get_asset_backfill_data(asset_graph)
    keys: set[str] = set()
    for subset in data.target_subset.partitions_subsets_by_asset_key.values():
        keys.update(subset.get_partition_keys())
    return sorted(keys)


# --- run launchers and concurrency pools ----------------------------------------------------------------------


def launcher_instance(launcher):
    """The instance a run launcher was loaded for (Dagster registers it after construction)."""
    return launcher._instance


def pool_limits(instance) -> dict[str, Any] | None:
    """pool name -> PoolLimit (`limit`, `from_default`) for pools that have a row; None where the storage has no
    global concurrency limits."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return None
    return {pool.name: pool for pool in storage.get_pool_limits()}


def init_pool_to_default(instance, pool: str) -> None:
    """Create `pool`'s row with the instance's `concurrency.pools.default_limit`."""
    instance.event_log_storage.initialize_concurrency_limit_to_default(pool)


def set_pool_slots(instance, pool: str, slots: int) -> None:
    instance.event_log_storage.set_concurrency_slots(pool, slots)


def free_pool_slots_for_run(instance, run_id: str) -> None:
    """Free the pool slots a run holds or waits for (its process is gone and cannot free them)."""
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


def pooled_postgres_storage(cls, inst_data, config_value, url_for, **pool):
    """A dagster-postgres storage (`cls`, a subclass of one of its three) from its instance config, its URL
    passed through `url_for`, with a pooled connection (`optimize_for_webserver(**pool)`), as the webserver has
    and other processes do not."""
    from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config

    storage = cls(
        inst_data=inst_data,
        postgres_url=url_for(pg_url_from_config(config_value)),
        should_autocreate_tables=config_value.get("should_autocreate_tables", True),
        token_provider=get_token_provider_from_config(config_value),
    )
    storage.optimize_for_webserver(**pool)
    return storage


# --- SQLite instance storage ----------------------------------------------------------------------------------

def sqlite_storages():
    """(run, event log, schedule storage classes, busy timeout in s). Each class connects through `connect()`
    (runs, schedules) or `_connect(shard)` (events), with a `_conn_string` or `conn_string_for_shard`;
    `from_local` (runs, schedules) creates the tables."""
    from dagster._core.storage.event_log import SqliteEventLogStorage
    from dagster._core.storage.runs import SqliteRunStorage
    from dagster._core.storage.schedules import SqliteScheduleStorage
    from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS

    return SqliteRunStorage, SqliteEventLogStorage, SqliteScheduleStorage, SQLITE_BUSY_TIMEOUT_SECONDS


class KnownTables:
    """Mixin for an event log storage: `has_table` asks the database only until the table is there."""

    def has_table(self, table_name: str) -> bool:
        known = self.__dict__.setdefault("_hy3d_known_tables", set())
        if table_name not in known and super().has_table(table_name):
            known.add(table_name)
        return table_name in known


class WithoutNotify:
    """Mixin for dagster-postgres's event log: every event stored by Dagster's generic SQL `store_event` (the
    insert, then the asset and check indexes), without the `NOTIFY` dagster-postgres sends after each insert."""

    def store_event(self, event) -> None:
        from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

        SqlEventLogStorage.store_event(self, event)
