"""One image through the whole chain: fetch, verify, generate, export, upload.

The asset, the seed API and the benchmark's plain-loop baseline all call these functions, so the product and
its baseline do exactly the same work. Heavy imports (PIL, trimesh, the backend) happen inside, never at
package import.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hy3d_pipeline.models.generators.base import GenerationSettings, load_generator
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

    def metadata(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "model_url": self.model_url,
            "skipped_existing": self.skipped,
            "file_size": self.file_size,
            "foreground_method": self.foreground_method,
            **self.stats,
            **self.timings,
        }


def existing_model(storage: ImageStorage, model_key: str, source: ObjectInfo, settings: GenerationSettings):
    """The outcome recorded on a model already generated from this exact source version and settings, if any."""
    head = storage.head_or_none(storage.models_bucket_name, model_key)
    if not head:
        return None
    meta = head.get("Metadata", {})
    if meta.get(META_SOURCE_ETAG) != source.etag or meta.get(META_SETTINGS) != settings.fingerprint():
        return None
    stats = json.loads(meta.get(META_STATS) or "{}")
    return ModelOutcome(
        model_url=f"s3://{storage.models_bucket_name}/{model_key}", model_key=model_key, skipped=True,
        stats=stats.get("mesh", {}), backend=meta.get(META_GENERATOR, ""),
        foreground_method=stats.get("foreground_method", ""), file_size=int(head.get("ContentLength", 0)),
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
                 backend: str, foreground_method: str, timer: Timer) -> ModelOutcome:
    from hy3d_pipeline.models.export import export_model, mesh_stats

    with timer.stage("export"):
        base = model_key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        files = export_model(mesh, settings.output_format, base)
        stats = mesh_stats(mesh)
    folder = model_key.rsplit("/", 1)[0] + "/" if "/" in model_key else ""
    bucket = storage.models_bucket_name
    with timer.stage("upload"):
        # companions (obj's .mtl and texture) first: the main file's arrival means the model is complete
        for name, data in files[1:]:
            ext = name.rsplit(".", 1)[-1].lower()
            storage.upload(bucket, folder + name, data, content_type=MODEL_CONTENT_TYPES.get(ext, "application/octet-stream"))
        main_name, main_data = files[0]
        storage.upload(bucket, model_key, main_data, content_type=MODEL_CONTENT_TYPES[settings.output_format], metadata={
            META_SOURCE_ETAG: source.etag,
            META_SETTINGS: settings.fingerprint(),
            META_GENERATOR: backend,
            META_STATS: json.dumps({"mesh": {k: stats[k] for k in ("vertices", "faces", "watertight")},
                                    "foreground_method": foreground_method}, separators=(",", ":")),
        })
    return ModelOutcome(
        model_url=f"s3://{bucket}/{model_key}", model_key=model_key, skipped=False, stats=stats,
        timings=dict(timer.seconds), backend=backend, foreground_method=foreground_method,
        file_size=len(main_data), extra_files=[folder + n for n, _ in files[1:]],
    )


def process_object(storage: ImageStorage, source: ObjectInfo, partition_key: str, settings: GenerationSettings,
                   timer: Timer | None = None, local_path: Path | None = None) -> ModelOutcome:
    """Generate and upload the model for one source object, unless it already exists for this ETag and settings."""
    timer = timer or Timer()
    model_key = storage.model_key(storage.relative_key(source.key), settings.output_format)
    with timer.stage("check_existing"):
        done = existing_model(storage, model_key, source, settings)
    if done:
        done.timings = dict(timer.seconds)
        return done
    path = local_path
    if path is None or not path.exists():
        with timer.stage("download"):
            path = storage.download(source)
    try:
        mesh, prepared, generator = generate_mesh(path, source.url, settings, partition_key, timer)
        return upload_model(storage, model_key, mesh, source, settings, generator.name, prepared.foreground_method, timer)
    finally:
        storage.discard_local(path)
