"""Images whose run ended without a model are requested again, a bounded number of times, then given up on.

A run that dies (killed, OOM), is cancelled, or fails after its step retries would otherwise leave its images
marked requested for ever. Each tick asks the instance only for the sensor's runs that ended FAILURE or CANCELED
since the previous tick (a SIGKILLed run counts once something reports it failed). Runs that Dagster's own run
retries will retry are left to them. An image of such a run is requested again when its catalog row is still the
one that run was for (same tick number: an overwrite since then rewrote the row and is requested anyway) and no
`models_3d` materialization carries its ETag (a partly failed batch recorded its good images). Attempt n waits
about base × 2^n after the run ended; after HY3D_MAX_ATTEMPTS runs the image gets an observation on
`source_images` with `gave_up: true`, and nothing more is requested until its content changes.

The tick number tag, not the run key, ties a run to a row: run keys are digests and cannot be read back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from dagster import AssetRecordsFilter, DagsterRunStatus, RunsFilter

from hy3d_pipeline.dagster_private import WILL_RETRY_TAG
from hy3d_pipeline.images.catalog import DELETED, RequestedImages
from hy3d_pipeline.images.partitions import MODELS, RANGE_END_TAG, RANGE_START_TAG
from hy3d_pipeline.settings import current

SENSOR_TAG = "hy3d/sensor"
TICK_TAG = "hy3d/tick"
SENSOR_NAME = "new_images_sensor"
PARTITION_TAG = "dagster/partition"
# runs ended this long before a tick are looked at again by the next one: a run storage may commit a status
# change after its timestamp (a concurrent transaction), and looking twice is harmless (the row no longer matches)
OVERLAP_S = 60.0


@dataclass
class Retries:
    due: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (etag, attempt number of the request)
    gave_up: dict[str, dict] = field(default_factory=dict)  # key -> what to record about the failure
    runs_after: float = 0.0  # the next tick looks at runs updated after this


def keys_of(tags: dict, order: Callable[[], list[str]]) -> list[str]:
    """The partition keys a run covers, by its tags (`order`: the partition keys in order, for a range)."""
    if tags.get(PARTITION_TAG):
        return [tags[PARTITION_TAG]]
    start, end = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if not start or not end:
        return []
    keys = order()
    try:
        a, b = keys.index(start), keys.index(end)
    except ValueError:  # a partition deleted since: the range cannot be expanded, nothing to retry there
        return []
    return keys[a:b + 1]


def _has_model(instance, key: str, etag: str) -> bool:
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=MODELS, asset_partitions=[key]),
                                              limit=1).records
    if not records:
        return False
    meta = records[0].event_log_entry.asset_materialization.metadata
    value = meta.get("source_etag")
    return value is not None and getattr(value, "value", value) == etag


def unfinished(instance, catalog: RequestedImages, committed_seq: int | None, runs_after: float, now: float,
               order: Callable[[], list[str]]) -> Retries:
    """What to request again (or give up on) among the images of the sensor's runs that ended unfinished."""
    since = datetime.fromtimestamp(max(0.0, runs_after), timezone.utc)
    records = instance.get_run_records(RunsFilter(
        statuses=[DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED], updated_after=since,
        tags={SENSOR_TAG: SENSOR_NAME}))
    latest: dict[str, tuple[int, str, float]] = {}  # key -> (tick, run id, ended) of the newest run that had it
    expanded: list[str] | None = None

    def cached_order() -> list[str]:
        nonlocal expanded
        if expanded is None:
            expanded = order()
        return expanded

    for record in records:
        tags = record.dagster_run.tags
        if tags.get(WILL_RETRY_TAG) == "true" or not str(tags.get(TICK_TAG, "")).isdigit():
            continue
        ended = record.update_timestamp.timestamp()
        for key in keys_of(tags, cached_order):
            if key not in latest or latest[key][2] < ended:
                latest[key] = (int(tags[TICK_TAG]), record.dagster_run.run_id, ended)

    result = Retries()
    hold = now - OVERLAP_S
    rows = catalog.get(list(latest))
    limit, base = current().max_attempts, current().retry_backoff
    for key, (tick, run_id, ended) in latest.items():
        row = rows.get(key)
        if row is None or row.etag == DELETED:
            continue
        # a row rewritten by a tick that never committed is that tick's unfinished decision: make it again
        redo = committed_seq is not None and row.seq > committed_seq and row.seq != tick
        if row.seq != tick and not redo:
            continue
        if row.gave_up and not redo:
            continue
        if _has_model(instance, key, row.etag):
            continue
        if row.gave_up or (not redo and row.attempts >= limit):
            result.gave_up[key] = {"etag": row.etag, "attempts": row.attempts, "last_run_id": run_id}
        elif redo:
            result.due[key] = (row.etag, row.attempts)
        elif now >= ended + base * 2 ** row.attempts:
            result.due[key] = (row.etag, row.attempts + 1)
        else:  # not due yet: the next ticks must see this run again
            hold = min(hold, ended - 1e-3)
    result.runs_after = max(runs_after, hold)
    return result
