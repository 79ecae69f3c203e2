"""What the sensor has already requested, per image: ETag and the tick that requested it.

A key->ETag map of a large bucket is megabytes, far too big for a sensor cursor that is rewritten every tick.
It lives instead in the Dagster instance's key-value store (a table of the run storage, so SQLite on a laptop,
Postgres or MySQL on a fleet), one row per image. The cursor keeps only a small digest per shard of the key
space, so a tick looks rows up only for shards whose listing changed.

A row records the tick sequence number that wrote it. Rows written by a tick whose cursor was never committed
(the daemon died between evaluating the sensor and submitting its runs) carry a sequence number above the
committed cursor's, and are treated as not yet requested, so such a crash loses nothing. A row also counts
the runs requested for its ETag, so that images whose run failed are requested again a bounded number of times
(`retries`). A row can also say that a run of `hy3d_pipeline.client` has the image (see `submitted`): with one
attempt once that run exists, with none while the submission is still under way. Tick numbers never go
back: the highest one written is kept too, and a sensor whose cursor was reset (in the UI) numbers its ticks
above it, or every row written before the reset would look uncommitted once the cursor is committed again.

Row keys fit every instance storage: MySQL's unique index covers only a key's first 64 characters, and an S3 key
is up to 1,024, so a row's key is a digest of its partition key (SHA-256, base64url) and the partition key
itself is in the row, checked on every read. Rows of the first format (key `hy3d/images/<partition key>`, value
`etag|tick|attempts|state`) are still read for images that have no row of the current format, so an instance
upgraded in place does not request its bucket again; the current format is the only one written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from hy3d_pipeline.dagster_private import kv_get, kv_key, kv_set

DELETED = "~deleted"  # the ETag recorded for a source object seen deleted (never a real ETag: has no quotes/hex)
_PREFIX = "hy3d/req/"  # + 43 characters of digest: 52 in all
_HIGH = "hy3d/req/tick-high"  # shorter than any row key: cannot collide with one
_LEGACY_PREFIX = "hy3d/images/"  # first format: the partition key itself
_LEGACY_HIGH = "hy3d/images-tick-high"  # exists once the first format wrote anything


def row_key(partition_key: str) -> str:
    return kv_key(_PREFIX, partition_key)


class Row(NamedTuple):
    etag: str
    seq: int  # the tick that wrote the row
    attempts: int = 1  # runs requested for this ETag so far
    gave_up: bool = False  # attempts exhausted: a failure was recorded, nothing more is requested
    client: bool = False  # left to a client submission (attempts 0 until its run is seen, then 1)

    @classmethod
    def parse_legacy(cls, value: str) -> "Row":
        # `etag|tick` rows (before retries were counted) read as one attempt
        etag, _, rest = value.partition("|")
        seq, _, rest = rest.partition("|")
        attempts, _, state = rest.partition("|")
        return cls(etag, int(seq or 0), int(attempts or 1), state == "gave_up", state == "client")

    def dump(self, partition_key: str) -> str:
        return json.dumps({"key": partition_key, "etag": self.etag, "seq": self.seq, "attempts": self.attempts,
                           **({"gave_up": True} if self.gave_up else {}), **({"client": True} if self.client else {})},
                          separators=(",", ":"))

    @classmethod
    def load(cls, value: str, partition_key: str) -> "Row | None":
        """The row, or None when it belongs to another partition key (a digest collision, never seen)."""
        data = json.loads(value)
        if data.get("key") != partition_key:
            return None
        return cls(data["etag"], int(data["seq"]), int(data.get("attempts", 1)), bool(data.get("gave_up")),
                   bool(data.get("client")))


class RequestedImages:
    def __init__(self, instance) -> None:
        self._instance = instance
        self._legacy: bool | None = None  # whether first-format rows may exist; asked once

    def _highs(self) -> dict[str, str]:
        highs = kv_get(self._instance, (_HIGH, _LEGACY_HIGH))
        self._legacy = _LEGACY_HIGH in highs
        return highs

    def get(self, partition_keys: Iterable[str]) -> dict[str, Row]:
        """partition key -> its row, for the keys that have one."""
        keys = list(dict.fromkeys(partition_keys))
        by_row = {row_key(k): k for k in keys}
        found: dict[str, Row] = {}
        for key, value in kv_get(self._instance, by_row).items():
            row = Row.load(value, by_row[key])
            if row is not None:
                found[by_row[key]] = row
        if self._legacy is None:
            self._highs()
        rest = [k for k in keys if k not in found]
        if self._legacy and rest:
            for key, value in kv_get(self._instance, [_LEGACY_PREFIX + k for k in rest]).items():
                found[key[len(_LEGACY_PREFIX):]] = Row.parse_legacy(value)
        return found

    def high_seq(self) -> int:
        """The highest tick number any row was written with (0 when none)."""
        return max((int(v or 0) for v in self._highs().values()), default=0)

    def set(self, etags: Mapping[str, str], seq: int, attempts: Mapping[str, int] | None = None,
            gave_up: Iterable[str] = (), client: Iterable[str] = ()) -> None:
        """Record `etags` as requested by tick `seq` (attempt 1 unless `attempts` says otherwise); keys in
        `gave_up` are recorded as given up after their attempts, keys in `client` as left to a client run."""
        attempts, gave_up, client = attempts or {}, set(gave_up), set(client)
        if seq > self.high_seq():
            kv_set(self._instance, {_HIGH: str(seq)})
        kv_set(self._instance, {row_key(k): Row(v, seq, attempts.get(k, 1), k in gave_up, k in client).dump(k)
                                for k, v in etags.items()})
