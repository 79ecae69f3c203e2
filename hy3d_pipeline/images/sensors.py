"""`new_images_sensor`: finds new, overwritten and deleted images and requests runs for them.

Listing mode (default) lists the prefix in full every tick. Watermarks on LastModified or on the last key seen
lose objects (two writes in the same second, keys sorting before the watermark, a watermark object deleted or
overwritten), so instead the listing is compared with what was already requested (see `planner`). Event mode
(S3_EVENTS_QUEUE_URL set) reads S3 event notifications from SQS, and runs a full listing pass every
HY3D_RECONCILE_SECONDS to catch anything the queue missed.
"""

from __future__ import annotations

import time

from dagster import DefaultSensorStatus, SensorEvaluationContext, SensorResult, SkipReason, sensor

from hy3d_pipeline.images import events
from hy3d_pipeline.images.catalog import RequestedImages
from hy3d_pipeline.images.formats import has_image_extension
from hy3d_pipeline.images.partitions import PIPELINE_ASSETS, partition_key_for
from hy3d_pipeline.images.planner import Cursor, Observed, plan_tick
from hy3d_pipeline.settings import current
from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage


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
    return head.etag if head else None



def settle_created(batch: events.EventBatch, catalog: RequestedImages, storage: ImageStorage) -> None:
    """A created event whose ETag is not the one already requested is checked with a HEAD of the object: the
    event may be stale (an older write delivered a tick late, SQS does not keep order) and would rewind the
    catalog to an old version. A HEAD rather than sequencers kept per key: S3-compatible servers do not always
    fill sequencers in, and the HEAD is only paid for changed images, which cost a model generation anyway."""
    keys = {key: pk for key in batch.created if (pk := image_partition_key(storage, key))}
    rows = catalog.get(list(keys.values()))
    for key, pk in keys.items():
        etag, sequencer = batch.created[key]
        row = rows.get(pk)
        if row is None or row.etag == etag:
            continue
        current = _current_etag(storage, key)
        if current is None:  # gone since: a deletion the queue may not have told yet
            batch.created.pop(key)
            batch.deleted[key] = sequencer
        else:
            batch.created[key] = (current, sequencer)


def observe_events(context, storage: ImageStorage, cursor: Cursor | None, url: str, client):
    """(Observed from the queue, the batch)."""
    batch = events.receive(client, url, storage.images_bucket, max_messages=current().sensor_max_images,
                           visibility=current().sqs_visibility(), budget_s=20.0)
    events.settle_deletions(batch, lambda key: _current_etag(storage, key))
    settle_created(batch, RequestedImages(context.instance), storage)
    created = {}
    for key, (etag, _seq) in batch.created.items():
        partition_key = image_partition_key(storage, key)
        if partition_key:
            created[partition_key] = etag
    deleted = {pk for key in batch.deleted if (pk := image_partition_key(storage, key))}
    return Observed(created, complete=False, deleted=deleted), batch


@sensor(
    name="new_images_sensor",
    minimum_interval_seconds=current().sensor_interval,
    asset_selection=PIPELINE_ASSETS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Adds a partition per new image and requests batched runs for new and overwritten (new ETag) "
    "images, from a bucket listing or from S3 event notifications (S3_EVENTS_QUEUE_URL). Objects without an "
    "image extension are skipped; deleted sources are marked, their models kept.",
)
def new_images_sensor(context: SensorEvaluationContext, storage: ImageStorage):
    if not storage.images_bucket:
        return SkipReason(NO_BUCKET)
    # refused here rather than at import: `import hy3d_pipeline` (the seed API, the client) must keep working,
    # while a failing tick shows the reason in the UI and the daemon log, and requests nothing
    problem = storage.layout_problem()
    if problem:
        raise ValueError(problem)
    cursor = Cursor.load(context.cursor)
    url = current().events_queue_url
    batch = None
    kept: list[int] = []
    if url:
        client = events.sqs_client(url, storage.region_name or "us-east-1")
        # every tick, a reconcile listing too: the committed tick's messages would otherwise come back, and end
        # in the dead-letter queue under a redrive policy
        if cursor and cursor.pending:
            kept = events.PendingDeletes(context.instance).flush(client, url, cursor.pending, context.log.warning)
    if url and cursor is not None and time.time() - cursor.reconciled_at < current().reconcile_seconds:
        observed, batch = observe_events(context, storage, cursor, url, client)
        if batch.unreadable:
            context.log.warning(f"{len(batch.unreadable)} unreadable queue message(s) left in the queue for its "
                                f"redrive policy, ids: {', '.join(batch.unreadable[:20])}")
    else:
        observed = Observed(list_images(storage), complete=True)
    plan = plan_tick(context.instance, cursor, observed, current().batch_size)
    if url and observed.complete:
        plan.cursor.reconciled_at = time.time()
    plan.cursor.pending = [s for s in kept if s != plan.cursor.seq]
    if batch is not None and batch.handles:
        events.PendingDeletes(context.instance).save(plan.cursor.seq, batch.handles)
        plan.cursor.pending.append(plan.cursor.seq)
    cursor_text = plan.cursor.dump()
    seen = f"{len(observed.etags)} images {'listed' if observed.complete else 'in queue events'}"
    if plan.result is None:
        context.update_cursor(cursor_text)
        return SkipReason(f"no new or changed images among {seen}")
    for key, failure in plan.gave_up.items():
        context.log.warning(f"giving up on image {key!r} (ETag {failure['etag']}): no model after "
                            f"{failure['attempts']} run(s), the last {failure['last_run_id']}")
    context.log.info(f"{seen}: {len(plan.requested)} requested in {len(plan.result.run_requests)} run(s) "
                     f"({len(plan.retried)} again after an unfinished run), {plan.deferred} deferred to the next "
                     f"tick, {len(plan.deleted)} deleted, {len(plan.gave_up)} given up, {len(plan.submitted)} left to "
                     "client submissions")
    return SensorResult(run_requests=plan.result.run_requests, cursor=cursor_text,
                        dynamic_partitions_requests=plan.result.dynamic_partitions_requests,
                        asset_events=plan.result.asset_events)
