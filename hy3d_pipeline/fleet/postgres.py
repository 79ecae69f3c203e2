"""Postgres instance storage that takes the URL in whatever form the user wrote it.

SQLAlchemy 2.1 maps `postgresql://` to psycopg 3, which dagster-postgres does not install, and with psycopg 3
installed every event write fails on `NOTIFY run_events, $1`. dagster-postgres ships psycopg2, so every URL form
(`postgres://`, `postgresql://`, `postgresql+psycopg://`) is pointed at it here.

Outside the webserver dagster-postgres opens a new connection for every operation (a NullPool): a run of 8
images spent more time connecting than working. These storages keep one pooled connection per storage instead
(dagster-postgres's own webserver setting), which a run worker, the daemon and a Celery worker process all reuse.
The event log also remembers which tables exist: asking opened a second connection beside the pooled one (and
closed it again) for every asset event with tags. And it stores events without dagster-postgres's `NOTIFY`
after each one: nothing in this Dagster listens (runs' events are polled), and in autocommit it was a second
commit for every event.
"""

from __future__ import annotations

import re

from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage

from hy3d_pipeline.dagster_private import KnownTables, WithoutNotify, pooled_postgres_storage

_SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.I)
POOL_RECYCLE_S = 3600
POOL_OVERFLOW = 4


def psycopg2_url(url: str) -> str:
    """The same URL with the psycopg2 driver; other schemes are returned unchanged for SQLAlchemy to refuse."""
    return _SCHEME.sub("postgresql+psycopg2://", url.strip(), count=1)


def redacted_url(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


class _Pooled:
    @classmethod
    def from_config_value(cls, inst_data, config_value):
        # statement_timeout 0: no limit (runs write large event batches); the pool is what we want from it
        return pooled_postgres_storage(cls, inst_data, config_value, psycopg2_url, statement_timeout=0,
                                       pool_recycle=POOL_RECYCLE_S, max_overflow=POOL_OVERFLOW)


class RunStorage(_Pooled, PostgresRunStorage):
    pass


class EventLogStorage(WithoutNotify, KnownTables, _Pooled, PostgresEventLogStorage):
    pass


class ScheduleStorage(_Pooled, PostgresScheduleStorage):
    pass
