"""One image through the whole chain: fetch, verify, generate, measure, picture, export, upload.

The asset, the seed API and the benchmark's plain-loop baseline all call these functions, so the product and
its baseline do exactly the same work. Heavy imports (PIL, trimesh, the backend) happen inside, never at
package import.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hy3d_pipeline.models.generators.base import GenerationError, GenerationSettings, load_generator
from hy3d_pipeline.s3.resources import ImageStorage, ObjectInfo

MODEL_CONTENT_TYPES = {
    "glb": "model/gltf-binary",
    "obj": "model/obj",
    "ply": "application/ply",
    "stl": "model/stl",
    "mtl": "model/mtl",
    "png": "image/png",
}
# S3 user metadata on every model we write: what it was made from, so identical work is never repeated
META_SOURCE_ETAG = "hy3d-source-etag"
META_SETTINGS = "hy3d-settings"
META_GENERATOR = "hy3d-generator"
META_STATS = "hy3d-stats"
MEASURED_NOW, MEASURED_AT_GENERATION = "now", "at generation"


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"{name}_s"] = round(self.seconds.get(f"{name}_s", 0.0) + time.perf_counter() - start, 4)


@dataclass
class ModelOutcome:
    model_url: str
    model_key: str
    skipped: bool
    stats: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    backend: str = ""
    foreground_method: str = ""
    file_size: int = 0
    extra_files: list[str] = field(default_factory=list)
    # what the checks read (checks.measure), and whether it was measured in this run or stored with the model
    figures: dict[str, Any] = field(default_factory=dict)
    measured: str = MEASURED_NOW
    thumbnail_url: str = ""
    picture: Any = None  # the model's render (PIL image), for previews in metadata
    input_preview: Any = None  # the input picture (PIL image)
    notes: list[str] = field(default_factory=list)  # what went wrong without costing the model (a picture)

    def metadata(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model_url": self.model_url,
            "skipped_existing": self.skipped,
            "file_size": self.file_size,
            "foreground_method": self.foreground_method,
            **self.stats,
            **({"silhouette_iou": self.figures["silhouette_iou"]} if "silhouette_iou" in self.figures else {}),
            **({"thumbnail_url": self.thumbnail_url} if self.thumbnail_url else {}),
            **self.timings,
        }


def existing_model(storage: ImageStorage, model_key: str, source: ObjectInfo, settings: GenerationSettings):
    """The outcome recorded on a model already generated from this exact source version and settings, if any."""
    head = storage.head_or_none(storage.models_bucket_name, model_key, forbidden_is_absent=True)
    if not head:
        return None
    meta = head.get("Metadata", {})
    if meta.get(META_SOURCE_ETAG) != source.etag or meta.get(META_SETTINGS) != settings.fingerprint():
        return None
    stats = json.loads(meta.get(META_STATS) or "{}")
    mesh = stats.get("mesh", {})
    return ModelOutcome(
        model_url=f"s3://{storage.models_bucket_name}/{model_key}", model_key=model_key, skipped=True,
        stats={k: mesh[k] for k in ("vertices", "faces", "watertight") if k in mesh}, backend=meta.get(META_GENERATOR, ""),
        foreground_method=stats.get("foreground_method", ""), file_size=int(head.get("ContentLength", 0)),
        figures=mesh, measured=MEASURED_AT_GENERATION,
    )


def generate_mesh(path: Path, name: str, settings: GenerationSettings, seed_key: str, timer: Timer):
    """Verified image at `path` -> (mesh, prepared image, generator). Raises ImageRejected / GenerationError."""
    from hy3d_pipeline.images.validation import prepare_image

    with timer.stage("prepare"):
        prepared = prepare_image(path, name)
    with timer.stage("load"):
        generator = load_generator(settings)
    with timer.stage("generate"):
        mesh = generator.generate(prepared, seed=settings.seed_for(seed_key))
    return mesh, prepared, generator


def upload_model(storage: ImageStorage, model_key: str, mesh, source: ObjectInfo, settings: GenerationSettings,
                 backend: str, foreground_method: str, timer: Timer, *, figures: dict[str, Any] | None = None,
                 thumbnail: bytes | None = None) -> ModelOutcome:
    """Export and upload the model, its companions and its picture. `figures` (checks.measure) are stored in
    the model's S3 metadata, so a model that is not regenerated can still be judged."""
    from hy3d_pipeline.models.export import export_model, mesh_stats
    from hy3d_pipeline.models.thumbnails import thumbnail_key

    with timer.stage("export"):
        base = model_key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        files = export_model(mesh, settings.output_format, base)
        stats = mesh_stats(mesh)
    folder = model_key.rsplit("/", 1)[0] + "/" if "/" in model_key else ""
    bucket = storage.models_bucket_name
    stored = figures or {k: stats[k] for k in ("vertices", "faces", "watertight")}
    with timer.stage("upload"):
        # companions (obj's .mtl and texture, the picture) first: the main file's arrival means the model is complete
        for name, data in files[1:]:
            ext = name.rsplit(".", 1)[-1].lower()
            storage.upload(bucket, folder + name, data, content_type=MODEL_CONTENT_TYPES.get(ext, "application/octet-stream"))
        if thumbnail:
            storage.upload(bucket, thumbnail_key(model_key), thumbnail, content_type="image/png")
        main_name, main_data = files[0]
        storage.upload(bucket, model_key, main_data, content_type=MODEL_CONTENT_TYPES[settings.output_format], metadata={
            META_SOURCE_ETAG: source.etag,
            META_SETTINGS: settings.fingerprint(),
            META_GENERATOR: backend,
            # S3 user metadata holds 2 KB: a handful of numbers fits many times over
            META_STATS: json.dumps({"mesh": stored, "foreground_method": foreground_method}, separators=(",", ":")),
        })
    return ModelOutcome(
        model_url=f"s3://{bucket}/{model_key}", model_key=model_key, skipped=False, stats=stats,
        timings=dict(timer.seconds), backend=backend, foreground_method=foreground_method,
        file_size=len(main_data), extra_files=[folder + n for n, _ in files[1:]], figures=dict(figures or {}),
        thumbnail_url=f"s3://{bucket}/{thumbnail_key(model_key)}" if thumbnail else "",
    )


def picture_of(mesh, notes: list[str]):
    """The model's render, or None with a note: a picture that fails must not cost the model."""
    from hy3d_pipeline.models.thumbnails import render_mesh

    try:
        return render_mesh(mesh)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"thumbnail not rendered: {type(exc).__name__}: {exc}")
        return None


def complete_existing(storage: ImageStorage, done: ModelOutcome, source: ObjectInfo, settings: GenerationSettings,
                      local_path: Path | None, timer: Timer) -> ModelOutcome:
    """Pictures and check figures for a model that is not regenerated.

    Figures stored with the model are used as they are: they were measured on the same mesh and the same
    input (same ETag and settings), and the verdicts are drawn again from them with today's thresholds. A
    model from before the checks existed has none: it is downloaded and measured now, and gets its picture."""
    from hy3d_pipeline.models.checks import has_figures
    from hy3d_pipeline.models.thumbnails import image_preview, png_bytes, thumbnail_key

    bucket = storage.models_bucket_name
    key = thumbnail_key(done.model_key)
    if local_path is not None and local_path.exists():
        with timer.stage("preview"):
            try:
                done.input_preview = image_preview(local_path)
            except Exception as exc:  # noqa: BLE001 - verified already; a preview is a nicety
                done.notes.append(f"input preview not made: {type(exc).__name__}: {exc}")
    if has_figures(done.figures):
        with timer.stage("thumbnail"):
            done.picture = _stored_picture(storage, bucket, key)
        if done.picture is not None:
            done.thumbnail_url = f"s3://{bucket}/{key}"
            return done
    with timer.stage("download_model"):
        mesh = _load_model(storage, done.model_key, settings.output_format)
    if not has_figures(done.figures):
        from hy3d_pipeline.images.validation import prepare_image
        from hy3d_pipeline.models.checks import measure

        path = local_path if local_path is not None and local_path.exists() else storage.download(source)
        try:
            with timer.stage("measure"):
                prepared = prepare_image(path, source.url)
                done.figures = measure(mesh, prepared.mask)
                done.measured = MEASURED_NOW
        finally:
            if path != local_path:
                storage.discard_local(path)
    with timer.stage("thumbnail"):
        done.picture = picture_of(mesh, done.notes)
        if done.picture is not None:
            with timer.stage("upload"):
                storage.upload(bucket, key, png_bytes(done.picture), content_type="image/png")
            done.thumbnail_url = f"s3://{bucket}/{key}"
    return done


def _stored_picture(storage: ImageStorage, bucket: str, key: str):
    from PIL import Image

    body = storage.read(bucket, key)
    if body is None:
        return None
    try:
        return Image.open(io.BytesIO(body)).convert("RGBA")
    except Exception:  # noqa: BLE001 - unreadable: it is rendered again from the model
        return None


def _load_model(storage: ImageStorage, model_key: str, output_format: str):
    import trimesh

    body = storage.read(storage.models_bucket_name, model_key)
    if body is None:
        raise GenerationError(f"s3://{storage.models_bucket_name}/{model_key}: the model disappeared while read")
    # an OBJ's texture is a separate object: geometry is what the figures need, the picture goes without colour
    return trimesh.load(io.BytesIO(body), file_type=output_format, force="mesh")


def process_object(storage: ImageStorage, source: ObjectInfo, partition_key: str, settings: GenerationSettings,
                   timer: Timer | None = None, local_path: Path | None = None) -> ModelOutcome:
    """Generate and upload the model for one source object, unless it already exists for this ETag and settings."""
    timer = timer or Timer()
    model_key = storage.model_key(storage.relative_key(source.key), settings.output_format)
    with timer.stage("check_existing"):
        done = existing_model(storage, model_key, source, settings)
    if done:
        try:
            complete_existing(storage, done, source, settings, local_path, timer)
        finally:
            if local_path is not None:
                storage.discard_local(local_path)
        done.timings = dict(timer.seconds)
        return done
    path = local_path
    if path is None or not path.exists():
        with timer.stage("download"):
            path = storage.download(source)
    try:
        from hy3d_pipeline.models.checks import measure
        from hy3d_pipeline.models.thumbnails import image_preview, png_bytes

        mesh, prepared, generator = generate_mesh(path, source.url, settings, partition_key, timer)
        notes: list[str] = []
        with timer.stage("measure"):
            figures = measure(mesh, prepared.mask)
        with timer.stage("thumbnail"):
            picture = picture_of(mesh, notes)
            preview = image_preview(prepared.rgba)
        outcome = upload_model(storage, model_key, mesh, source, settings, generator.name, prepared.foreground_method,
                               timer, figures=figures, thumbnail=png_bytes(picture) if picture is not None else None)
        outcome.picture, outcome.input_preview, outcome.notes = picture, preview, notes
        return outcome
    finally:
        storage.discard_local(path)
