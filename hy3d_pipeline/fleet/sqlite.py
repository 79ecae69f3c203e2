"""SQLite instance storage that keeps its database engines: the laptop's storage, in Dagster's own layout.

Dagster's SQLite storages create a new SQLAlchemy engine for every operation (`poolclass=NullPool`), and a
statement compiled by an engine is cached in that engine: each of a run's events opened a file, read the schema
and compiled the same INSERTs again. One in-process run of 32 images spent 16 ms per event on it, more than a
third of its time beyond the plain loop (`bench/fleet.py`'s event costs). These subclasses keep one engine per database
file (a run's event shard, the index, runs, schedules), with the same files, tables, transactions and busy
timeout, so a home written by Dagster's own classes reads the same either way and back.

Kept engines are bounded (the least recently used run shard is closed), closed before `wipe` deletes shard files,
and dropped in a forked child without touching the parent's connections (SQLite connections must not cross a
fork; a Celery pool process opens its own).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager

from sqlalchemy import create_engine

from hy3d_pipeline.dagster_private import KnownTables, sqlite_storages

_SqliteRunStorage, _SqliteEventLogStorage, _SqliteScheduleStorage, SQLITE_BUSY_TIMEOUT_S = sqlite_storages()
KEPT_SHARDS = 8  # a process writes one run's shard at a time; readers (the webserver) look at a few
_all: weakref.WeakSet[_Engines] = weakref.WeakSet()


class _Engines:
    """Engines by connection string, the `limit` most recently used kept open."""

    def __init__(self, limit: int, **engine_args) -> None:
        self._limit, self._args = limit, engine_args
        self._engines: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        _all.add(self)

    def get(self, url: str):
        with self._lock:
            engine = self._engines.get(url)
            if engine is None:
                engine = self._engines[url] = create_engine(url, **self._args)
                while len(self._engines) > self._limit:
                    # a connection still checked out stays usable: dispose closes only the idle ones
                    self._engines.popitem(last=False)[1].dispose()
            else:
                self._engines.move_to_end(url)
            return engine

    def close(self, keep: str | None = None) -> None:
        with self._lock:
            for url in [u for u in self._engines if u != keep]:
                self._engines.pop(url).dispose()

    def forget(self) -> None:
        """In a forked child: drop the parent's connections without closing them (they are the parent's)."""
        for engine in self._engines.values():
            engine.dispose(close=False)
        self._engines.clear()
        self._lock = threading.Lock()


def _after_fork() -> None:
    for engines in list(_all):
        engines.forget()


os.register_at_fork(after_in_child=_after_fork)


@contextmanager
def _transaction(engine):
    with engine.connect() as conn, conn.begin():
        yield conn


class _OneFile:
    """Runs and schedules: one database file, one kept engine."""

    def __init__(self, conn_string: str, inst_data=None) -> None:
        self._kept = _Engines(1)
        super().__init__(conn_string, inst_data)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls.from_local(inst_data=inst_data, **config_value)

    def connect(self):
        return _transaction(self._kept.get(self._conn_string))

    def dispose(self) -> None:
        self._kept.close()
        super().dispose()


class RunStorage(_OneFile, _SqliteRunStorage):
    pass


class ScheduleStorage(_OneFile, _SqliteScheduleStorage):
    pass


class EventLogStorage(KnownTables, _SqliteEventLogStorage):
    def __init__(self, base_dir: str, inst_data=None) -> None:
        self._kept = _Engines(KEPT_SHARDS + 1, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _connect(self, shard: str):
        with self._db_lock:  # as Dagster's: one operation at a time per storage (the watcher thread shares it)
            engine = self._kept.get(self.conn_string_for_shard(shard))
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with _transaction(engine) as conn:
                yield conn

    def wipe(self) -> None:
        with self._db_lock:
            self._kept.close(keep=self.conn_string_for_shard("index"))  # the shard files are about to go
        super().wipe()

    def dispose(self) -> None:
        self._kept.close()
        super().dispose()
