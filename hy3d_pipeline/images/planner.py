"""What one sensor tick requests, given what it observed in the bucket.

Observations come from a full listing (listing mode, and the periodic reconciliation of event mode) or from S3
event notifications. Either way the plan is the same: compare each observed ETag with what was already
requested (`catalog.RequestedImages`, in the instance's key-value table), add partitions for new keys, request
runs for new and changed images in contiguous batches, and record deletions without touching any model.

The cursor stays small at any bucket size: a sequence number, a 64-bit digest per shard of the key space (so
a listing tick looks up only the shards whose content changed), and bookkeeping for event mode. A tick that
finds more work than HY3D_SENSOR_MAX_IMAGES requests the first ones in key order and leaves the rest's shards
marked dirty, so the next tick resumes exactly there.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dagster import AssetObservation, RunRequest, SensorResult

from hy3d_pipeline.dagster_private import existing_dynamic_partitions
from hy3d_pipeline.images.catalog import DELETED, RequestedImages
from hy3d_pipeline.images.partitions import (
    IMAGES_PARTITIONS_NAME,
    PIPELINE_ASSETS,
    RANGE_END_TAG,
    RANGE_START_TAG,
    images_partitions,
)
from hy3d_pipeline.images.retries import PARTITION_TAG, SENSOR_NAME, SENSOR_TAG, TICK_TAG, unfinished
from hy3d_pipeline.images.submitted import claimed, under_way
from hy3d_pipeline.settings import current

SHARDS = 2048
_ADD_CHUNK = 500
_MASK = (1 << 64) - 1


def burst_batch_size(backlog: int, base: int) -> int:
    """Images per run for a backlog: per-run costs (launch, process start, model load) are paid per run, so a big
    backlog gets bigger runs, up to HY3D_MAX_BATCH_SIZE; a quarter of the backlog per run keeps a few runs to
    share between workers. The runs then come in whole rounds of HY3D_GPU_SLOTS (and evenly sized), so that at
    the end no worker is left with a run of its own while the others wait: 200 images on two workers are 8 runs
    of 25, not 6 of 32 and one of 8. Never below `base` (HY3D_BATCH_SIZE), so small bursts keep their latency."""
    if backlog <= 0:
        return base
    settings = current()
    size = max(base, min(math.ceil(backlog / 4), settings.max_batch_size))
    slots = max(1, settings.gpu_slots)
    runs = math.ceil(math.ceil(backlog / size) / slots) * slots
    return max(base, math.ceil(backlog / runs))


def _hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=8).digest()


def shard_of(partition_key: str) -> int:
    return int.from_bytes(_hash(partition_key)[:2], "big") % SHARDS


def shard_digests(listed: dict[str, str]) -> list[int]:
    acc = [0] * SHARDS
    for key, etag in listed.items():
        acc[shard_of(key)] ^= int.from_bytes(_hash(f"{key}\0{etag}"), "big")
    return acc


@dataclass
class Cursor:
    seq: int = 0
    shards: list[int] = field(default_factory=list)  # empty: no committed listing, every shard is checked
    reconciled_at: float = 0.0  # event mode: when the last full listing ran
    pending: list[int] = field(default_factory=list)  # event mode: ticks whose queue messages await deletion
    runs_after: float = 0.0  # retries: runs that ended unfinished after this are looked at
    claims_after: float = 0.0  # client runs created after this are looked at (see `submitted`)

    @classmethod
    def load(cls, raw: str | None) -> "Cursor | None":
        if not raw:
            return None
        data = json.loads(raw)
        blob = base64.b64decode(data.get("shards", "")) if data.get("shards") else b""
        shards = [int.from_bytes(blob[i:i + 8], "big") for i in range(0, len(blob), 8)]
        return cls(seq=int(data.get("seq", 0)), shards=shards if len(shards) == SHARDS else [],
                   reconciled_at=float(data.get("reconciled_at", 0)), pending=list(data.get("pending", [])),
                   runs_after=float(data.get("runs_after", 0)), claims_after=float(data.get("claims_after", 0)))

    def dump(self) -> str:
        blob = b"".join(v.to_bytes(8, "big") for v in self.shards)
        return json.dumps({"v": 2, "seq": self.seq, "shards": base64.b64encode(blob).decode(),
                           "reconciled_at": self.reconciled_at, "pending": self.pending,
                           "runs_after": self.runs_after, "claims_after": self.claims_after},
                          separators=(",", ":"))


def contiguous_batches(keys: Iterable[str], order: Sequence[str], size: int) -> list[list[str]]:
    """Split `keys` into runs of at most `size` keys that are contiguous in the partition order."""
    index = {k: i for i, k in enumerate(order)}
    batches: list[list[str]] = []
    for pos in sorted(index[k] for k in keys):
        if batches and len(batches[-1]) < size and index[batches[-1][-1]] == pos - 1:
            batches[-1].append(order[pos])
        else:
            batches.append([order[pos]])
    return batches


def partition_tags(batch: list[str]) -> dict[str, str]:
    """The tags that make a run cover `batch` (contiguous in the partition order): its key, or its range."""
    if len(batch) == 1:
        return {PARTITION_TAG: batch[0]}
    return {RANGE_START_TAG: batch[0], RANGE_END_TAG: batch[-1], "hy3d/batch_size": str(len(batch))}


def run_request_for(batch: list[str], etags: dict[str, str], seq: int = 0,
                    attempts: dict[str, int] | None = None) -> RunRequest:
    attempts = attempts or {}
    # a retry needs a run key of its own (Dagster drops a repeated one); first attempts keep the old digest
    digest = hashlib.sha256("\n".join(
        f"{k}\0{etags[k]}" + (f"\0{attempts[k]}" if attempts.get(k, 1) > 1 else "") for k in batch
    ).encode()).hexdigest()[:20]
    # the tick number ties a failed run back to the catalog rows it was for (see `retries`)
    tags = {SENSOR_TAG: SENSOR_NAME, TICK_TAG: str(seq)}
    if len(batch) == 1:
        return RunRequest(run_key=f"images-{digest}", asset_selection=PIPELINE_ASSETS, partition_key=batch[0],
                          tags=tags)
    return RunRequest(run_key=f"images-{digest}", asset_selection=PIPELINE_ASSETS,
                      tags={**tags, **partition_tags(batch)})


def existing_partitions(instance, keys: list[str]) -> list[str]:
    """Which of `keys` are partitions already, in one query per 500 keys where the storage is SQL (SQLite opens
    a connection per `has_dynamic_partition` call: 100 keys cost 0.3 s), else key by key."""
    return existing_dynamic_partitions(instance, IMAGES_PARTITIONS_NAME, keys)


@dataclass
class Observed:
    """What a tick saw: `etags` of existing images (all of them when `complete`), and keys seen deleted."""

    etags: dict[str, str]
    complete: bool
    deleted: set[str] = field(default_factory=set)


@dataclass
class Plan:
    result: SensorResult | None
    cursor: Cursor
    requested: list[str]
    deferred: int = 0
    deleted: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    gave_up: dict[str, dict] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)  # left to hy3d_pipeline.client's runs (see `submitted`)


def plan_tick(instance, cursor: Cursor | None, observed: Observed, size: int, limit: int | None = None) -> Plan:
    catalog = RequestedImages(instance)
    committed_seq = cursor.seq if cursor else None
    seq = (cursor.seq if cursor else catalog.high_seq()) + 1
    next_cursor = Cursor(seq=seq, shards=list(cursor.shards) if cursor else [],
                         reconciled_at=cursor.reconciled_at if cursor else 0.0,
                         runs_after=cursor.runs_after if cursor else 0.0)
    claims, next_cursor.claims_after = claimed(instance, cursor.claims_after if cursor else 0.0)
    etags = observed.etags
    if observed.complete:
        existing = instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
    else:  # events: look up only the keys seen, not every partition of a huge bucket
        existing = existing_partitions(instance, [*etags, *observed.deleted])
    existing_set = set(existing)

    if observed.complete:
        digests = shard_digests(etags)
        prior = cursor.shards if cursor and cursor.shards else None
        changed = {i for i in range(SHARDS) if prior is None or prior[i] != digests[i]}
        candidates = [k for k in etags if shard_of(k) in changed]
        next_cursor.shards = digests
        gone = existing_set.difference(etags)
    else:
        candidates = list(etags)
        gone = set()
    gone |= {k for k in observed.deleted if k not in etags}
    rows = catalog.get(list(dict.fromkeys([*candidates, *gone])))

    def settled(key: str) -> bool:
        row = rows.get(key)
        return (row is not None and row.etag == etags[key] and (committed_seq is None or row.seq <= committed_seq)
                and not (row.client and row.attempts == 0))  # a submission not yet seen launched: look again

    def look_again(keys: Iterable[str]) -> None:
        if next_cursor.shards:  # their shards must be looked at again next tick
            for key in keys:
                next_cursor.shards[shard_of(key)] = 0 if next_cursor.shards[shard_of(key)] else 1

    todo = sorted({k for k in candidates if not settled(k)} | {k for k in etags if k not in existing_set})
    # launched by hy3d_pipeline.client at the ETag listed: requested already, by that run
    submitted = {k for k in todo if claims.get(k) == etags[k]}
    if submitted:
        catalog.set({k: etags[k] for k in submitted}, seq, client=submitted)
        todo = [k for k in todo if k not in submitted]
    deleted = sorted(k for k in gone if rows.get(k, ("",))[0] != DELETED and (k in existing_set or k in rows))
    limit = limit or current().sensor_max_images
    deferred = todo[limit:]
    todo = todo[:limit]
    look_again(deferred)  # resume exactly here

    now = time.time()
    retry = unfinished(instance, catalog, committed_seq, next_cursor.runs_after, now,
                       lambda: existing if observed.complete else instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))
    next_cursor.runs_after = retry.runs_after
    # a key whose listing or event says something newer goes through the ordinary path above
    skip = set(todo) | set(deleted) | set(deferred) | gone | submitted
    due = {k: v for k, v in retry.due.items()
           if k not in skip and etags.get(k, v[0]) == v[0] and (not observed.complete or k in existing_set)}
    gave_up = {k: v for k, v in retry.gave_up.items() if k not in skip and etags.get(k, v["etag"]) == v["etag"]}
    if not todo and not deleted and not due and not gave_up:
        return Plan(None, next_cursor, [], len(deferred), submitted=sorted(submitted))

    attempts = {k: n for k, (_, n) in due.items()}
    known = existing_set | set(due)
    etags = {**{k: e for k, (e, _) in due.items()}, **etags}
    todo = sorted([*todo, *due])
    catalog.set({**{k: etags[k] for k in todo}, **{k: DELETED for k in deleted},
                 **{k: v["etag"] for k, v in gave_up.items()}}, seq,
                attempts={**attempts, **{k: v["attempts"] for k, v in gave_up.items()}}, gave_up=gave_up)
    # rows first, then the submissions under way: this tick and a client cannot both miss each other (submitted.py)
    yielded = under_way(instance, {k: etags[k] for k in todo}, now)
    if yielded:
        catalog.set({k: etags[k] for k in yielded}, seq, attempts={k: 0 for k in yielded}, client=yielded)
        todo = [k for k in todo if k not in yielded]
        look_again(yielded)  # until the client's run is seen, or its submission is too old to launch one
    new_keys = [k for k in todo if k not in known]
    size = burst_batch_size(len(todo), size)
    if observed.complete:
        order = [k for k in existing if k not in set(deleted) or current().deleted_sources == "mark"] + new_keys
        batches = contiguous_batches(todo, order, size)
    else:  # positions of existing partitions are unknown here: changed images run alone, new ones in batches
        batches = [[k] for k in todo if k in known] + contiguous_batches(new_keys, new_keys, size)
    runs = [run_request_for(b, etags, seq, attempts) for b in batches]
    partitions = [images_partitions.build_add_request(new_keys[i:i + _ADD_CHUNK])
                  for i in range(0, len(new_keys), _ADD_CHUNK)]
    events = [AssetObservation(asset_key=PIPELINE_ASSETS[0], partition=k, metadata={
        "deleted": True, "policy": current().deleted_sources,
        "note": "the source object is gone; its generated model is kept"}) for k in deleted if k in existing_set]
    events += [AssetObservation(asset_key=PIPELINE_ASSETS[0], partition=k, metadata={
        "gave_up": True, "attempts": v["attempts"], "last_run_id": v["last_run_id"], "etag": v["etag"],
        "note": f"no model after {v['attempts']} run(s); nothing more is requested until the image changes"})
        for k, v in gave_up.items()]
    if deleted and current().deleted_sources == "remove-partition":
        present = [k for k in deleted if k in existing_set]
        partitions += [images_partitions.build_delete_request(present[i:i + _ADD_CHUNK])
                       for i in range(0, len(present), _ADD_CHUNK)]
    result = SensorResult(run_requests=runs, dynamic_partitions_requests=partitions, asset_events=events,
                          cursor=next_cursor.dump())
    return Plan(result, next_cursor, todo, len(deferred), deleted, sorted(k for k in due if k in todo), gave_up,
                sorted(submitted | yielded))
