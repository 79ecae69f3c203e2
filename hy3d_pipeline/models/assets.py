"""The three assets of the chain, computed together per partition: `source_images` -> `local_images` -> `models_3d`.

They are one subsettable multi-asset step rather than three steps because a failed image must not stop the
others: with separate steps, one bad key failing `local_images` would skip `models_3d` for every key of the run.
Here each key goes as far as it can, good keys are recorded as materialized, and the step fails at the end naming
only the bad ones. One step also lets the next image download while the current one generates, and the whole
step runs in the `gpu` pool. Selecting a single asset in the UI works too (`can_subset`).

The asset checks on `models_3d` (checks.py) run in the same step, right after each model is made, while its
mesh and the input's mask are in memory. They are partitioned like the asset: each key's evaluation is recorded
against that key and its new materialization. `AssetCheckResult` cannot name a partition (Dagster takes it
from the step, and a batch step spans a range), so the step records `AssetCheckEvaluation`s itself.
"""


import os
import socket
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

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
# not re-exported by dagster, yet what ties a check evaluation to the materialization it judged (without it the
# UI shows the verdict as stale); AssetCheckResult builds the same object internally
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from hy3d_pipeline.images.partitions import images_partitions, relative_key_for
from hy3d_pipeline.images.planner import batch_size
from hy3d_pipeline.models.checks import CHECKS
from hy3d_pipeline.models.resources import GeneratorResource
from hy3d_pipeline.models.generators.base import GenerationError
from hy3d_pipeline.s3.errors import S3AccessError
from hy3d_pipeline.s3.redact import redact
from hy3d_pipeline.s3.resources import ImageStorage, ObjectInfo

SOURCE, LOCAL, MODELS = AssetKey("source_images"), AssetKey("local_images"), AssetKey("models_3d")
DATA_VERSION_TAG = "dagster/data_version"
PREFETCH = 2


class ModelsRunConfig(Config):
    """Per-run overrides, settable in the UI's launchpad."""

    output_format: str | None = None
    texture: str | None = None


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


def _fetch(storage: ImageStorage, key: str, want_local: bool, want_verify: bool):
    """Runs in a prefetch thread: HEAD, then the verified download when a selected asset needs it. A failure
    after the HEAD is returned, not raised, so the object itself is still recorded as a source image."""
    from hy3d_pipeline.models.processing import Timer

    timer = Timer()
    with timer.stage("head"):
        info = storage.head(storage.images_bucket, storage.image_key(relative_key_for(key)))
    path = verified = None
    try:
        if want_local:
            with timer.stage("download"):
                path = storage.download(info)
            if want_verify:
                from hy3d_pipeline.images.validation import verify_image
                from hy3d_pipeline.models.thumbnails import image_preview

                with timer.stage("verify"):
                    verified = verify_image(path, info.url)
                with timer.stage("preview"):
                    try:
                        verified = {**_inline(image_preview(path), "thumbnail"), **verified}
                    except Exception:  # noqa: BLE001 - a verified image without a preview is still good
                        pass
    except Exception as exc:  # noqa: BLE001 - re-raised by the consumer, after the source is recorded
        if path is not None:
            storage.discard_local(path)
        return info, None, None, timer, exc
    return info, path, verified, timer, None


def _check_evaluations(context: AssetExecutionContext, key: str, outcome, max_faces: int,
                       wanted: set[AssetCheckKey]):
    """This key's check verdicts, recorded against its partition and the materialization just made."""
    from hy3d_pipeline.models.checks import evaluate

    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=MODELS, asset_partitions=[key]), limit=1).records
    target = (AssetCheckEvaluationTargetMaterializationData(
        storage_id=records[0].storage_id, run_id=records[0].run_id, timestamp=records[0].timestamp)
        if records else None)
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
        "bounds": MetadataValue.json(outcome.stats.get("bounds", outcome.figures.get("bounds", []))),
        **({"notes": MetadataValue.json(outcome.notes)} if outcome.notes else {}),
    }


def _existing_for_checks(storage: ImageStorage, info: ObjectInfo, settings, timer, path):
    from hy3d_pipeline.models.processing import complete_existing, existing_model

    model_key = storage.model_key(storage.relative_key(info.key), settings.output_format)
    done = existing_model(storage, model_key, info, settings)
    if done is None:
        raise GenerationError(f"{info.url}: no model made from this version of the image with these settings "
                              f"at s3://{storage.models_bucket_name}/{model_key}; materialize models_3d first")
    return complete_existing(storage, done, info, settings, path, timer)


def image_attempts() -> int:
    """Tries per image for transient failures (HY3D_IMAGE_ATTEMPTS, default 3)."""
    return max(1, int(os.getenv("HY3D_IMAGE_ATTEMPTS") or 3))


def image_retry_delay() -> float:
    """Seconds before an image's first retry, doubled for each further one (HY3D_IMAGE_RETRY_DELAY, default 1)."""
    return max(0.0, float(os.getenv("HY3D_IMAGE_RETRY_DELAY") or 1.0))


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
        context.run_id, of_type={DagsterEventType.ASSET_MATERIALIZATION, DagsterEventType.ASSET_OBSERVATION}).records
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
    backfill_policy=BackfillPolicy.multi_run(batch_size()),
)
def image_to_model(context: AssetExecutionContext, config: ModelsRunConfig, storage: ImageStorage,
                   generator: GeneratorResource):
    from hy3d_pipeline.fleet.liveness import mark_run_process
    from hy3d_pipeline.models.processing import process_object

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
    attempts, first_delay = image_attempts(), image_retry_delay()

    pool = ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="hy3d-fetch")
    futures: dict[str, Future] = {}

    def ahead(i: int) -> None:
        for k in todo[i:i + PREFETCH + 1]:
            if k not in futures:
                futures[k] = pool.submit(_fetch, storage, k, want_local, LOCAL in selected)

    try:
        for i, key in enumerate(todo):
            ahead(i)
            emitted: dict[AssetKey, str] = {}  # asset -> ETag recorded, so a retry records a version only once
            for attempt in range(attempts):
                path = None
                try:
                    # a retry fetches afresh (HEAD too): the fault may have been the object changing
                    info, path, verified, timer, error = (futures.pop(key).result() if attempt == 0 else
                                                          _fetch(storage, key, want_local, LOCAL in selected))
                    if SOURCE in selected and emitted.get(SOURCE) != info.etag:
                        emitted[SOURCE] = info.etag
                        yield AssetMaterialization(asset_key=SOURCE, partition=key, metadata=_source_metadata(info),
                                                   tags={DATA_VERSION_TAG: info.etag})
                    if error is not None:
                        raise error
                    if LOCAL in selected and emitted.get(LOCAL) != info.etag:
                        emitted[LOCAL] = info.etag
                        yield AssetMaterialization(asset_key=LOCAL, partition=key, metadata={
                            "path": MetadataValue.path(str(path)), "host": host, "etag": info.etag, "size": info.size,
                            **(verified or {}),
                        })
                    if MODELS in selected:
                        outcome = process_object(storage, info, key, settings, timer, local_path=path)
                        path = None  # process_object owns the local copy now
                        if outcome.superseded:
                            # not a failure (a retry would only be superseded again) and not a materialization (the
                            # model in S3 is the newer version's): an observation says what happened to this one
                            context.log.warning(f"image {key!r}: {outcome.superseded}")
                            yield AssetObservation(asset_key=MODELS, partition=key, metadata={
                                "superseded": True, "message": outcome.superseded, "source_etag": info.etag,
                                "current_source_etag": outcome.current_source_etag,
                                "model_url": MetadataValue.text(outcome.model_url), **outcome.worker})
                        else:
                            yield AssetMaterialization(asset_key=MODELS, partition=key,
                                                       metadata=_model_metadata(outcome, info, settings))
                            yield from _check_evaluations(context, key, outcome, settings.max_faces, checks)
                    elif checks:  # the checks alone (the UI's "Execute checks"): judge the model there is, make none
                        outcome = _existing_for_checks(storage, info, settings, timer, path)
                        yield from _check_evaluations(context, key, outcome, settings.max_faces, checks)
                    failures.pop(key, None)
                except S3AccessError as exc:
                    failures[key] = (str(exc), exc.transient)
                except (GenerationError, ValueError) as exc:  # ImageRejected is a ValueError
                    failures[key] = (str(exc), False)
                except Exception as exc:  # noqa: BLE001 - one image's surprise must not cost the others theirs
                    failures[key] = (f"{type(exc).__name__}: {exc}", False)
                finally:
                    # a copy stays only when `local_images` was materialized for inspection and nothing used it up
                    if path is not None and (MODELS in selected or LOCAL not in selected):
                        storage.discard_local(path)
                if key not in failures or not failures[key][1] or attempt + 1 == attempts:
                    break
                # transient: this image alone is tried again, the good ones of the batch are not redone
                delay = first_delay * 2 ** attempt
                context.log.warning(f"image {key!r} failed (attempt {attempt + 1} of {attempts}), "
                                    f"retrying in {delay:g} s: {failures[key][0]}")
                time.sleep(delay)
            if key in failures:
                context.log.error(f"image {key!r} failed: {failures[key][0]}")
    finally:
        # on any exit (a raise, a terminated run): prefetched copies nothing will consume are deleted here, not
        # left for a later sweep; a download in flight is waited for (bounded by S3_DOWNLOAD_TIMEOUT)
        for future in futures.values():
            future.cancel()
        pool.shutdown(wait=True)
        for future in futures.values():
            if not future.cancelled() and future.exception() is None and future.result()[1] is not None:
                storage.discard_local(future.result()[1])

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
            metadata={"failed_partitions": MetadataValue.json({k: msg for k, (msg, _) in failures.items()})},
            allow_retries=any(transient for _, transient in failures.values()),
        )
