"""One image through the whole chain, top to bottom: fetch, verify, prepare, generate, measure, export, upload.

`fetch` (HEAD, verified download, the input's facts) and `process_object` (everything after) are the whole life
of one image; the asset's step runs the same two in stages (`make_model`, then `MadeModel.upload`), and the seed
API and the benchmark's plain-loop baseline call the same functions, so the product and its baseline do exactly
the same work. `LocalCopies` owns the temporary files: every local copy made for a step or a call is deleted by
it, whatever way the scope ends.
Heavy imports (PIL, trimesh, the backend) happen inside, never at package import.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hy3d_pipeline.models.generators.base import GenerationError, GenerationSettings, load_generator, worker_identity
from hy3d_pipeline.s3.urls import S3Location
from hy3d_pipeline.storage.base import StorageError
from hy3d_pipeline.storage.resources import ImageStorage, ObjectInfo

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


class LocalCopies:
    """The local copies of images one step (or one seed-API call) makes, and their deletion, in one place.

    A copy is deleted when it is released; whatever is still held when the scope closes (the step raised, the
    run was terminated, images were prefetched that the step never reached) is deleted then, unless it was kept
    on purpose (`local_images` alone keeps its copy for inspection). Nothing is deleted with
    S3_CLEANUP_TEMP_FILES off. What a killed process leaves behind is swept by the next step
    (ImageStorage.sweep_temp). Thread-safe: prefetch threads fetch while the step releases."""

    def __init__(self, storage: ImageStorage) -> None:
        self.storage = storage
        self._held: set[Path] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> "LocalCopies":
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            held, self._held = self._held, set()
        for path in held:
            self.storage.discard_local(path)

    def fetch(self, info: ObjectInfo) -> Path:
        return self._hold(self.storage.download(info))

    def fetch_presigned(self, url: str, location: S3Location) -> Path:
        """The copy of a presigned URL's object, fetched with the URL's own signature (the seed API)."""
        return self._hold(self.storage.download_presigned(url, location)[0])

    def _hold(self, path: Path) -> Path:
        with self._lock:
            self._held.add(path)
        return path

    def release(self, path: Path | None) -> None:
        if path is None:
            return
        with self._lock:
            self._held.discard(path)
        self.storage.discard_local(path)

    def keep(self, path: Path | None) -> None:
        with self._lock:
            self._held.discard(path)


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
    settings_fingerprint: str = ""  # of the settings the model was actually made with (see settings_used)
    octree_resolution: int | None = None  # Hunyuan3D's, as used (lower than asked after a CUDA OOM retry)
    worker: dict[str, Any] = field(default_factory=dict)  # base.worker_identity() where this outcome was made
    generator: dict[str, Any] = field(default_factory=dict)  # Generator.describe() of the backend that made it now
    superseded: str = ""  # why nothing was uploaded: the source changed meanwhile (see _claim); else empty
    current_source_etag: str = ""

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
            **({"octree_resolution": self.octree_resolution} if self.octree_resolution is not None else {}),
            **({"generator": self.generator} if self.generator else {}),
            **self.worker,
            **self.timings,
        }


def existing_model(storage: ImageStorage, model_key: str, source: ObjectInfo, settings: GenerationSettings):
    """The outcome recorded on a model already generated from this exact source version and settings, if any."""
    head = storage.head_or_none(storage.models_bucket_name, model_key, forbidden_is_absent=True)
    if not head:
        return None
    meta = head.metadata
    if meta.get(META_SOURCE_ETAG) != source.etag or meta.get(META_SETTINGS) != settings.fingerprint():
        return None
    stats = json.loads(meta.get(META_STATS) or "{}")
    mesh = stats.get("mesh", {})
    return ModelOutcome(
        settings_fingerprint=settings.fingerprint(), octree_resolution=stats.get("octree_resolution"),
        # not regenerated: the process that made the model, as recorded with it (models from before that was
        # recorded carry none)
        worker=stats.get("worker") or {},
        model_url=f"s3://{storage.models_bucket_name}/{model_key}", model_key=model_key, skipped=True,
        stats={k: mesh[k] for k in ("vertices", "faces", "watertight") if k in mesh}, backend=meta.get(META_GENERATOR, ""),
        foreground_method=stats.get("foreground_method", ""), file_size=head.size,
        figures=mesh, measured=MEASURED_AT_GENERATION,
    )


def seed_key_for(storage: ImageStorage, bucket: str, key: str) -> str:
    """The key an image's seed is derived from, shared by the pipeline and the seed API so one image gives one
    mesh: the key relative to S3_IMAGES_PREFIX for an object in the images bucket under the prefix, else the
    full key. (The partition key would differ for keys Dagster needs escaped.)"""
    if bucket == storage.images_bucket and key.startswith(storage.images_prefix):
        return storage.relative_key(key)
    return key


@dataclass
class Fetched:
    """One image fetched for a step: its version, and the local copy with its facts when they were asked for.
    A failure after the HEAD is carried, not raised, so the object itself is still recorded as a source image."""

    info: ObjectInfo
    timer: Timer
    path: Path | None = None
    facts: dict[str, Any] | None = None  # verify_image's (format, size, mode)
    preview: Any = None  # the input's picture (PIL), for metadata
    error: BaseException | None = None


def fetch(storage: ImageStorage, copies: LocalCopies, relative_key: str, *, download: bool,
          verify: bool) -> Fetched:
    """HEAD, then (`download`) the verified local copy, then (`verify`) its facts and preview. Runs in the step's
    prefetch threads, so the next image downloads while the current one generates."""
    timer = Timer()
    with timer.stage("head"):
        info = storage.head(storage.images_bucket, storage.image_key(relative_key))
    fetched = Fetched(info, timer)
    try:
        if download:
            with timer.stage("download"):
                fetched.path = copies.fetch(info)
            if verify:
                from hy3d_pipeline.images.validation import verify_image
                from hy3d_pipeline.models.thumbnails import image_preview

                with timer.stage("verify"):
                    fetched.facts = verify_image(fetched.path, info.url)
                with timer.stage("preview"):
                    try:
                        fetched.preview = image_preview(fetched.path)
                    except Exception:  # noqa: BLE001 - a verified image without a preview is still good
                        pass
    except Exception as exc:  # noqa: BLE001 - re-raised by the step, after the source is recorded
        copies.release(fetched.path)
        fetched.path, fetched.error = None, exc
    return fetched


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


def settings_used(settings: GenerationSettings, mesh) -> GenerationSettings:
    """The settings a mesh was actually made with. Hunyuan3D retries a CUDA OOM at a lower octree resolution
    and says so in `mesh.metadata`; recording the requested settings would make that coarser model count as
    done for them, and it would never be regenerated at the resolution asked for."""
    used = getattr(mesh, "metadata", {}).get("octree_resolution")
    if isinstance(used, int) and used != settings.octree_resolution:
        return dataclasses.replace(settings, octree_resolution=used)
    return settings


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
    main_name, main_data = files[0]
    metadata = {
        META_SOURCE_ETAG: source.etag,
        META_SETTINGS: settings.fingerprint(),
        META_GENERATOR: backend,
        # S3 user metadata holds 2 KB: a handful of numbers fits many times over
        # and which process made it: a model that is not regenerated still names its maker
        META_STATS: json.dumps({"mesh": stored, "foreground_method": foreground_method, **_resolution(mesh),
                                "worker": worker_identity()}, separators=(",", ":")),
    }
    with timer.stage("upload"):
        for _ in range(WRITE_ATTEMPTS):
            condition = _claim(storage, model_key, source)
            # companions (obj's .mtl and texture, the picture) first: the main file's arrival means the model is
            # complete
            for name, data in files[1:]:
                ext = name.rsplit(".", 1)[-1].lower()
                storage.upload(bucket, folder + name, data,
                               content_type=MODEL_CONTENT_TYPES.get(ext, "application/octet-stream"))
            if thumbnail:
                storage.upload(bucket, thumbnail_key(model_key), thumbnail, content_type="image/png")
            try:
                storage.upload(bucket, model_key, main_data, content_type=MODEL_CONTENT_TYPES[settings.output_format],
                               metadata=metadata, **condition)
                break
            except StorageError as exc:
                if exc.code != "PreconditionFailed":
                    raise
                # another run wrote the model since _claim looked: look again (it may be newer than ours)
        else:
            raise StorageError(f"s3://{bucket}/{model_key} kept changing while this run wrote it "
                                f"({WRITE_ATTEMPTS} attempts)", transient=True, code="PreconditionFailed")
    return ModelOutcome(
        settings_fingerprint=settings.fingerprint(), **_resolution(mesh),
        model_url=f"s3://{bucket}/{model_key}", model_key=model_key, skipped=False, stats=stats,
        timings=dict(timer.seconds), backend=backend, foreground_method=foreground_method,
        file_size=len(main_data), extra_files=[folder + n for n, _ in files[1:]], figures=dict(figures or {}),
        thumbnail_url=f"s3://{bucket}/{thumbnail_key(model_key)}" if thumbnail else "",
    )


class Superseded(Exception):
    """The source changed after this run read it: a run for the newer version makes (or made) the model."""

    def __init__(self, source: ObjectInfo, current_etag: str) -> None:
        super().__init__(f"{source.url} changed while its model was made (ETag {source.etag} -> {current_etag}): "
                         "the model of the newer version is kept, this one is not uploaded")
        self.current_etag = current_etag


WRITE_ATTEMPTS = 3


def _claim(storage: ImageStorage, model_key: str, source: ObjectInfo) -> dict[str, Any]:
    """The condition under which this run may write the model, or Superseded.

    Runs for two versions of one image can overlap, and the older can finish last. So the source is looked at
    again right before the write: if its ETag is no longer the one this run read, the model belongs to the newer
    version and is left alone, whether that run finished first or is still going. The look and the write are
    tied by a conditional PUT on the model as it was before the look (If-Match its ETag, or If-None-Match `*`
    when there was none), so a newer model that lands in between makes the write fail instead of being
    overwritten. Conditional writes (AWS since 2024, SeaweedFS 4.x: tried) rather than version-addressed keys,
    because model keys are the contract's `<prefix><image key>.<format>`. A deleted source does not stop the
    write: the version read is the last there was."""
    head = storage.head_or_none(storage.models_bucket_name, model_key)
    current = storage.head_or_none(source.bucket, source.key)
    if current is not None and current.etag != source.etag:
        raise Superseded(source, current.etag)
    return {"if_match": head.etag} if head else {"if_none_match": True}


def _resolution(mesh) -> dict[str, int]:
    used = getattr(mesh, "metadata", {}).get("octree_resolution")
    return {"octree_resolution": used} if isinstance(used, int) else {}


def picture_of(mesh, notes: list[str]):
    """The model's render, or None with a note: a picture that fails must not cost the model."""
    from hy3d_pipeline.models.thumbnails import render_mesh

    try:
        return render_mesh(mesh)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"thumbnail not rendered: {type(exc).__name__}: {exc}")
        return None


def complete_existing(storage: ImageStorage, done: ModelOutcome, source: ObjectInfo, settings: GenerationSettings,
                      local_path: Path | None, timer: Timer, copies: LocalCopies) -> ModelOutcome:
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

        path = local_path if local_path is not None and local_path.exists() else copies.fetch(source)
        with timer.stage("measure"):
            prepared = prepare_image(path, source.url)
            done.figures = measure(mesh, prepared.mask)
            done.measured = MEASURED_NOW
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
    mesh = trimesh.load(io.BytesIO(body), file_type=output_format, force="mesh")
    # a loader keeps a position twice where UVs or normals differ (a GLB's creases, an OBJ's baked colours);
    # the figures (watertight above all) are of the surface
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


def existing_for_checks(storage: ImageStorage, info: ObjectInfo, settings: GenerationSettings, timer: Timer,
                        path: Path | None, copies: LocalCopies) -> ModelOutcome:
    """The model there is, with its figures, for running the checks alone (which never generate one)."""
    model_key = storage.model_key(storage.relative_key(info.key), settings.output_format)
    done = existing_model(storage, model_key, info, settings)
    if done is None:
        raise GenerationError(f"{info.url}: no model made from this version of the image with these settings "
                              f"at s3://{storage.models_bucket_name}/{model_key}; materialize models_3d first")
    return complete_existing(storage, done, info, settings, path, timer, copies)


def process_object(storage: ImageStorage, source: ObjectInfo, partition_key: str, settings: GenerationSettings,
                   timer: Timer | None = None, local_path: Path | None = None,
                   copies: LocalCopies | None = None) -> ModelOutcome:
    """Generate and upload the model for one source object, unless it already exists for this ETag and settings.
    `partition_key` is kept for callers; the seed comes from the object key (`seed_key_for`). The local copy
    (`local_path`, or one fetched here) is released when this returns."""
    made = make_model(storage, source, partition_key, settings, timer, local_path, copies)
    return made.upload() if isinstance(made, MadeModel) else made


def make_model(storage: ImageStorage, source: ObjectInfo, partition_key: str, settings: GenerationSettings,
               timer: Timer | None = None, local_path: Path | None = None,
               copies: LocalCopies | None = None) -> ModelOutcome | MadeModel:
    """`process_object` up to the upload: the existing model's outcome, or a model made, measured and pictured
    whose `upload()` finishes it. A step uploads one image's model while the next one is made. The local copy
    is released when this returns (the mesh and the input's mask are in memory)."""
    if copies is None:
        with LocalCopies(storage) as own:
            return make_model(storage, source, partition_key, settings, timer, local_path, own)
    timer = timer or Timer()
    model_key = storage.model_key(storage.relative_key(source.key), settings.output_format)
    try:
        with timer.stage("check_existing"):
            done = existing_model(storage, model_key, source, settings)
        if done:
            complete_existing(storage, done, source, settings, local_path, timer, copies)
            done.timings = dict(timer.seconds)
            done.notes[:0] = settings.ignored_notes()
            return done
        if local_path is None or not local_path.exists():
            with timer.stage("download"):
                local_path = copies.fetch(source)
        return _make(storage, source, settings, model_key, local_path, timer)
    finally:
        copies.release(local_path)


@dataclass
class MadeModel:
    """A model generated from `source`, measured and pictured, not uploaded yet."""

    storage: ImageStorage
    source: ObjectInfo
    settings: GenerationSettings
    model_key: str
    mesh: Any
    generator: Any
    foreground_method: str
    figures: dict[str, Any]
    picture: Any
    preview: Any
    notes: list[str]
    timer: Timer
    worker: dict[str, Any]  # worker_identity() right after the load that made the generator, in that process

    def upload(self) -> ModelOutcome:
        """Export and upload (upload_model); a source that changed meanwhile gives a `superseded` outcome."""
        from hy3d_pipeline.models.thumbnails import png_bytes

        storage, settings = self.storage, self.settings
        try:
            outcome = upload_model(storage, self.model_key, self.mesh, self.source, settings_used(settings, self.mesh),
                                   self.generator.name, self.foreground_method, self.timer, figures=self.figures,
                                   thumbnail=png_bytes(self.picture) if self.picture is not None else None)
        except Superseded as exc:
            return ModelOutcome(model_url=f"s3://{storage.models_bucket_name}/{self.model_key}",
                                model_key=self.model_key, skipped=False, stats={}, timings=dict(self.timer.seconds),
                                backend=self.generator.name, superseded=str(exc), current_source_etag=exc.current_etag,
                                worker=worker_identity())
        outcome.picture, outcome.input_preview, outcome.notes = self.picture, self.preview, self.notes
        outcome.generator = self.generator.describe()
        outcome.worker = self.worker
        return outcome


def _make(storage: ImageStorage, source: ObjectInfo, settings: GenerationSettings, model_key: str,
          path: Path, timer: Timer) -> MadeModel:
    from hy3d_pipeline.models.checks import measure
    from hy3d_pipeline.models.thumbnails import image_preview

    mesh, prepared, generator = generate_mesh(path, source.url, settings,
                                              seed_key_for(storage, source.bucket, source.key), timer)
    notes = settings.ignored_notes()  # said with every model, not silently dropped
    with timer.stage("measure"):
        figures = measure(mesh, prepared.mask)
    with timer.stage("thumbnail"):
        picture = picture_of(mesh, notes)
        preview = image_preview(prepared.rgba)
    return MadeModel(storage, source, settings, model_key, mesh, generator, prepared.foreground_method, figures,
                     picture, preview, notes, timer, worker_identity())
