"""The three assets of the chain, computed together per partition: `source_images` -> `local_images` -> `models_3d`.

They are one subsettable multi-asset step rather than three steps because a failed image must not stop the
others: with separate steps, one bad key failing `local_images` would skip `models_3d` for every key of the run.
Here each key goes as far as it can, good keys are recorded as materialized, and the step fails at the end naming
only the bad ones. One step also lets the next image download while the current one generates, and the whole
step runs in the `gpu` pool. Selecting a single asset in the UI works too (`can_subset`).
"""


import socket
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetMaterialization,
    AssetSpec,
    Backoff,
    BackfillPolicy,
    Config,
    Failure,
    MetadataValue,
    RetryPolicy,
    multi_asset,
)

from hy3d_pipeline.images.partitions import images_partitions, relative_key_for
from hy3d_pipeline.images.planner import batch_size
from hy3d_pipeline.models.resources import GeneratorResource
from hy3d_pipeline.models.generators.base import GenerationError
from hy3d_pipeline.s3.errors import S3AccessError
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


def _source_metadata(info: ObjectInfo) -> dict[str, Any]:
    return {
        "url": MetadataValue.text(info.url),
        "etag": info.etag,
        "size": info.size,
        "content_type": info.content_type or "",
        "last_modified": info.last_modified.isoformat() if info.last_modified else "",
    }


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

                with timer.stage("verify"):
                    verified = verify_image(path, info.url)
    except Exception as exc:  # noqa: BLE001 - re-raised by the consumer, after the source is recorded
        if path is not None:
            storage.discard_local(path)
        return info, None, None, timer, exc
    return info, path, verified, timer, None


@multi_asset(
    name="image_to_model",
    specs=specs,
    can_subset=True,
    partitions_def=images_partitions,
    pool="gpu",
    retry_policy=RetryPolicy(max_retries=3, delay=2, backoff=Backoff.EXPONENTIAL),
    backfill_policy=BackfillPolicy.multi_run(batch_size()),
)
def image_to_model(context: AssetExecutionContext, config: ModelsRunConfig, storage: ImageStorage,
                   generator: GeneratorResource):
    from hy3d_pipeline.models.processing import process_object

    selected = context.selected_asset_keys
    settings = generator.settings(output_format=config.output_format, texture=config.texture)
    keys = list(context.partition_keys)
    want_local = LOCAL in selected or MODELS in selected
    failures: dict[str, tuple[str, bool]] = {}
    host = socket.gethostname()

    with ThreadPoolExecutor(max_workers=PREFETCH, thread_name_prefix="hy3d-fetch") as pool:
        futures: dict[str, Future] = {}

        def ahead(i: int) -> None:
            for k in keys[i:i + PREFETCH + 1]:
                if k not in futures:
                    futures[k] = pool.submit(_fetch, storage, k, want_local, LOCAL in selected)

        for i, key in enumerate(keys):
            ahead(i)
            path = None
            try:
                info, path, verified, timer, error = futures.pop(key).result()
                if SOURCE in selected:
                    yield AssetMaterialization(asset_key=SOURCE, partition=key, metadata=_source_metadata(info),
                                               tags={DATA_VERSION_TAG: info.etag})
                if error is not None:
                    raise error
                if LOCAL in selected:
                    yield AssetMaterialization(asset_key=LOCAL, partition=key, metadata={
                        "path": MetadataValue.path(str(path)), "host": host, "etag": info.etag, "size": info.size,
                        **(verified or {}),
                    })
                if MODELS in selected:
                    outcome = process_object(storage, info, key, settings, timer, local_path=path)
                    path = None  # process_object owns the local copy now
                    yield AssetMaterialization(asset_key=MODELS, partition=key, metadata={
                        **outcome.metadata(),
                        "model_url": MetadataValue.text(outcome.model_url),
                        "source_etag": info.etag,
                        "settings": settings.fingerprint(),
                        "output_format": settings.output_format,
                        "bounds": MetadataValue.json(outcome.stats.get("bounds", [])),
                    })
            except S3AccessError as exc:
                failures[key] = (str(exc), exc.transient)
            except (GenerationError, ValueError) as exc:  # ImageRejected is a ValueError
                failures[key] = (str(exc), False)
            except Exception as exc:  # noqa: BLE001 - one image's surprise must not cost the others theirs
                failures[key] = (f"{type(exc).__name__}: {exc}", False)
            finally:
                if path is not None and MODELS in selected:
                    storage.discard_local(path)
            if key in failures:
                context.log.error(f"image {key!r} failed: {failures[key][0]}")

    if failures:
        raise Failure(
            description=f"{len(failures)} of {len(keys)} image(s) failed: "
            + "; ".join(f"{k}: {msg}" for k, (msg, _) in list(failures.items())[:10]),
            metadata={"failed_partitions": MetadataValue.json({k: msg for k, (msg, _) in failures.items()})},
            allow_retries=any(transient for _, transient in failures.values()),
        )
