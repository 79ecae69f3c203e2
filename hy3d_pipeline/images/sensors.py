"""`new_images_sensor`: finds new, overwritten and deleted images and requests runs for them.

Listing mode (default) lists the prefix in full every tick. Watermarks on LastModified or on the last key seen
lose objects (two writes in the same second, keys sorting before the watermark, a watermark object deleted or
overwritten), so instead the listing is compared with what was already requested (see `planner`). Event mode
(S3_EVENTS_QUEUE_URL set) reads S3 event notifications from SQS, and runs a full listing pass every
HY3D_RECONCILE_SECONDS to catch anything the queue missed.
"""

from __future__ import annotations

import os
import time

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from hy3d_pipeline.images import events
from hy3d_pipeline.images.formats import has_image_extension
from hy3d_pipeline.images.partitions import partition_key_for
from hy3d_pipeline.images.planner import PIPELINE_ASSETS, Cursor, Observed, batch_size, max_images_per_tick, plan_tick
from hy3d_pipeline.s3.resources import NO_BUCKET, ImageStorage


def image_partition_key(storage: ImageStorage, key: str) -> str | None:
    """The partition key of an object key, or None for objects that are not source images."""
    if not has_image_extension(key) or storage.is_model_key(storage.images_bucket, key):
        return None
    if not key.startswith(storage.images_prefix):
        return None
    relative = storage.relative_key(key)
    return partition_key_for(relative) if relative else None


def list_images(storage: ImageStorage) -> dict[str, str]:
    """partition key -> ETag for every image object under the prefix, in key order."""
    listed: dict[str, str] = {}
    for page in storage.list_keys(storage.images_bucket, storage.images_prefix):
        for key, etag, _size in page:
            partition_key = image_partition_key(storage, key)
            if partition_key:
                listed[partition_key] = etag
    return listed


def _current_etag(storage: ImageStorage, key: str) -> str | None:
    head = storage.head_or_none(storage.images_bucket, key)
    return head["ETag"].strip('"') if head else None


def sensor_interval() -> int:
    return max(1, int(os.getenv("HY3D_SENSOR_INTERVAL", "15") or 15))


def observe_events(context, storage: ImageStorage, cursor: Cursor | None, url: str):
    """(Observed from the queue, the SQS client, the batch), after deleting the committed tick's messages."""
    client = events.sqs_client(url, storage.region_name or "us-east-1")
    pending = events.PendingDeletes(context.instance)
    if cursor and cursor.pending:
        pending.flush(client, url, cursor.pending)
    batch = events.receive(client, url, storage.images_bucket, max_messages=max_images_per_tick(),
                           visibility=events.visibility_seconds(sensor_interval()), budget_s=20.0)
    events.settle_deletions(batch, lambda key: _current_etag(storage, key))
    created = {}
    for key, (etag, _seq) in batch.created.items():
        partition_key = image_partition_key(storage, key)
        if partition_key:
            created[partition_key] = etag
    deleted = {pk for key in batch.deleted if (pk := image_partition_key(storage, key))}
    return Observed(created, complete=False, deleted=deleted), client, batch


@sensor(
    name="new_images_sensor",
    minimum_interval_seconds=sensor_interval(),
    asset_selection=PIPELINE_ASSETS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition per new image and requests batched runs for new and overwritten (new ETag) "
    "images, from a bucket listing or from S3 event notifications (S3_EVENTS_QUEUE_URL). Objects without an "
    "image extension are skipped; deleted sources are marked, their models kept.",
)
def new_images_sensor(context: SensorEvaluationContext, storage: ImageStorage):
    if not storage.images_bucket:
        return SkipReason(NO_BUCKET)
    cursor = Cursor.load(context.cursor)
    url = events.queue_url()
    batch = None
    if url and cursor is not None and time.time() - cursor.reconciled_at < events.reconcile_seconds():
        observed, client, batch = observe_events(context, storage, cursor, url)
    else:
        observed = Observed(list_images(storage), complete=True)
    plan = plan_tick(context.instance, cursor, observed, batch_size())
    if url and observed.complete:
        plan.cursor.reconciled_at = time.time()
    if batch is not None and batch.handles:
        events.PendingDeletes(context.instance).save(plan.cursor.seq, batch.handles)
        plan.cursor.pending = [plan.cursor.seq]
    cursor_text = plan.cursor.dump()
    seen = f"{len(observed.etags)} images {'listed' if observed.complete else 'in queue events'}"
    if plan.result is None:
        context.update_cursor(cursor_text)
        return SkipReason(f"no new or changed images among {seen}")
    context.log.info(f"{seen}: {len(plan.requested)} requested in {len(plan.result.run_requests)} run(s), "
                     f"{plan.deferred} deferred to the next tick, {len(plan.deleted)} deleted")
    return SensorResult(run_requests=plan.result.run_requests, cursor=cursor_text,
                        dynamic_partitions_requests=plan.result.dynamic_partitions_requests,
                        asset_events=plan.result.asset_events)
