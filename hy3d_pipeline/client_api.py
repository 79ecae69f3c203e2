"""The code location's side of `hy3d_pipeline.client`: the job it launches and the questions it asks.

A web app should need nothing but the webserver's URL: not the pipeline's S3 settings, not its credentials, not
dagster. Yet a submission has to be checked where the pipeline's configuration lives (which bucket and prefix
are images, whether the object exists, its ETag, its partition key), or an app configured slightly differently
would accept images the pipeline then cannot find. So the checks run here, in the code location, through a
Dagster API the webserver already serves: the *sensor test* (`sensorDryRun`, the UI's "Test sensor"). The
`client_requests` sensor never runs on its own (it is stopped by default and skips without a request): the
client sends a request as the cursor of a dry run, and gets the answer back as the evaluation's new cursor.
A dry run evaluates the sensor in the code server and stores nothing, so the answer (which may hold a presigned
download URL for the caller) is written to no tick, log or run. It answers

- `resolve`: each image (an S3 URL, a path-style URL of S3_ENDPOINT_URL or a key relative to S3_IMAGES_PREFIX;
  query strings are dropped by the client before sending) -> partition key, ETag and whether the partition
  exists, or why it is refused (not found, outside the images, a model of ours), plus the options checked;
- `plan`: registered partition keys -> the runs to launch (contiguous ranges of at most a sensor batch), with the
  tags that tell the sensor these images are taken (images/submitted.py) and the run config of the options;
- `download`: model URLs -> presigned GET URLs (models under S3_MODELS_PREFIX only), valid
  HY3D_DOWNLOAD_URL_SECONDS.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from dagster import (
    AssetSelection,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from hy3d_pipeline.client import SENSOR as SENSOR_NAME  # the name the client asks for
from hy3d_pipeline.images.catalog import RequestedImages
from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME, PIPELINE_ASSETS, partition_key_for
from hy3d_pipeline.images.planner import burst_batch_size, contiguous_batches, existing_partitions, partition_tags
from hy3d_pipeline.images.retries import SENSOR_NAME as IMAGES_SENSOR, SENSOR_TAG, TICK_TAG, keys_of
from hy3d_pipeline.images.submitted import INTENT_TTL_S, record_submissions, run_tags
from hy3d_pipeline.models.assets import image_to_model
from hy3d_pipeline.models.resources import GeneratorResource
from hy3d_pipeline.s3.redact import redact
from hy3d_pipeline.s3.urls import S3UrlError, parse_object_url, parse_s3_url
from hy3d_pipeline.settings import current
from hy3d_pipeline.storage.base import StorageError
from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage

JOB_NAME = "image_to_model_job"
IN_FLIGHT = (DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED)
# how long a submission waits for the run of a tick that requested its image and may still be submitting it
TICK_WAIT_S = 10.0

image_to_model_job = define_asset_job(
    JOB_NAME,
    selection=AssetSelection.assets(*PIPELINE_ASSETS),
    description="The three assets of one or more images (a partition or a range): what hy3d_pipeline.client "
    "launches, and the job to pick in the launchpad.",
)


class Refused(ValueError):
    """An image that cannot be submitted; the message names it and says what to do."""


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def locate(storage: ImageStorage, image: str) -> tuple[str, str]:
    """(bucket, key) of an image as the client passes it: an S3 URL (s3/urls.py `parse_object_url`: AWS forms and
    URLs of S3_ENDPOINT_URL), else a key relative to S3_IMAGES_PREFIX; Refused when it is neither."""
    text = image.strip()
    if _URL.match(text):
        try:
            location = parse_object_url(text, storage.endpoint_url)
        except S3UrlError as exc:
            raise Refused(str(exc)) from None
        return location.bucket, location.key
    if not text:
        raise Refused("an empty image key: pass an S3 URL or a key relative to S3_IMAGES_PREFIX")
    return storage.images_bucket, storage.image_key(image)


def resolve_image(storage: ImageStorage, image: str) -> dict[str, str]:
    """{"image", "partition", "etag", "source"} of one image, or Refused."""
    bucket, key = locate(storage, image)
    url = f"s3://{bucket}/{key}"
    images = f"s3://{storage.images_bucket}/{storage.images_prefix}"
    if bucket != storage.images_bucket or not key.startswith(storage.images_prefix):
        raise Refused(f"{url} is not among the pipeline's images ({images}): upload it there, or use "
                      "generate_3d_from_image_core for an image elsewhere")
    if storage.is_model_key(bucket, key):
        raise Refused(f"{url} is under S3_MODELS_PREFIX={storage.models_prefix!r}: a model or picture the pipeline "
                      "wrote, not an image")
    relative = storage.relative_key(key)
    if not relative:
        raise Refused(f"{url} names the images prefix itself, not an image in it")
    try:
        info = storage.head(bucket, key)
    except StorageError as exc:
        hint = "; upload it first" if exc.code == "NoSuchKey" else ""
        raise Refused(f"cannot submit {url}: {exc}{hint}") from None
    return {"image": image, "partition": partition_key_for(relative), "etag": info.etag, "source": url}


def _options(generator: GeneratorResource, request: dict[str, Any]) -> dict[str, str]:
    options = {k: request[k] for k in ("output_format", "texture") if request.get(k) not in (None, "")}
    for name, value in options.items():
        if not isinstance(value, str):
            raise Refused(f"{name} must be a string, got {value!r}")
    generator.settings(**options)  # raises ValueError naming the unsupported value
    return options


def resolve(context, storage: ImageStorage, generator: GeneratorResource, request: dict[str, Any]) -> dict[str, Any]:
    if not storage.images_bucket:
        return {"refused": [NO_BUCKET]}
    try:
        options = _options(generator, request)
    except ValueError as exc:
        return {"refused": [str(exc)]}
    resolved, refused = [], []
    for image in request.get("images", []):
        try:
            if not isinstance(image, str):
                raise Refused(f"an image is an S3 URL or a key (a string), got {image!r}")
            resolved.append(resolve_image(storage, image))
        except Refused as exc:
            refused.append(redact(str(exc)))
    if refused:
        return {"refused": refused}
    etags = {r["partition"]: r["etag"] for r in resolved}
    # recorded before the sensor's rows are read: see images/submitted.py
    record_submissions(context.instance, etags)
    batches, deadline = bool(request.get("batches")), time.monotonic() + TICK_WAIT_S  # one wait for all images
    taken = {} if options else {k: run for k, e in etags.items()
                                if (run := sensor_run(context.instance, k, e, batches, deadline))}
    known = set(existing_partitions(context.instance, list(etags)))
    return {"images": [{**r, "exists": r["partition"] in known, "run_id": taken.get(r["partition"])} for r in resolved],
            "options": options, "partitions_def": IMAGES_PARTITIONS_NAME}


def sensor_run(instance, key: str, etag: str, batches: bool = False, deadline: float | None = None) -> str | None:
    """The id of the sensor's run for this image version, for a submission to take instead of launching a second
    run: when that run is not ended, or succeeded less than INTENT_TTL_S ago (older, a run of its own shows the
    model is still there). A batch run of several images only when `batches` (submit_many: its result lists each
    image; a single submission's result is that of its image alone). Else None.

    The tick that wrote the image's catalog row may still be submitting its runs (it is the latest tick that
    requested anything): then its run is waited for, until `deadline` (default TICK_WAIT_S from now), or until
    the row says the tick left the image to this submission."""
    catalog = RequestedImages(instance)
    deadline = time.monotonic() + TICK_WAIT_S if deadline is None else deadline
    order: list[str] | None = None

    def partitions() -> list[str]:
        nonlocal order
        order = order if order is not None else instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
        return order

    while True:
        row = catalog.get([key]).get(key)
        if row is None or row.etag != etag or row.client:
            return None
        records = instance.get_run_records(RunsFilter(tags={SENSOR_TAG: IMAGES_SENSOR, TICK_TAG: str(row.seq)}))
        for record in sorted(records, key=lambda r: r.create_timestamp, reverse=True):  # a run retry first
            covered = keys_of(record.dagster_run.tags, partitions)
            if key not in covered:
                continue
            if len(covered) > 1 and not batches:
                return None
            status, ended = record.dagster_run.status, record.end_time
            recent = status == DagsterRunStatus.SUCCESS and ended and time.time() - ended < INTENT_TTL_S
            return record.dagster_run.run_id if status in IN_FLIGHT or recent else None
        if row.seq < catalog.high_seq() or time.monotonic() > deadline:
            return None  # that tick is over (a later one wrote rows) and made no run for it, or never will
        time.sleep(0.2)


def plan(context, generator: GeneratorResource, request: dict[str, Any]) -> dict[str, Any]:
    etags: dict[str, str] = request["etags"]
    keys = list(dict.fromkeys(request["partitions"]))
    order = context.instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
    missing = sorted(set(keys).difference(order))
    if missing:
        return {"refused": [f"partition {k!r} of {IMAGES_PARTITIONS_NAME!r} is not registered" for k in missing]}
    options = _options(generator, request)
    run_config = {"ops": {image_to_model.op.name: {"config": options}}} if options else {}
    size = burst_batch_size(len(keys), current().batch_size)
    runs = [{"partitions": batch, "tags": {**partition_tags(batch), **run_tags({k: etags[k] for k in batch})},
             "run_config": run_config} for batch in contiguous_batches(keys, order, size)]
    return {"job": JOB_NAME, "runs": runs}


def download(storage: ImageStorage, request: dict[str, Any]) -> dict[str, Any]:
    urls: dict[str, str | None] = {}
    for model_url in request.get("models", []):
        urls[model_url] = None
        try:
            location = parse_s3_url(model_url)
        except (S3UrlError, TypeError):
            continue
        if location.bucket != storage.models_bucket_name or not location.key.startswith(storage.models_prefix):
            continue  # only models: this must not presign any object the code location can read
        urls[model_url] = storage.sign(location.bucket, location.key, current().download_url_seconds)
    return {"urls": urls}


@sensor(
    name=SENSOR_NAME,
    default_status=DefaultSensorStatus.STOPPED,
    minimum_interval_seconds=3600,
    description="Answers hy3d_pipeline.client (checks an image before a submission, plans its runs, presigns "
    "model downloads) through the sensor test API: a request is the cursor of a dry run, the answer its new "
    "cursor. It does nothing on its own; leave it stopped.",
)
def client_requests(context: SensorEvaluationContext, storage: ImageStorage, generator: GeneratorResource):
    if not context.cursor:
        return SkipReason("nothing to do: this sensor answers hy3d_pipeline.client's requests (a dry run with a "
                          "request as its cursor)")
    request: Any = None
    try:
        request = json.loads(context.cursor)
        op = request.get("op")
        if op == "resolve":
            answer = resolve(context, storage, generator, request)
        elif op == "plan":
            answer = plan(context, generator, request)
        elif op == "download":
            answer = download(storage, request)
        else:
            answer = {"refused": [f"unknown request {op!r}: use resolve, plan or download"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        answer = {"refused": [f"malformed request: {redact(str(exc))}"]}
    return SensorResult(skip_reason=f"answered {request.get('op') if isinstance(request, dict) else 'a'} request",
                        cursor=json.dumps(answer, separators=(",", ":"), ensure_ascii=False))
