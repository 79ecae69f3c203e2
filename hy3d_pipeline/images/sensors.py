"""`new_images_sensor`: finds new and overwritten images in the bucket and requests runs for them.

Each tick lists the prefix in full. Watermarks on LastModified or on the last key seen lose objects (two writes
in the same second, keys sorting before the watermark, a watermark object deleted or overwritten), so the
sensor compares the listing itself with what it already requested (`catalog.RequestedImages`); the cursor only
holds a digest per shard of the key space to skip unchanged shards, and stays a few kilobytes at any bucket
size. New keys become partitions; new and changed objects are requested in batches of up to HY3D_BATCH_SIZE
contiguous partitions, so one run (one process, one warm model) handles a burst.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dagster import (
    AssetKey,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from hy3d_pipeline.images.catalog import RequestedImages
from hy3d_pipeline.images.formats import has_image_extension
from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME, images_partitions, partition_key_for
from hy3d_pipeline.s3.resources import ImageStorage

SHARDS = 256
PIPELINE_ASSETS = [AssetKey("source_images"), AssetKey("local_images"), AssetKey("models_3d")]
RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
_ADD_CHUNK = 500


def batch_size() -> int:
    return max(1, int(os.getenv("HY3D_BATCH_SIZE", "8") or 8))


def _shard_and_digest(partition_key: str, etag: str) -> tuple[int, int]:
    h = hashlib.blake2b(f"{partition_key}\0{etag}".encode(), digest_size=9).digest()
    return h[0] % SHARDS, int.from_bytes(h[1:], "big")


def shard_of(partition_key: str) -> int:
    return hashlib.blake2b(partition_key.encode(), digest_size=2).digest()[0] % SHARDS


@dataclass
class Cursor:
    seq: int = 0
    shards: list[str] = field(default_factory=list)  # empty: no committed tick, every shard must be checked

    @classmethod
    def load(cls, raw: str | None) -> "Cursor | None":
        if not raw:
            return None
        data = json.loads(raw)
        return cls(seq=int(data.get("seq", 0)), shards=list(data.get("shards", [])))

    def dump(self) -> str:
        return json.dumps({"v": 1, "seq": self.seq, "shards": self.shards}, separators=(",", ":"))


def list_images(storage: ImageStorage) -> dict[str, str]:
    """partition key -> ETag for every image object under the prefix, in key order."""
    listed: dict[str, str] = {}
    for page in storage.list_objects(storage.images_bucket, storage.images_prefix):
        for obj in page:
            if not has_image_extension(obj.key) or storage.is_model_key(obj.bucket, obj.key):
                continue
            relative = storage.relative_key(obj.key)
            if relative:
                listed[partition_key_for(relative)] = obj.etag
    return listed


def shard_digests(listed: dict[str, str]) -> list[str]:
    acc = [0] * SHARDS
    for key, etag in listed.items():
        acc[shard_of(key)] ^= _shard_and_digest(key, etag)[1]
    return [f"{v:016x}" for v in acc]


def contiguous_batches(keys: Iterable[str], order: Sequence[str], size: int) -> list[list[str]]:
    """Split `keys` into runs of at most `size` keys that are contiguous in the partition order."""
    index = {k: i for i, k in enumerate(order)}
    positions = sorted(index[k] for k in keys)
    batches: list[list[str]] = []
    for pos in positions:
        if batches and len(batches[-1]) < size and index[batches[-1][-1]] == pos - 1:
            batches[-1].append(order[pos])
        else:
            batches.append([order[pos]])
    return batches


def run_request_for(batch: list[str], etags: dict[str, str]) -> RunRequest:
    digest = hashlib.sha256("\n".join(f"{k}\0{etags[k]}" for k in batch).encode()).hexdigest()[:20]
    if len(batch) == 1:
        return RunRequest(run_key=f"images-{digest}", asset_selection=PIPELINE_ASSETS, partition_key=batch[0])
    return RunRequest(
        run_key=f"images-{digest}",
        asset_selection=PIPELINE_ASSETS,
        tags={RANGE_START_TAG: batch[0], RANGE_END_TAG: batch[-1], "hy3d/batch_size": str(len(batch))},
    )


def plan_tick(instance, cursor: Cursor | None, listed: dict[str, str], size: int) -> tuple[SensorResult | None, Cursor]:
    """What one tick requests, given the listing: (result or None when nothing changed, next cursor)."""
    digests = shard_digests(listed)
    prior = cursor.shards if cursor and len(cursor.shards) == SHARDS else None
    changed = {i for i in range(SHARDS) if prior is None or prior[i] != digests[i]}
    existing = instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
    existing_set = set(existing)
    candidates = [k for k in listed if shard_of(k) in changed]
    requested = RequestedImages(instance).get(candidates) if candidates else {}
    committed_seq = cursor.seq if cursor else None

    def already_requested(key: str) -> bool:
        row = requested.get(key)
        return row is not None and row[0] == listed[key] and (committed_seq is None or row[1] <= committed_seq)

    todo = {k for k in candidates if not already_requested(k)}
    todo.update(k for k in listed if k not in existing_set)  # a partition deleted by hand is requested again
    seq = (cursor.seq if cursor else 0) + 1
    next_cursor = Cursor(seq=seq, shards=digests)
    if not todo:
        return None, next_cursor
    new_keys = [k for k in listed if k in todo and k not in existing_set]
    RequestedImages(instance).set({k: listed[k] for k in todo}, seq)
    order = list(existing) + new_keys
    runs = [run_request_for(b, listed) for b in contiguous_batches(todo, order, size)]
    adds = [images_partitions.build_add_request(new_keys[i:i + _ADD_CHUNK]) for i in range(0, len(new_keys), _ADD_CHUNK)]
    return SensorResult(run_requests=runs, dynamic_partitions_requests=adds, cursor=next_cursor.dump()), next_cursor


def sensor_interval() -> int:
    return max(1, int(os.getenv("HY3D_SENSOR_INTERVAL", "15") or 15))


@sensor(
    name="new_images_sensor",
    minimum_interval_seconds=sensor_interval(),
    asset_selection=PIPELINE_ASSETS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Lists the images bucket; adds a partition per new image key and requests runs for new and "
    "overwritten (new ETag) images, batched. Objects without an image extension are skipped.",
)
def new_images_sensor(context: SensorEvaluationContext, storage: ImageStorage):
    cursor = Cursor.load(context.cursor)
    listed = list_images(storage)
    result, next_cursor = plan_tick(context.instance, cursor, listed, batch_size())
    if result is None:
        context.update_cursor(next_cursor.dump())
        return SkipReason(f"no new or changed images among {len(listed)} listed")
    context.log.info(f"{len(listed)} images listed; requesting {len(result.run_requests)} run(s)")
    return result
