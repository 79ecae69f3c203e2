"""The three assets of the chain, computed together per partition: `source_images` -> `local_images` -> `models_3d`.

They are one subsettable multi-asset step rather than three steps because a failed image must not stop the
others: with separate steps, one bad key failing `local_images` would skip `models_3d` for every key of the run.
Here each key goes as far as it can, good keys are recorded as materialized, and the step fails at the end naming
only the bad ones. Selecting a single asset in the UI works too (`can_subset`). The whole step runs in the `gpu` pool.

Inside the step, three kinds of work overlap: two threads download the next images, one thread makes models
(generate, measure, picture: `processing.make_model`), and the step's own thread uploads the model just made and
records it. Uploads are S3 round trips and recording is Dagster storage round trips (about a dozen events per
image); in one thread they would add to every image's time. The generation thread never writes to Dagster, so
event order and storage connections stay the step thread's. At most two images' results are in memory.

The asset checks on `models_3d` (checks.py) run in the same step, right after each model is made, while its
mesh and the input's mask are in memory. They are partitioned like the asset: each key's evaluation is recorded
against that key and its new materialization. `AssetCheckResult` cannot name a partition (Dagster takes it
from the step, and a batch step spans a range), so the step records `AssetCheckEvaluation`s itself.
"""


import functools
import socket
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Optional

from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetObservation,
    AssetRecordsFilter,
    AssetSpec,
    Backoff,
    BackfillPolicy,
    Config,
    Failure,
    MetadataValue,
    Output,
    PreviewWarning,
    RetryPolicy,
    multi_asset,
)
from hy3d_pipeline.dagster_private import check_target
from hy3d_pipeline.images.partitions import LOCAL, MODELS, SOURCE, images_partitions, relative_key_for
from hy3d_pipeline.models.checks import CHECKS
from hy3d_pipeline.models.resources import GeneratorResource, choice
from hy3d_pipeline.settings import OutputFormat, TextureMode, current
from hy3d_pipeline.models.generators.base import GenerationError, texture_made
from hy3d_pipeline.storage.base import StorageError
from hy3d_pipeline.s3.redact import redact
from hy3d_pipeline.storage.resources import ImageStorage, ObjectInfo

DATA_VERSION_TAG = "dagster/data_version"
FAILED_PARTITIONS = "failed_partitions"  # the step Failure's metadata: {partition: message} of the images that failed


def step_failures(failure_data) -> dict[str, str] | None:
    """{partition: message} carried by a step failure's `user_failure_data` (None when it names none)."""
    failed = failure_data.metadata.get(FAILED_PARTITIONS) if failure_data is not None else None
    return {str(k): str(v) for k, v in failed.value.items()} if failed is not None and isinstance(
        failed.value, dict) else None
PREFETCH = 2


@dataclass
class _Image:
    """One image's attempts, made in the generation thread, for the step's thread to record."""

    records: list = field(default_factory=list)  # AssetMaterialization / AssetObservation, in order
    logs: list[tuple[str, str]] = field(default_factory=list)  # (level, message)
    judged: Any = None  # the ModelOutcome the checks judge
    info: Any = None  # the ObjectInfo a model was made from
    made: Any = None  # make_model's result (a MadeModel to upload, or the existing model's outcome)
    failure: tuple[str, bool] | None = None  # (message, transient)


FORMAT_CHOICES, TEXTURE_CHOICES = choice(OutputFormat), choice(TextureMode)


class ModelsRunConfig(Config):
    """Per-run overrides, settable in the UI's launchpad (which offers the choices)."""

    output_format: Optional[FORMAT_CHOICES] = None  # noqa: UP007 - Dagster's schema reads Optional
    texture: Optional[TEXTURE_CHOICES] = None  # noqa: UP007


specs = [
    AssetSpec(SOURCE, partitions_def=images_partitions, skippable=True, group_name="hy3d",
              description="The image objects in S3 (ETag is the data version: an overwrite makes downstream stale)."),
    AssetSpec(LOCAL, deps=[SOURCE], partitions_def=images_partitions, skippable=True, group_name="hy3d",
              description="A verified local copy: checked by content (JPEG, PNG, BMP, TIFF, WEBP), size and ETag."),
    AssetSpec(MODELS, deps=[LOCAL], partitions_def=images_partitions, skippable=True, group_name="hy3d",
              description="The generated 3D model, uploaded next to the images under S3_MODELS_PREFIX."),
]

# Partitioned asset checks are a preview feature in Dagster 1.13; the warning would print on every load.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", PreviewWarning)
    check_specs = [AssetCheckSpec(name, asset=MODELS, partitions_def=images_partitions, description=text)
                   for name, text in CHECKS.items()]


def _source_metadata(info: ObjectInfo) -> dict[str, Any]:
    return {
        "url": MetadataValue.text(info.url),
        "etag": info.etag,
        "size": info.size,
        "content_type": info.content_type or "",
        "last_modified": info.last_modified.isoformat() if info.last_modified else "",
    }


def _inline(picture, alt: str) -> dict[str, Any]:
    """A picture as inline markdown metadata (`{}` without one); see thumbnails.inline_markdown."""
    if picture is None:
        return {}
    from hy3d_pipeline.models.thumbnails import inline_markdown

    return {alt: MetadataValue.md(inline_markdown(picture, alt))}



def _check_evaluations(context: AssetExecutionContext, key: str, outcome, max_faces: int,
                       wanted: set[AssetCheckKey]):
    """This key's check verdicts, recorded against its partition and the materialization just made."""
    from hy3d_pipeline.models.checks import evaluate

    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=MODELS, asset_partitions=[key]), limit=1).records
    # without it the UI shows the verdict as stale
    target = check_target(records[0]) if records else None
    for verdict in evaluate(outcome.figures, max_faces):
        if AssetCheckKey(MODELS, verdict.name) not in wanted:
            continue
        yield AssetCheckEvaluation(
            asset_key=MODELS, check_name=verdict.name, passed=verdict.passed, partition=key,
            severity=AssetCheckSeverity.WARN if verdict.severity == "WARN" else AssetCheckSeverity.ERROR,
            description=verdict.description, target_materialization_data=target, blocking=False,
            metadata={**verdict.metadata, "measured": outcome.measured, "model_url": MetadataValue.text(outcome.model_url)},
        )


def _model_metadata(outcome, info: ObjectInfo, settings) -> dict[str, Any]:
    return {
        # the pictures first: the UI lists metadata in this order
        **_inline(outcome.picture, "thumbnail"),
        **_inline(outcome.input_preview, "input"),
        **outcome.metadata(),
        "model_url": MetadataValue.text(outcome.model_url),
        "source_etag": info.etag,
        # what the model was made with, which an OOM retry may have lowered (processing.settings_used)
        "settings": outcome.settings_fingerprint or settings.fingerprint(),
        "output_format": settings.output_format,
        "texture": texture_made(settings),
        "bounds": MetadataValue.json(outcome.stats.get("bounds", outcome.figures.get("bounds", []))),
        **({"notes": MetadataValue.json(outcome.notes)} if outcome.notes else {}),
    }



def _failure_of(exc: Exception) -> tuple[str, bool]:
    """(message, transient) of one image's failure: S3 faults say whether a retry may help, refused images
    (ImageRejected is a ValueError) and generation errors speak for themselves, anything else names its type."""
    if isinstance(exc, StorageError):
        return str(exc), exc.transient
    if isinstance(exc, (GenerationError, ValueError)):
        return str(exc), False
    return f"{type(exc).__name__}: {exc}", False


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None where there is none (macOS, musl)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_free_memory() -> None:
    """Hand memory freed by the last image back to the system. Three threads allocate meshes, pictures and
    buffers, each in a malloc arena of its own, and glibc keeps what they free: a 100-image run grew by 68 MB from
    image 10 to 100 without this (`bench/memory_growth.py`) and shrank with it; one call costs about a millisecond."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _done_earlier_in_run(context: AssetExecutionContext, keys: list[str], selected) -> set[str]:
    """Keys whose every selected asset was recorded by an earlier attempt of this step (this run's event log).

    The step keeps its retry policy for faults that outlast an image's own attempts (S3 away for longer), but
    a step retry must not download and regenerate, or record again, the images that were fine. A process that
    dies ends the run instead; a re-executed run finds their models by ETag and settings (existing_model)."""
    from dagster import DagsterEventType

    wanted = {SOURCE, LOCAL, MODELS} & set(selected)
    if not wanted:
        return set()
    seen: dict[str, set[AssetKey]] = {}
    records = context.instance.get_records_for_run(
        context.run.run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION}).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.event_specific_data if event else None
        recorded = getattr(data, "materialization", None) or getattr(data, "asset_observation", None)
        if recorded is None or recorded.partition is None:
            continue
        if isinstance(recorded, AssetObservation) and not recorded.metadata.get("superseded"):
            continue
        seen.setdefault(recorded.partition, set()).add(recorded.asset_key)
    return {k for k in keys if wanted <= seen.get(k, set())}


@multi_asset(
    name="image_to_model",
    specs=specs,
    check_specs=check_specs,
    can_subset=True,
    partitions_def=images_partitions,
    pool="gpu",
    retry_policy=RetryPolicy(max_retries=3, delay=2, backoff=Backoff.EXPONENTIAL),
    backfill_policy=BackfillPolicy.multi_run(current().batch_size),
)
def image_to_model(context: AssetExecutionContext, config: ModelsRunConfig, storage: ImageStorage,
                   generator: GeneratorResource):
    from hy3d_pipeline.fleet.liveness import mark_run_process
    from hy3d_pipeline.models import progress
    from hy3d_pipeline.models.processing import (Fetched, LocalCopies, MadeModel, existing_for_checks, fetch,
                                                 make_model)

    mark_run_process(context)
    selected = context.selected_asset_keys
    checks = {k for k in context.selected_asset_check_keys if k.asset_key == MODELS}
    settings = generator.settings(output_format=config.output_format, texture=config.texture)
    keys = list(context.partition_keys)
    want_local = LOCAL in selected or MODELS in selected or bool(checks)
    failures: dict[str, tuple[str, bool]] = {}
    host = socket.gethostname()

    # what dead runs left (a SIGKILLed download's .part, copies no one consumed); live writers are too young
    storage.sweep_temp()
    done = _done_earlier_in_run(context, keys, selected) if context.retry_number > 0 else set()
    if done:
        context.log.info(f"step retry {context.retry_number}: {len(done)} image(s) already done in this run, "
                         "not redone")
    todo = [k for k in keys if k not in done]
    attempts, first_delay = current().image_attempts, current().image_retry_delay

    def one_image(key: str, download: Future) -> _Image:
        """Every attempt at one image, in the generation thread: what to record, say and whether it failed.
        Nothing here writes to Dagster: the step's thread records it while this thread goes on to the next."""
        image = _Image()
        emitted: dict[AssetKey, str] = {}  # asset -> ETag recorded, so a retry records a version only once
        if stopping.is_set():  # the step is ending: no new image is started
            image.failure = ("not processed: the step was stopped", True)
            return image
        for attempt in range(attempts):
            path, failure = None, None
            try:
                # a retry fetches afresh (HEAD too): the fault may have been the object changing
                got = download.result() if attempt == 0 else get(key)
                info, path = got.info, got.path
                if SOURCE in selected and emitted.get(SOURCE) != info.etag:
                    emitted[SOURCE] = info.etag
                    image.records.append(AssetMaterialization(asset_key=SOURCE, partition=key,
                                                             metadata=_source_metadata(info),
                                                             tags={DATA_VERSION_TAG: info.etag}))
                if got.error is not None:
                    raise got.error
                if LOCAL in selected and emitted.get(LOCAL) != info.etag:
                    emitted[LOCAL] = info.etag
                    image.records.append(AssetMaterialization(asset_key=LOCAL, partition=key, metadata={
                        **_inline(got.preview, "thumbnail"), "path": MetadataValue.path(str(path)),
                        "host": host, "etag": info.etag, "size": info.size, **(got.facts or {}),
                    }))
                if MODELS in selected:  # made here, uploaded by the step's thread (upload_and_record)
                    image.info = info
                    image.made = make_model(storage, info, key, settings, got.timer, local_path=path, copies=copies)
                elif checks:  # the checks alone (the UI's "Execute checks"): judge the model there is
                    image.judged = existing_for_checks(storage, info, settings, got.timer, path, copies)
            except Exception as exc:  # noqa: BLE001 - one image's surprise must not cost the others theirs
                failure = _failure_of(exc)
            except BaseException:  # an interrupt, an exit: the step ends, and the image queued next is not begun
                stopping.set()
                raise
            finally:
                # a copy stays only when `local_images` was materialized for inspection, nothing used it up
                if MODELS in selected or LOCAL not in selected:
                    copies.release(path)
                else:
                    copies.keep(path)
            image.failure = failure
            if failure is None or not failure[1] or attempt + 1 == attempts or stopping.is_set():
                break
            # transient: this image alone is tried again, the good ones of the batch are not redone
            delay = first_delay * 2 ** attempt
            image.logs.append(("warning", f"image {key!r} failed (attempt {attempt + 1} of {attempts}), "
                                         f"retrying in {delay:g} s: {failure[0]}"))
            stopping.wait(delay)
        return image

    def upload_and_record(key: str, image: _Image) -> None:
        """In the step's thread: upload a made model (while the next one is made) and record it. A transient
        fault is retried here, the upload alone: the model in memory is not made again."""
        made, info = image.made, image.info
        for attempt in range(attempts):
            try:
                outcome = made.upload() if isinstance(made, MadeModel) else made
                image.failure = None
            except Exception as exc:  # noqa: BLE001 - as in one_image
                image.failure = _failure_of(exc)
            if image.failure is None or not image.failure[1] or attempt + 1 == attempts:
                break
            delay = first_delay * 2 ** attempt
            context.log.warning(f"image {key!r}: upload failed (attempt {attempt + 1} of {attempts}), retrying in "
                                f"{delay:g} s: {image.failure[0]}")
            time.sleep(delay)
        if image.failure is not None:
            return
        if outcome.superseded:
            # not a failure (a retry would only be superseded again) and not a materialization (the model in S3
            # is the newer version's): an observation says what happened
            image.logs.append(("warning", f"image {key!r}: {outcome.superseded}"))
            image.records.append(AssetObservation(asset_key=MODELS, partition=key, metadata={
                "superseded": True, "message": outcome.superseded, "source_etag": info.etag,
                "current_source_etag": outcome.current_source_etag,
                "model_url": MetadataValue.text(outcome.model_url), **outcome.worker}))
        else:
            image.records.append(AssetMaterialization(asset_key=MODELS, partition=key,
                                                      metadata=_model_metadata(outcome, info, settings)))
            image.judged = outcome

    def get(key: str) -> Fetched:
        return fetch(storage, copies, relative_key_for(key), download=want_local, verify=LOCAL in selected)

    position = {k: n for n, k in enumerate(keys, 1)}  # progress counts over the whole run, retries included
    stopping = threading.Event()
    with LocalCopies(storage) as copies:
        fetching = ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="hy3d-fetch")
        # one generation thread: the generator is used by one thread at a time, and the step's thread uploads
        # and records the previous image (S3 and Dagster storage round trips) while this one generates
        generating = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hy3d-generate")
        downloads: dict[str, Future] = {}
        images: dict[str, Future] = {}

        def submit(i: int) -> None:
            for ahead in todo[i:i + PREFETCH + 1]:  # the next images download while this one generates
                if ahead not in downloads:
                    downloads[ahead] = fetching.submit(get, ahead)
            if todo[i] not in images:
                images[todo[i]] = generating.submit(one_image, todo[i], downloads[todo[i]])

        try:
            for i, key in enumerate(todo):
                progress.report(context.log, position[key], len(keys), key, "downloading")
                for n in range(i, min(i + 2, len(todo))):  # this image, and the next queued behind it: two in memory
                    submit(n)
                fetched = downloads.pop(key)
                if MODELS in selected:
                    wait([fetched])
                    progress.report(context.log, position[key], len(keys), key, "generating")
                result = images.pop(key).result()
                if result.made is not None:
                    upload_and_record(key, result)
                for level, message in result.logs:
                    getattr(context.log, level)(message)
                for record in result.records:
                    yield record
                    if record.asset_key == MODELS and isinstance(record, AssetMaterialization):
                        yield from _check_evaluations(context, key, result.judged, settings.max_faces, checks)
                if result.judged is not None and MODELS not in selected:
                    yield from _check_evaluations(context, key, result.judged, settings.max_faces, checks)
                if result.failure is None:
                    failures.pop(key, None)
                else:
                    failures[key] = result.failure
                    context.log.error(f"image {key!r} failed: {failures[key][0]}")
                progress.report(context.log, position[key], len(keys), key, "failed" if key in failures else "done")
                del result
                return_free_memory()
        finally:
            # a terminated run or a raise: images and downloads not started are cancelled, the ones in flight are
            # waited for (bounded by one image's generation and S3_DOWNLOAD_TIMEOUT); LocalCopies then deletes
            # every copy nothing consumed
            stopping.set()
            generating.shutdown(wait=True, cancel_futures=True)
            fetching.shutdown(wait=True, cancel_futures=True)

    # one output per selected check, as Dagster expects of a step with checks; the evaluations above carry the results
    names = {spec.key: name for name, spec in context.assets_def.check_specs_by_output_name.items()}
    for check_key in sorted(checks, key=lambda k: k.name):
        if check_key in names:
            yield Output(None, output_name=names[check_key])

    if failures:
        # the message itself says whether a retry follows: it is read in the UI, the report and demo output
        policy = context.op_execution_context.op_def.retry_policy
        retrying = policy is not None and context.retry_number < policy.max_retries
        note = " (transient: this step will be retried)" if retrying else " (transient, but the retries are used up)"
        failures = {k: (redact(msg) + (note if transient else ""), transient) for k, (msg, transient) in failures.items()}
        raise Failure(
            description=f"{len(failures)} of {len(keys)} image(s) failed: "
            + "; ".join(f"{k}: {msg}" for k, (msg, _) in list(failures.items())[:10]),
            metadata={FAILED_PARTITIONS: MetadataValue.json({k: msg for k, (msg, _) in failures.items()})},
            allow_retries=any(transient for _, transient in failures.values()),
        )
