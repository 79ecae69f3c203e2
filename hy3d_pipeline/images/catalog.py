"""What the sensor has already requested, per image: ETag and the tick that requested it.

A key->ETag map of a large bucket is megabytes, far too big for a sensor cursor that is rewritten every tick.
It lives instead in the Dagster instance's key-value store (a table of the run storage, so SQLite on a laptop
and Postgres on a fleet), one row per image. The cursor keeps only a small digest per shard of the key space, so
a tick looks rows up only for shards whose listing changed.

A row records the tick sequence number that wrote it. Rows written by a tick whose cursor was never committed
(the daemon died between evaluating the sensor and submitting its runs) carry a sequence number above the
committed cursor's, and are treated as not yet requested, so such a crash loses nothing. Tick numbers never go
back: the highest one written is kept too, and a sensor whose cursor was reset (in the UI) numbers its ticks
above it, or every row written before the reset would look uncommitted once the cursor is committed again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

_NAMESPACE = "hy3d/images/"
DELETED = "~deleted"  # the ETag recorded for a source object seen deleted (never a real ETag: has no quotes/hex)
_HIGH = "hy3d/images-tick-high"  # outside _NAMESPACE: no partition key can collide with it
_CHUNK = 500  # stays under SQLite's bound-variable limit on every version


class RequestedImages:
    def __init__(self, instance, namespace: str = _NAMESPACE) -> None:
        self._storage = instance.run_storage
        self._ns = namespace

    def get(self, partition_keys: Iterable[str]) -> dict[str, tuple[str, int]]:
        """partition key -> (etag, tick sequence) for the keys that have a row."""
        keys = [self._ns + k for k in partition_keys]
        found: dict[str, tuple[str, int]] = {}
        for i in range(0, len(keys), _CHUNK):
            for row_key, value in self._storage.get_cursor_values(set(keys[i:i + _CHUNK])).items():
                etag, _, seq = value.rpartition("|")
                found[row_key[len(self._ns):]] = (etag, int(seq or 0))
        return found

    def high_seq(self) -> int:
        """The highest tick number any row was written with (0 when none)."""
        return int(self._storage.get_cursor_values({_HIGH}).get(_HIGH) or 0)

    def set(self, etags: Mapping[str, str], seq: int) -> None:
        if seq > self.high_seq():
            self._storage.set_cursor_values({_HIGH: str(seq)})
        items = list(etags.items())
        for i in range(0, len(items), _CHUNK):
            chunk = dict(items[i:i + _CHUNK])
            existing = self.get(chunk)
            # set_cursor_values inserts, and only on a conflict updates: give it new and old rows separately
            fresh = {self._ns + k: f"{v}|{seq}" for k, v in chunk.items() if k not in existing}
            known = {self._ns + k: f"{v}|{seq}" for k, v in chunk.items() if k in existing}
            for part in (fresh, known):
                if part:
                    self._storage.set_cursor_values(part)
