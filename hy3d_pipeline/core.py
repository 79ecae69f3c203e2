"""The seed's single-image API, kept for callers outside Dagster (a web handler, a Celery task).

`generate_3d_from_image_core` takes a local path, any S3 URL form, a URL of the configured S3_ENDPOINT_URL, or a
presigned URL of either (fetched with its own signature: s3/presigned.py); returns the seed's result dict and
never raises for bad input. It runs the same functions as the `models_3d` asset.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("hy3d_pipeline")

ProgressCallback = Callable[[float, str], None]
# set on the log record of a failure whose message is the result's own `message`
RESULT_MESSAGE = "hy3d_result_message"


def output_dir() -> Path:
    from hy3d_pipeline.settings import current

    return Path(current().output_dir)


def output_name(stem: str, identity: str) -> str:
    """The file name (without extension) of a model made from the source `identity`: the image's stem plus a
    hash of the whole identity, because stems alone collide (`a/photo.png` and `b/photo.png`, or one key in two
    buckets) and one model would overwrite the other in the output folder."""
    return f"{stem or 'model'}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def _notify(callback: ProgressCallback | None, percent: float, status: str) -> None:
    if callback is None:
        return
    try:
        callback(float(percent), status)
    except Exception:  # noqa: BLE001 - a broken progress display must not fail the generation
        log.warning("progress_callback raised; ignoring it", exc_info=True)


def generate_3d_from_image_core(
    image_path: str,
    with_texture: bool = False,
    output_format: str = "glb",
    progress_callback: ProgressCallback | None = None,
    *,
    output_dir: str | os.PathLike | None = None,
    texture: str | None = None,
) -> dict[str, Any]:
    """Generate a 3D model from a local image or an S3 URL, written to `output_dir` (default HY3D_OUTPUT_DIR) as
    `<stem>-<hash of the source>.<format>`: the hash is of bucket and key for S3, of the absolute path for a
    local file, so two different sources never get the same model_path.

    `texture` (`none`, `projected`, `paint`) picks the texture mode; `with_texture=True` means `paint`; with
    neither, HY3D_TEXTURE decides.

    Returns {"status": "success", "model_path", "format", "backend", "texture", "vertices", "faces",
    "watertight", "source", "seconds", "notes"} or {"status": "error", "message"}. `notes` lists settings the
    backend ignored (say `texture` under `extrude`), empty when there are none.
    """
    start = time.perf_counter()
    try:
        mode = texture if texture is not None else ("paint" if with_texture else None)
        return _generate(image_path, mode, output_format, progress_callback, start, output_dir)
    except Exception as exc:  # noqa: BLE001 - the contract: an error dict, never an exception
        from hy3d_pipeline.s3.redact import redact

        # a presigned input URL is a credential until it expires: never into the log, the message or the dict.
        # The record is marked as the result's own message, so a caller that shows the result (the CLI) can
        # leave it out instead of saying everything twice
        shown = shown_source(str(image_path))
        log.error("generation failed for %s: %s", shown, redact(str(exc)), extra={RESULT_MESSAGE: True})
        _notify(progress_callback, 100, "failed")
        return {"status": "error", "message": redact(str(exc) or type(exc).__name__), "source": shown}


def shown_source(source: str) -> str:
    """`source` as it may be shown and returned: a presigned URL without its query, nothing secret in the rest."""
    from hy3d_pipeline.s3.redact import redact
    from hy3d_pipeline.s3.urls import is_presigned_url, without_query

    return redact(without_query(source) if is_presigned_url(source) else source)


def _generate(image_path, texture, output_format, progress_callback, start, out_dir) -> dict[str, Any]:
    from hy3d_pipeline.models.export import export_model, mesh_stats
    from hy3d_pipeline.models.generators.base import texture_made
    from hy3d_pipeline.models.processing import Timer, generate_mesh
    from hy3d_pipeline.models.resources import GeneratorResource

    if not isinstance(image_path, (str, os.PathLike)) or not str(image_path).strip():
        raise ValueError(f"image_path must be a local path or an S3 URL, got {image_path!r}")
    output_format = str(output_format).lower()
    settings = GeneratorResource.from_env().settings(output_format=output_format, texture=texture)
    source = str(image_path)
    timer = Timer()
    _notify(progress_callback, 0, "starting")
    with contextlib.ExitStack() as scope:
        local, name, identity, seed_key = _input(source, scope, timer, progress_callback)
        _notify(progress_callback, 20, "generating")
        mesh, prepared, generator = generate_mesh(local, name, settings, seed_key, timer)
    _notify(progress_callback, 85, "exporting")
    with timer.stage("export"):
        files = export_model(mesh, settings.output_format, output_name(Path(seed_key).stem, identity))
        out = Path(out_dir) if out_dir is not None else output_dir()
        out.mkdir(parents=True, exist_ok=True)
        for file_name, data in files:
            (out / file_name).write_bytes(data)
        stats = mesh_stats(mesh)
    _notify(progress_callback, 100, "done")
    return {
        "status": "success",
        "model_path": str((out / files[0][0]).resolve()),
        "format": settings.output_format,
        "backend": generator.name,
        "texture": texture_made(settings),
        "foreground_method": prepared.foreground_method,
        "vertices": stats["vertices"],
        "faces": stats["faces"],
        "watertight": stats["watertight"],
        "source": shown_source(source),
        "seconds": round(time.perf_counter() - start, 3),
        "notes": settings.ignored_notes(),
        **timer.seconds,
    }


def _input(source: str, scope: contextlib.ExitStack, timer, progress_callback) -> tuple[Path, str, str, str]:
    """(local file, name for messages, identity for the output name, seed key) of the input; a downloaded copy
    lives until `scope` closes."""
    from hy3d_pipeline.models.processing import LocalCopies, seed_key_for
    from hy3d_pipeline.s3.urls import is_presigned_url

    configured = _configured_storage()
    location = _s3_location(source, configured.endpoint_url)
    if location is not None:
        from hy3d_pipeline.settings import current
        from hy3d_pipeline.storage.resources import ImageStorage

        storage = ImageStorage.from_env(images_bucket=location.bucket, region_name=location.region or current().region)
        copies = scope.enter_context(LocalCopies(storage))
        _notify(progress_callback, 5, "downloading")
        with timer.stage("download"):
            if is_presigned_url(source):  # its own signature, not this worker's credentials
                local = copies.fetch_presigned(source, location)
            else:
                local = copies.fetch(storage.head(location.bucket, location.key))
        # the key the pipeline seeds with for the same object, so both make the same mesh
        seed_key = seed_key_for(configured, location.bucket, location.key)
        return local, location.url, _identity(source, location, configured.endpoint_url), seed_key
    local = Path(source)
    if not local.is_file():
        raise FileNotFoundError(f"image not found: {source}")
    return local, source, str(local.resolve()), local.name


def _configured_storage():
    """The deployment's images bucket and prefix, as the code location reads them (no bucket when none is
    configured: then no URL is under the prefix, and the full key seeds)."""
    from hy3d_pipeline.storage.resources import ImageStorage

    return ImageStorage.from_env()


def _s3_location(source: str, endpoint_url: str | None):
    """The S3 object `source` names, None when it is a local path; ValueError for a URL of anything else
    (the pipeline never fetches an arbitrary URL), saying which forms are accepted."""
    from hy3d_pipeline.s3.urls import S3UrlError, parse_object_url

    try:
        return parse_object_url(source, endpoint_url)
    except S3UrlError as exc:
        if "://" not in source:
            return None
        shown = shown_source(source)
        shown = shown if len(shown) <= 200 else f"{shown[:200]}... ({len(shown)} characters)"
        endpoint = (f"{shown_source(endpoint_url).rstrip('/')}/BUCKET/KEY (S3_ENDPOINT_URL)" if endpoint_url
                    else "with S3_ENDPOINT_URL set, URLs of that endpoint")
        raise ValueError(
            f"{shown!r} is neither a local path nor an S3 URL ({exc.reason}). Use a local path, s3://BUCKET/KEY, "
            "https://BUCKET.s3.REGION.amazonaws.com/KEY or https://s3.REGION.amazonaws.com/BUCKET/KEY, or "
            f"{endpoint}; any of these URLs may be presigned. An image elsewhere: download it and pass the "
            "local path, or upload it to the bucket") from None


def _identity(source: str, location, endpoint_url: str | None) -> str:
    """What tells this source from every other: s3://bucket/key, except for a presigned AWS URL while an
    S3_ENDPOINT_URL is configured (there s3://bucket/key means the endpoint's object, another one)."""
    from hy3d_pipeline.s3.urls import S3UrlError, is_presigned_url, parse_endpoint_url, without_query

    if endpoint_url and is_presigned_url(source):
        try:
            parse_endpoint_url(source, endpoint_url)
        except S3UrlError:
            return without_query(source)
    return location.url
