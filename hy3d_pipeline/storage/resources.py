"""The storage resource: where images come from and models go, and verified local copies of images.

Built on any ObjectStore (S3 is the first: s3.py). The fields are the familiar S3 ones (region, endpoint,
profile, TLS), filled from settings.py; credentials are never fields here: boto3's chain finds them, so they
never reach run config, logs or metadata (credential fields are refused, see __init__).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dagster import ConfigurableResource
from pydantic import Field

from hy3d_pipeline import settings as config
from hy3d_pipeline.s3.urls import S3Location
from hy3d_pipeline.storage.base import ObjectInfo, ObjectStore, StorageError

_CREDENTIAL_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
NO_BUCKET = "S3_IMAGES_BUCKET is not set: set it (or run `hy3d-pipeline dev` for the embedded default)"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

__all__ = ["ImageStorage", "NO_BUCKET", "ObjectInfo", "safe_local_name"]


def safe_local_name(key: str, etag: str = "") -> str:
    """A file name for `key` that can never leave its directory: one path component of safe characters,
    prefixed by a hash of key and ETag so distinct keys (and versions) never collide."""
    digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()[:20]
    tail = _UNSAFE.sub("_", key.rsplit("/", 1)[-1]).strip("._")[-80:]
    return f"{digest}-{tail}" if tail else digest


class ImageStorage(ConfigurableResource):
    """Where images come from and models go, plus download/upload with the pipeline's guarantees."""

    images_bucket: str = Field(description="Bucket holding the source images (S3_IMAGES_BUCKET).")
    images_prefix: str = Field(default="", description="Only keys under this prefix are images (S3_IMAGES_PREFIX).")
    models_bucket: str = Field(default="", description="Bucket for generated models; empty means the images bucket.")
    models_prefix: str = Field(default="models/", description="Key prefix for generated models (S3_MODELS_PREFIX).")
    region_name: str | None = Field(default=None, description="S3 region (S3_REGION, AWS_REGION).")
    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint (S3_ENDPOINT_URL).")
    profile_name: str | None = Field(default=None, description="AWS profile (AWS_PROFILE).")
    max_attempts: int = Field(default=5, description="botocore's retries per request.")
    use_ssl: bool = True
    verify: bool | None = Field(default=None, description="Verify TLS certificates (None: botocore's default).")
    download_timeout: float = Field(default=60.0, description="Seconds allowed for one download (S3_DOWNLOAD_TIMEOUT).")
    temp_dir: str = Field(default="", description="Where local copies live (S3_TEMP_DIR); empty: system temp dir.")
    cleanup_temp_files: bool = Field(default=True, description="Delete local copies after processing.")
    ca_bundle: str = Field(default="", description="CA bundle file to verify the endpoint's TLS certificate with "
                           "(`verify` is only true/false); empty: `verify`, then AWS_CA_BUNDLE.")

    def __init__(self, **data: Any) -> None:
        # Refused rather than honoured: a resource field is resource config, which Dagster shows in the UI, keeps
        # in the definitions snapshot and lets the launchpad set per run, so a secret there is a secret leaked.
        given = [name for name in _CREDENTIAL_FIELDS if data.get(name) not in (None, "")]
        if given:
            raise ValueError(
                f"ImageStorage does not take credentials as resource fields ({', '.join(given)}): set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment, or AWS_PROFILE, "
                "or use an IAM role; resource config is shown in the Dagster UI and stored with the definitions")
        super().__init__(**data)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ImageStorage":
        """From the environment's settings (settings.current()), with `overrides` applied."""
        s = config.current()
        values: dict[str, Any] = dict(
            images_bucket=s.images_bucket, images_prefix=s.images_prefix, models_bucket=s.models_bucket,
            models_prefix=s.models_prefix, region_name=s.region, endpoint_url=s.endpoint_url or None,
            profile_name=s.profile or None, download_timeout=s.download_timeout, temp_dir=str(s.temp_folder),
            cleanup_temp_files=s.cleanup_temp_files,
        )
        values.update(overrides)
        return cls(**values)

    # ---- the store -------------------------------------------------------------------------------------------
    @property
    def store(self) -> ObjectStore:
        from hy3d_pipeline.storage.s3 import S3Store

        return S3Store(region_name=self.region_name or config.current().region, endpoint_url=self.endpoint_url,
                       profile_name=self.profile_name, download_timeout=float(self.download_timeout),
                       max_attempts=self.max_attempts, use_ssl=self.use_ssl, verify=self.ca_bundle or self.verify)

    def client(self) -> Any:
        """The S3 store's boto3 client (S3-specific callers: event mode's SQS setup, tests, benches)."""
        return self.store.client()

    # ---- locations -------------------------------------------------------------------------------------------
    @property
    def models_bucket_name(self) -> str:
        return self.models_bucket or self.images_bucket

    def image_key(self, relative_key: str) -> str:
        return self.images_prefix + relative_key

    def relative_key(self, key: str) -> str:
        return key[len(self.images_prefix):] if key.startswith(self.images_prefix) else key

    def is_model_key(self, bucket: str, key: str) -> bool:
        """True for objects this pipeline wrote: never treat our own outputs as new images."""
        return bucket == self.models_bucket_name and bool(self.models_prefix) and key.startswith(self.models_prefix)

    def layout_problem(self) -> str | None:
        """Why this layout would feed the pipeline's own outputs back as inputs (or hide every input), else None.

        Models, thumbnails (`<model>.thumb.png`) and OBJ textures are excluded from the images only by the models
        prefix; an empty one in the images bucket would make every output a new image, without end."""
        if self.models_bucket_name != self.images_bucket:
            return None
        if not self.models_prefix:
            return (f"S3_MODELS_PREFIX is empty and models go to the images bucket {self.images_bucket!r}: "
                    f"thumbnails and textures the pipeline writes would be taken for new images under "
                    f"S3_IMAGES_PREFIX={self.images_prefix!r}. Use a separate prefix (S3_MODELS_PREFIX=models/) "
                    f"or a separate bucket (S3_MODELS_BUCKET)")
        if self.images_prefix.startswith(self.models_prefix):
            return (f"S3_IMAGES_PREFIX={self.images_prefix!r} lies inside S3_MODELS_PREFIX={self.models_prefix!r} "
                    f"in bucket {self.images_bucket!r}: every image would be taken for a generated model and "
                    f"ignored. Use a separate prefix or a separate bucket (S3_MODELS_BUCKET)")
        return None

    def model_key(self, relative_key: str, output_format: str) -> str:
        return f"{self.models_prefix}{relative_key}.{output_format}"

    def model_url(self, model_key: str) -> str:
        return f"{self.store.scheme}://{self.models_bucket_name}/{model_key}"

    def local_dir(self) -> Path:
        path = Path(self.temp_dir) if self.temp_dir else config.current().temp_folder
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local_path(self, info: ObjectInfo) -> Path:
        base = self.local_dir().resolve()
        path = (base / safe_local_name(info.key, info.etag)).resolve()
        if path.parent != base:  # belt and braces: safe_local_name already guarantees one component
            raise StorageError(f"refusing local path outside {base} for {info.url}")
        return path

    # ---- operations ------------------------------------------------------------------------------------------
    @staticmethod
    def _need(bucket: str) -> None:
        # no bucket configured: there is no safe default on AWS (a global name is someone else's bucket)
        if not bucket:
            raise StorageError(NO_BUCKET, code="NoBucketConfigured")

    def head(self, bucket: str, key: str) -> ObjectInfo:
        self._need(bucket)
        return self.store.head(bucket, key)

    def head_or_none(self, bucket: str, key: str, *, forbidden_is_absent: bool = False) -> ObjectInfo | None:
        """The object's current version, or None when it does not exist (models we may have written before)."""
        self._need(bucket)
        return self.store.head(bucket, key, missing_ok=True, forbidden_is_absent=forbidden_is_absent)

    def list_keys(self, bucket: str, prefix: str = "", start_after: str = "") -> Iterator[list[tuple[str, str, int]]]:
        """Pages of (key, etag, size) under `prefix`, in key order, resuming after `start_after`."""
        self._need(bucket)
        yield from self.store.list(bucket, prefix, start_after)

    def read(self, bucket: str, key: str) -> bytes | None:
        """A small object's bytes (a model, its picture), or None when there is no such object."""
        self._need(bucket)
        return self.store.read(bucket, key)

    def upload(self, bucket: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
               metadata: dict[str, str] | None = None, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        """Put `data`; returns the new ETag. With `if_match` (an ETag) or `if_none_match` (no object may exist)
        the write is conditional, and a StorageError with code PreconditionFailed says the object changed."""
        self._need(bucket)
        return self.store.write(bucket, key, data, content_type=content_type, metadata=metadata or {},
                                if_match=if_match, if_none_match=if_none_match)

    def sign(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        self._need(bucket)
        return self.store.sign(bucket, key, expires_s)

    def http_url(self, bucket: str, key: str) -> str | None:
        return self.store.http_url(bucket, key)

    def download(self, info: ObjectInfo, dest: Path | None = None) -> Path:
        """Fetch exactly the object version `info` describes into the local cache and return its path.

        Written under a temporary name and renamed only when complete and checked (size, ETag), so a reader
        never sees a partial file. A copy already cached for the same key and ETag is reused.
        """
        self._need(info.bucket)
        dest = dest or self.local_path(info)
        if dest.exists() and dest.stat().st_size == info.size:
            os.utime(dest)  # in use again: young enough that sweep_temp leaves it
            return dest
        deadline = time.monotonic() + float(self.download_timeout)
        self._write_local(dest, lambda out: self.store.fetch(info, out, deadline=deadline))
        return dest

    def download_presigned(self, url: str, location: S3Location) -> tuple[Path, ObjectInfo]:
        """The local copy of the object of a presigned `url` (`location`: its bucket and key), fetched with the
        URL's own signature, never with this process's credentials (s3/presigned.py); with the same checks and
        the same `.part`-then-rename as `download`. Returns the copy and what the answer said of the object.
        Each call makes a copy of its own: the version is known only once the answer arrives."""
        from hy3d_pipeline.storage.s3 import S3Store

        store = self.store
        if not isinstance(store, S3Store):
            raise StorageError(f"presigned URLs are S3's; this storage is {store.scheme}://", code="NotSupported")
        dest = self.local_path(ObjectInfo(location.bucket, location.key, f"presigned-{uuid.uuid4().hex}", 0))
        deadline = time.monotonic() + float(self.download_timeout)
        found: list[ObjectInfo] = []
        self._write_local(dest, lambda out: found.append(store.fetch_presigned(url, location, out, deadline)))
        return dest, found[0]

    @staticmethod
    def _write_local(dest: Path, write: Callable[[BinaryIO], Any]) -> None:
        """`write(file)` into a `.part` next to `dest`, renamed to `dest` only when it returns: a reader never
        sees a partial copy, and no `.part` is left behind whatever happens."""
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as out:
                write(out)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def sweep_temp(self, max_age_s: float | None = None) -> list[Path]:
        """Delete what dead processes left in the temp folder; returns what was deleted. Called at the start of
        every generation step; a worker may call it when it starts.

        `.part` files (a download killed mid-write, SIGKILL included) and local copies not modified for
        `max_age_s` (default 2 x S3_DOWNLOAD_TIMEOUT) go. Age is what tells a dead writer from a live one: a live
        download writes continuously and ends within S3_DOWNLOAD_TIMEOUT, and a cached copy is touched when it is
        reused. A live run's copy old enough to be swept is fetched again by that run when it is needed. With
        S3_CLEANUP_TEMP_FILES false only `.part` files go: the copies are then a cache by choice."""
        bound = 2 * float(self.download_timeout) if max_age_s is None else float(max_age_s)
        folder = Path(self.temp_dir) if self.temp_dir else config.current().temp_folder
        if not folder.is_dir():
            return []
        cutoff, removed = time.time() - bound, []
        for entry in os.scandir(folder):
            if not entry.is_file(follow_symlinks=False):
                continue
            if not (entry.name.endswith(".part") or self.cleanup_temp_files):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
            except FileNotFoundError:  # another process swept it first
                continue
            removed.append(Path(entry.path))
        return removed

    def discard_local(self, path: Path) -> None:
        if self.cleanup_temp_files:
            path.unlink(missing_ok=True)
