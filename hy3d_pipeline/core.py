"""The seed's single-image API, kept for callers outside Dagster (a web handler, a Celery task).

`generate_3d_from_image_core` takes a local path or any S3 URL form, returns the seed's result dict and never
raises for bad input. It runs the same functions as the `models_3d` asset.
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

        # a presigned input URL is a credential until it expires: never into the log or the message. The
        # record is marked as the result's own message, so a caller that shows the result (the CLI) can
        # leave it out instead of saying everything twice
        log.error("generation failed for %s: %s", redact(str(image_path)), redact(str(exc)),
                  extra={RESULT_MESSAGE: True})
        _notify(progress_callback, 100, "failed")
        return {"status": "error", "message": redact(str(exc) or type(exc).__name__), "source": str(image_path)}


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
        "source": source,
        "seconds": round(time.perf_counter() - start, 3),
        "notes": settings.ignored_notes(),
        **timer.seconds,
    }


def _input(source: str, scope: contextlib.ExitStack, timer, progress_callback) -> tuple[Path, str, str, str]:
    """(local file, name for messages, identity for the output name, seed key) of the input; a downloaded copy
    lives until `scope` closes."""
    from hy3d_pipeline.models.processing import LocalCopies, seed_key_for
    from hy3d_pipeline.s3.urls import is_s3_url, parse_s3_url

    if is_s3_url(source):
        from hy3d_pipeline.settings import current
        from hy3d_pipeline.storage.resources import ImageStorage

        location = parse_s3_url(source)
        storage = ImageStorage.from_env(images_bucket=location.bucket, region_name=location.region or current().region)
        copies = scope.enter_context(LocalCopies(storage))
        _notify(progress_callback, 5, "downloading")
        with timer.stage("download"):
            local = copies.fetch(storage.head(location.bucket, location.key))
        # the key the pipeline seeds with for the same object, so both make the same mesh
        seed_key = seed_key_for(_configured_storage(), location.bucket, location.key)
        return local, location.url, f"s3://{location.bucket}/{location.key}", seed_key
    if "://" in source:
        raise ValueError(f"{source!r} is neither a local path nor an S3 URL (s3://bucket/key or an amazonaws.com URL)")
    local = Path(source)
    if not local.is_file():
        raise FileNotFoundError(f"image not found: {source}")
    return local, source, str(local.resolve()), local.name


def _configured_storage():
    """The deployment's images bucket and prefix, as the code location reads them (no bucket when none is
    configured: then no URL is under the prefix, and the full key seeds)."""
    from hy3d_pipeline.storage.resources import ImageStorage

    return ImageStorage.from_env()
