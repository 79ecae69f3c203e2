"""Images that `hy3d_pipeline.client` submitted: the sensor and the client never both launch a run for one version.

A web app typically uploads an image and submits it at once, so a tick can list the new object before, while or
after the client launches its run. Three records settle who runs it:

- a submission under way: the client's first request (in the code location) writes a row for the image (key
  `hy3d/submitting/` + a digest of the partition key, which fits every instance storage; the partition key, ETag
  and time inside), *then* reads the sensor's catalog row of the image. If the sensor has requested that version,
  the client takes the sensor's run instead of launching one (client_api.py);
- a tick writes its catalog rows *then* reads the submissions under way: an image with one at the ETag it
  listed, younger than INTENT_TTL_S, is left out of its runs and its row says so (`client`, no attempt yet).
  With each side writing before it reads, at least one sees the other, whatever the interleaving;
- every run the client launches carries `hy3d/client` and `hy3d/etags` (partition key -> ETag). Each tick reads
  the client runs created since the previous one (one indexed query, usually empty); an image listed at the ETag
  such a run was launched for is requested already, by that run, and its row says so for good. A submission that
  never launched (the web app died) leaves the image to the sensor once its record is INTENT_TTL_S old.

Overwritten since (a new ETag), the image is the sensor's again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from datetime import datetime, timezone

CLIENT_TAG = "hy3d/client"
ETAGS_TAG = "hy3d/etags"
# client runs created this long before a tick are looked at again by the next one: the webserver that created them
# and the daemon may not share a clock, and looking twice is harmless
OVERLAP_S = 60.0
INTENTS = "hy3d/submitting/"
# a submission launches within seconds of its first request; one older than this never will
INTENT_TTL_S = 120.0


def run_tags(etags: Mapping[str, str]) -> dict[str, str]:
    """The tags that mark a client run and the image versions it was launched for."""
    return {CLIENT_TAG: "1", ETAGS_TAG: json.dumps(dict(etags), separators=(",", ":"), ensure_ascii=False)}


def etags_of(tags: Mapping[str, str]) -> dict[str, str]:
    """partition key -> ETag a run was launched for ({} for runs the client did not launch)."""
    try:
        value = json.loads(tags.get(ETAGS_TAG) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def claimed(instance, after: float) -> tuple[dict[str, str], float]:
    """(partition key -> ETag of every client run created after `after`, less the overlap; the next `after`)."""
    from dagster import RunsFilter

    now = time.time()
    since = datetime.fromtimestamp(max(0.0, after - OVERLAP_S), timezone.utc)
    records = instance.get_run_records(RunsFilter(tags={CLIENT_TAG: "1"}, created_after=since))
    claims: dict[str, str] = {}
    for record in sorted(records, key=lambda r: r.create_timestamp):  # the newest submission of a key wins
        claims.update(etags_of(record.dagster_run.tags))
    return claims, max(after, now)


def record_submissions(instance, etags: Mapping[str, str], now: float | None = None) -> None:
    """Record that a client is submitting these images (partition key -> ETag checked)."""
    # imported here: hy3d_pipeline.client imports this module and must not import Dagster
    from hy3d_pipeline.dagster_private import kv_key, kv_set

    now = time.time() if now is None else now
    kv_set(instance, {kv_key(INTENTS, k): json.dumps({"key": k, "etag": e, "at": now}, separators=(",", ":"))
                      for k, e in etags.items()})


def under_way(instance, etags: Mapping[str, str], now: float | None = None) -> set[str]:
    """The keys of `etags` that a client began submitting at that ETag less than INTENT_TTL_S ago."""
    from hy3d_pipeline.dagster_private import kv_get, kv_key

    now = time.time() if now is None else now
    found = set()
    by_row = {kv_key(INTENTS, k): k for k in etags}
    for row_key, value in kv_get(instance, by_row).items():
        data, key = json.loads(value), by_row[row_key]
        fresh = now - float(data.get("at", 0)) < INTENT_TTL_S
        if data.get("key") == key and data.get("etag") == etags[key] and fresh:
            found.add(key)
    return found
