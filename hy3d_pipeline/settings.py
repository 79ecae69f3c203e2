"""Every environment variable hy3d-pipeline reads, defined, parsed and validated here and nowhere else.

Why one place: a bad value (`HY3D_BATCH_SIZE=abc`) must fail once, when the code location loads, with a message
that names the variable and what it accepts, instead of wherever it happens to be read first; and the README's
configuration table, the launchpad's choices and the code must not drift apart. `current()` parses the
environment once and parses again only when one of these variables changes (the embedded default sets a few of
them before it starts Dagster, and tests change them), so reading a setting costs a dictionary lookup.

`python3 -m hy3d_pipeline.settings` prints the README's configuration table from these definitions.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

OutputFormat = Literal["glb", "obj", "ply", "stl"]
TextureMode = Literal["none", "projected", "paint"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
TEXTURE_MODES: tuple[str, ...] = get_args(TextureMode)

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


class SettingsError(ValueError):
    """One or more variables hold values they cannot take; the message names each and what it accepts."""


def _var(env: str, default: Any, help: str, *, section: str, minimum: float | None = None,
         fallbacks: tuple[str, ...] = (), default_doc: str | None = None, pattern: re.Pattern | None = None,
         accepts: str | None = None, empty_is_value: bool = False) -> Any:
    # empty_is_value: `S3_MODELS_PREFIX=` means "no prefix"; for every other variable empty means unset
    return field(default=default, metadata=dict(env=env, help=help, section=section, minimum=minimum,
                                                fallbacks=fallbacks, default_doc=default_doc, pattern=pattern,
                                                accepts=accepts, empty_is_value=empty_is_value))


@dataclass(frozen=True)
class Settings:
    # ---- where images come from and models go ----------------------------------------------------------------
    images_bucket: str = _var("S3_IMAGES_BUCKET", "", "bucket that holds the source images (unset: the code location loads, "
                              "the sensor skips and runs fail, saying so)", section="storage",
                              default_doc="none; `demo`/`dev` set `hy3d-images` on their embedded S3")
    images_prefix: str = _var("S3_IMAGES_PREFIX", "", "only keys under this prefix are images to process",
                              section="storage")
    models_bucket: str = _var("S3_MODELS_BUCKET", "", "where generated models are written", section="storage",
                              default_doc="the images bucket")
    models_prefix: str = _var("S3_MODELS_PREFIX", "models/", "key prefix of generated models (`<prefix><image key>.<format>`); in the "
                               "images bucket it must be non-empty and must not contain S3_IMAGES_PREFIX (outputs would "
                               "become inputs), else the sensor refuses to tick", section="storage",
                               empty_is_value=True)
    region: str = _var("S3_REGION", "us-east-1", "region", section="storage",
                       fallbacks=("AWS_REGION", "AWS_DEFAULT_REGION"))
    endpoint_url: str = _var("S3_ENDPOINT_URL", "", "S3-compatible endpoint (SeaweedFS, MinIO, Ceph, LocalStack)",
                             section="storage", default_doc="AWS")
    profile: str = _var("AWS_PROFILE", "", "AWS profile of the standard credential chain (keys: AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or an IAM role)", section="storage",
                        default_doc="the chain's default")
    download_timeout: float = _var("S3_DOWNLOAD_TIMEOUT", 60.0, "seconds for one download", section="storage",
                                   minimum=1)
    temp_dir: str = _var("S3_TEMP_DIR", "", "where downloaded copies live", section="storage",
                         default_doc="`hy3d-pipeline` under the system temp dir")
    cleanup_temp_files: bool = _var("S3_CLEANUP_TEMP_FILES", True, "delete downloaded copies after processing",
                                    section="storage")
    events_queue_url: str = _var("S3_EVENTS_QUEUE_URL", "", "SQS queue receiving the bucket's event "
                                 "notifications: the sensor reads events instead of listing", section="sensor",
                                 default_doc="unset (listing)")
    sqs_endpoint_url: str = _var("SQS_ENDPOINT_URL", "", "SQS endpoint", section="sensor",
                                 default_doc="AWS, or the queue URL's own host when it is not AWS")
    # ---- images ------------------------------------------------------------------------------------------------
    max_image_pixels: int = _var("HY3D_MAX_IMAGE_PIXELS", 64_000_000, "larger images are refused before decoding "
                                 "(decompression bombs)", section="images", minimum=1)
    rembg_model: str = _var("HY3D_REMBG_MODEL", "~/.u2net/u2net.onnx", "rembg's U2-Net model file, for images "
                            "without alpha or a plain background (`hy3d-pipeline fetch-weights` fetches it)",
                            section="images")
    # ---- generation --------------------------------------------------------------------------------------------
    generator: str = _var("HY3D_GENERATOR", "hunyuan3d", "the backend: `hunyuan3d` (the real model), `extrude` "
                          "(CPU silhouette extrusion, no weights), or one another package installs (`hy3d-pipeline "
                          "generators` lists them)", section="generation")
    output_format: OutputFormat = _var("HY3D_OUTPUT_FORMAT", "glb", "model file format (per run too: launchpad config "
                                       "`output_format`)", section="generation")
    texture: TextureMode = _var("HY3D_TEXTURE", "none", "`paint` (Hunyuan3D-Paint, CUDA), `projected` (vertex "
                                "colours from the image) or `none` (per run too: `texture`); `extrude` ignores it and says so",
                                section="generation")
    model_path: str = _var("HY3D_MODEL_PATH", "tencent/Hunyuan3D-2", "Hunyuan3D weights: Hugging Face repo id "
                           "or folder name under HY3DGEN_MODELS", section="generation")
    model_subfolder: str = _var("HY3D_MODEL_SUBFOLDER", "hunyuan3d-dit-v2-0", "subfolder of the weights",
                                section="generation")
    models_root: str = _var("HY3DGEN_MODELS", "~/.cache/hy3dgen", "hy3dgen's own local weights root",
                            section="generation")
    device: str = _var("HY3D_DEVICE", "auto", "where the model runs", section="generation", pattern=_DEVICE,
                       accepts="auto, cpu, mps, cuda or cuda:N")
    steps: int = _var("HY3D_STEPS", 30, "diffusion steps", section="generation", minimum=1)
    octree_resolution: int = _var("HY3D_OCTREE_RESOLUTION", 256, "marching-cubes grid", section="generation",
                                  minimum=16)
    guidance_scale: float = _var("HY3D_GUIDANCE_SCALE", 5.0, "classifier-free guidance", section="generation",
                                 minimum=0)
    num_chunks: int = _var("HY3D_NUM_CHUNKS", 8000, "surface-extraction chunk size", section="generation",
                           minimum=1)
    seed: int = _var("HY3D_SEED", 1234, "base seed (each image's seed derives from it and its key)",
                     section="generation", minimum=0)
    max_faces: int = _var("HY3D_MAX_FACES", 40000, "face budget of a model (reduced to it; checked)",
                          section="generation", minimum=4)
    flashvdm: bool = _var("HY3D_FLASHVDM", False, "FlashVDM decoding (turbo VAE)", section="generation")
    output_dir: str = _var("HY3D_OUTPUT_DIR", "hy3d-output", "where the seed API, `generate` and `demo` write "
                           "model files", section="generation")
    # ---- runs and the sensor -----------------------------------------------------------------------------------
    batch_size: int = _var("HY3D_BATCH_SIZE", 8, "images per run (sensor bursts and backfills)", section="sensor",
                           minimum=1)
    max_batch_size: int = _var("HY3D_MAX_BATCH_SIZE", 32, "images per run at most, when a large backlog makes "
                               "runs bigger", section="sensor", minimum=1)
    sensor_interval: int = _var("HY3D_SENSOR_INTERVAL", 15, "seconds between sensor ticks", section="sensor",
                                minimum=1)
    sensor_max_images: int = _var("HY3D_SENSOR_MAX_IMAGES", 5000, "images requested per tick at most (a huge "
                                  "first scan spreads over ticks)", section="sensor", minimum=1)
    deleted_sources: Literal["mark", "remove-partition"] = _var(
        "HY3D_DELETED_SOURCES", "mark", "what a deleted source image does to its partition", section="sensor")
    max_attempts: int = _var("HY3D_MAX_ATTEMPTS", 3, "runs per image before the sensor gives up on it",
                             section="sensor", minimum=1)
    retry_backoff_seconds: float | None = _var("HY3D_RETRY_BACKOFF_SECONDS", None, "wait before an image of a "
                                               "failed run is requested again (doubling)", section="sensor",
                                               minimum=0, default_doc="the sensor interval")
    reconcile_seconds: float = _var("HY3D_RECONCILE_SECONDS", 3600.0, "event mode: a full listing this often "
                                    "(0: every tick)", section="sensor", minimum=0)
    sqs_visibility_seconds: int | None = _var("HY3D_SQS_VISIBILITY_SECONDS", None, "event mode: how long "
                                              "received messages stay hidden", section="sensor", minimum=1,
                                              default_doc="max(60, 4 × sensor interval)")
    image_attempts: int = _var("HY3D_IMAGE_ATTEMPTS", 3, "tries per image for transient S3 errors, inside a run",
                               section="sensor", minimum=1)
    image_retry_delay: float = _var("HY3D_IMAGE_RETRY_DELAY", 1.0, "seconds before an image's first retry "
                                    "(doubling)", section="sensor", minimum=0)
    # ---- the Dagster home and the fleet ------------------------------------------------------------------------
    home: str = _var("HY3D_HOME", ".hy3d", "the embedded default's folder (S3 data, Dagster home, workers)",
                     section="fleet")
    dagster_home: str = _var("DAGSTER_HOME", "", "Dagster's own: the instance folder", section="fleet",
                             default_doc="`$HY3D_HOME/dagster`")
    pg_url: str = _var("DAGSTER_PG_URL", "", "PostgreSQL URL for the Dagster instance storage", section="fleet",
                       default_doc="unset (SQLite)")
    broker_url: str = _var("HY3D_BROKER_URL", "", "Celery broker (`redis://...`): runs go to long-lived "
                           "`hy3d-pipeline worker` processes", section="fleet",
                           default_doc="unset (`dev` starts its own worker)")
    worker_queue: str = _var("HY3D_WORKER_QUEUE", "gpu", "the Celery queue generation runs go to", section="fleet")
    run_launcher: Literal["workers", "default"] = _var(
        "HY3D_RUN_LAUNCHER", "workers", "`workers` (warm long-lived workers) or `default` (a process per run)",
        section="fleet")
    gpu_slots: int = _var("HY3D_GPU_SLOTS", 1, "generation steps at once (the `gpu` pool's limit)",
                          section="fleet", minimum=1)
    max_concurrent_runs: int | None = _var("HY3D_MAX_CONCURRENT_RUNS", None, "runs in flight at most",
                                           section="fleet", minimum=1, default_doc="2 × HY3D_GPU_SLOTS + 2")
    run_start_timeout: int = _var("HY3D_RUN_START_TIMEOUT", 1800, "seconds a launched run may wait for a worker "
                                  "before run monitoring fails it", section="fleet", minimum=1)
    run_retries: int = _var("HY3D_RUN_RETRIES", 2, "retries of a run whose worker died", section="fleet",
                            minimum=0)
    # ---- web apps (hy3d_pipeline.client) ---------------------------------------------------------------------
    dagster_url: str = _var("HY3D_DAGSTER_URL", "http://127.0.0.1:3000", "the Dagster webserver "
                            "`hy3d_pipeline.client` talks to (read in the web app)", section="client")
    download_url_seconds: int = _var("HY3D_DOWNLOAD_URL_SECONDS", 3600, "how long the presigned `download_url` "
                                     "of `client.result()` stays valid (read in the code location)",
                                     section="client", minimum=1)

    # ---- derived values ----------------------------------------------------------------------------------------
    @property
    def models_bucket_name(self) -> str:
        return self.models_bucket or self.images_bucket

    @property
    def temp_folder(self) -> Path:
        return Path(self.temp_dir or os.path.join(tempfile.gettempdir(), "hy3d-pipeline"))

    @property
    def home_folder(self) -> Path:
        return Path(self.home).absolute()

    @property
    def rembg_model_file(self) -> Path:
        return Path(os.path.expanduser(self.rembg_model))

    @property
    def retry_backoff(self) -> float:
        return float(self.sensor_interval if self.retry_backoff_seconds is None else self.retry_backoff_seconds)

    def sqs_visibility(self) -> int:
        return self.sqs_visibility_seconds or max(60, 4 * self.sensor_interval)

    @property
    def run_limit(self) -> int:
        return self.max_concurrent_runs or 2 * self.gpu_slots + 2

    @property
    def s3_configured(self) -> bool:
        """Whether the user pointed us at an S3 (else `demo`/`dev` start the embedded one)."""
        return bool(self.images_bucket or self.endpoint_url)

    # ---- parsing -----------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Settings":
        """Parse and validate every variable; SettingsError lists every bad one at once."""
        environ = os.environ if environ is None else environ
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        errors: list[str] = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            raw, name = None, meta["env"]
            for candidate in (meta["env"], *meta["fallbacks"]):
                value = environ.get(candidate)
                if value is not None and (value.strip() != "" or meta["empty_is_value"]):
                    raw, name = value.strip(), candidate
                    break
            if raw is None:
                continue
            try:
                values[f.name] = _parse(raw, hints[f.name], meta)
            except ValueError as exc:
                errors.append(f"{name}={raw!r}: {exc}")
        if errors:
            raise SettingsError("invalid configuration: " + "; ".join(errors))
        return cls(**values)

    def with_overrides(self, **changes: Any) -> "Settings":
        """These settings with some fields replaced (tests, per-run config), validated like the environment."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _parse(raw: str, kind: Any, meta: dict[str, Any]) -> Any:
    if get_origin(kind) in (Union, types.UnionType):  # `int | None`: None only by leaving the variable unset
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        choices = get_args(kind)
        value = raw.lower()
        if value not in choices:
            raise ValueError(f"use one of {', '.join(choices)}")
        return value
    if kind is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError("use true or false (also 1/0, yes/no, on/off)")
    if kind in (int, float):
        try:
            value = kind(raw)
        except ValueError:
            raise ValueError(f"expected {'a whole number' if kind is int else 'a number'}") from None
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ValueError(f"expected {meta['minimum']:g} or more")
        return value
    if meta["pattern"] is not None and not meta["pattern"].fullmatch(raw.lower()):
        raise ValueError(f"use {meta['accepts']}")
    return raw


_lock = threading.Lock()
_cached: tuple[tuple, Settings] | None = None
_NAMES = tuple(n for f in dataclasses.fields(Settings) for n in (f.metadata["env"], *f.metadata["fallbacks"]))


def current() -> Settings:
    """The settings of this process's environment: parsed on first use and again only after a variable changed."""
    global _cached
    snapshot = tuple(os.environ.get(n) for n in _NAMES)
    cached = _cached
    if cached is not None and cached[0] == snapshot:
        return cached[1]
    with _lock:
        settings = Settings.from_env()
        _cached = (snapshot, settings)
        return settings


SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


def secret_values() -> list[str]:
    """The credentials in this environment, which redaction scrubs from every message (never settings fields:
    boto3's chain reads them, so they never reach resource config, run config or logs)."""
    return [v for v in (os.environ.get(n) for n in SECRET_VARIABLES) if v]


_SECTIONS = {
    "storage": "Storage", "images": "Images", "generation": "Generation", "sensor": "Runs and the sensor",
    "fleet": "The Dagster home and the fleet", "client": "Web apps (`hy3d_pipeline.client`)",
}


def markdown_table() -> str:
    """The README's configuration table (a test keeps the README in step with it)."""
    hints = get_type_hints(Settings)
    lines = ["| variable | meaning | accepts | default |", "| --- | --- | --- | --- |"]
    for section, title in _SECTIONS.items():
        lines.append(f"| **{title}** | | | |")
        for f in dataclasses.fields(Settings):
            meta = f.metadata
            if meta["section"] != section:
                continue
            names = " / ".join(f"`{n}`" for n in (meta["env"], *meta["fallbacks"]))
            lines.append(f"| {names} | {meta['help']} | {_accepts(hints[f.name], meta)} | "
                         f"{meta['default_doc'] or _shown(f.default)} |")
    return "\n".join(lines)


def _accepts(kind: Any, meta: dict[str, Any]) -> str:
    if get_origin(kind) in (Union, types.UnionType):
        kind = next(a for a in get_args(kind) if a is not type(None))
    if get_origin(kind) is Literal:
        return ", ".join(f"`{c}`" for c in get_args(kind))
    if kind is bool:
        return "true/false"
    if kind in (int, float):
        word = "whole number" if kind is int else "number"
        return f"{word} ≥ {meta['minimum']:g}" if meta["minimum"] is not None else word
    return meta["accepts"] or "text"


def _shown(default: Any) -> str:
    if default == "" or default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


if __name__ == "__main__":
    print(markdown_table())
