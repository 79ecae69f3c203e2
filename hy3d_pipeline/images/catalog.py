"""What the sensor has already requested, per image: ETag and the tick that requested it.

A key->ETag map of a large bucket is megabytes, far too big for a sensor cursor that is rewritten every tick.
It lives instead in the Dagster instance's key-value store (a table of the run storage, so SQLite on a laptop
and Postgres on a fleet), one row per image. The cursor keeps only a small digest per shard of the key space, so
a tick looks rows up only for shards whose listing changed.

A row records the tick sequence number that wrote it. Rows written by a tick whose cursor was never committed
(the daemon died between evaluating the sensor and submitting its runs) carry a sequence number above the
committed cursor's, and are treated as not yet requested, so such a crash loses nothing. A row also counts
the runs requested for its ETag, so that images whose run failed are requested again a bounded number of times
(`retries`). A row can also say that a run of `hy3d_pipeline.client` has the image (see `submitted`): with one
attempt once that run exists, with none while the submission is still under way. Tick numbers never go
back: the highest one written is kept too, and a sensor whose cursor was reset (in the UI) numbers its ticks
above it, or every row written before the reset would look uncommitted once the cursor is committed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

_NAMESPACE = "hy3d/images/"
DELETED = "~deleted"  # the ETag recorded for a source object seen deleted (never a real ETag: has no quotes/hex)
_HIGH = "hy3d/images-tick-high"  # outside _NAMESPACE: no partition key can collide with it
_CHUNK = 500  # stays under SQLite's bound-variable limit on every version


class Row(NamedTuple):
    etag: str
    seq: int  # the tick that wrote the row
    attempts: int = 1  # runs requested for this ETag so far
    gave_up: bool = False  # attempts exhausted: a failure was recorded, nothing more is requested
    client: bool = False  # left to a client submission (attempts 0 until its run is seen, then 1)

    @classmethod
    def parse(cls, value: str) -> "Row":
        # `etag|tick` rows (before retries were counted) read as one attempt
        etag, _, rest = value.partition("|")
        seq, _, rest = rest.partition("|")
        attempts, _, state = rest.partition("|")
        return cls(etag, int(seq or 0), int(attempts or 1), state == "gave_up", state == "client")

    def dump(self) -> str:
        state = "gave_up" if self.gave_up else "client" if self.client else ""
        return f"{self.etag}|{self.seq}|{self.attempts}|{state}"


def get_values(storage, keys: Iterable[str]) -> dict[str, str]:
    """Key-value rows of the run storage, for the keys that have one."""
    keys = list(keys)
    found: dict[str, str] = {}
    for i in range(0, len(keys), _CHUNK):
        found.update(storage.get_cursor_values(set(keys[i:i + _CHUNK])))
    return found


def put_values(storage, values: Mapping[str, str]) -> None:
    """Write key-value rows of the run storage, new and existing ones alike."""
    items = list(values.items())
    for i in range(0, len(items), _CHUNK):
        chunk = dict(items[i:i + _CHUNK])
        existing = storage.get_cursor_values(set(chunk))
        # set_cursor_values inserts, and only on a conflict updates: give it new and old rows separately
        for part in ({k: v for k, v in chunk.items() if k not in existing},
                     {k: v for k, v in chunk.items() if k in existing}):
            if part:
                storage.set_cursor_values(part)


class RequestedImages:
    def __init__(self, instance, namespace: str = _NAMESPACE) -> None:
        self._storage = instance.run_storage
        self._ns = namespace

    def get(self, partition_keys: Iterable[str]) -> dict[str, Row]:
        """partition key -> its row, for the keys that have one."""
        values = get_values(self._storage, (self._ns + k for k in partition_keys))
        return {row_key[len(self._ns):]: Row.parse(value) for row_key, value in values.items()}

    def high_seq(self) -> int:
        """The highest tick number any row was written with (0 when none)."""
        return int(self._storage.get_cursor_values({_HIGH}).get(_HIGH) or 0)

    def set(self, etags: Mapping[str, str], seq: int, attempts: Mapping[str, int] | None = None,
            gave_up: Iterable[str] = (), client: Iterable[str] = ()) -> None:
        """Record `etags` as requested by tick `seq` (attempt 1 unless `attempts` says otherwise); keys in
        `gave_up` are recorded as given up after their attempts, keys in `client` as left to a client run."""
        attempts, gave_up, client = attempts or {}, set(gave_up), set(client)
        if seq > self.high_seq():
            put_values(self._storage, {_HIGH: str(seq)})
        put_values(self._storage, {self._ns + k: Row(v, seq, attempts.get(k, 1), k in gave_up, k in client).dump()
                                   for k, v in etags.items()})
