"""The S3 resource: which buckets hold images and models, and safe, verified transfers.

Built on dagster-aws's `S3Resource`, so endpoint, region and profile settings are the familiar ones and the
standard credential chain (env, profile, IAM role) applies. Credentials are never fields here: boto3 finds them,
so they never reach run config, logs or metadata (S3Resource's own credential fields are refused, see __init__).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dagster_aws.s3 import S3Resource
from pydantic import Field

from hy3d_pipeline.s3.errors import S3AccessError, translate

_CHUNK = 1 << 20
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_CREDENTIAL_FIELDS = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
_warned_no_list: set[str] = set()
log = logging.getLogger(__name__)
NO_BUCKET = "S3_IMAGES_BUCKET is not set: set it (or run `hy3d-pipeline dev` for the embedded default)"


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    etag: str  # without quotes
    size: int
    last_modified: datetime | None = None
    content_type: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def default_region() -> str:
    return os.getenv("S3_REGION") or os.getenv("AWS_REGION") or os.getenv("AWS_DEFAULT_REGION") or "us-east-1"


def default_temp_dir() -> str:
    return os.getenv("S3_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "hy3d-pipeline")


def env_flag(name: str, default: bool) -> bool:
    value = os.getenv(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_local_name(key: str, etag: str = "") -> str:
    """A file name for `key` that can never leave its directory: one path component of safe characters,
    prefixed by a hash of key and ETag so distinct keys (and versions) never collide."""
    digest = hashlib.sha256(f"{key}\0{etag}".encode()).hexdigest()[:20]
    tail = _UNSAFE.sub("_", key.rsplit("/", 1)[-1]).strip("._")[-80:]
    return f"{digest}-{tail}" if tail else digest


class ImageStorage(S3Resource):
    """Where images come from and models go, plus download/upload with the pipeline's guarantees."""

    images_bucket: str = Field(description="Bucket holding the source images (S3_IMAGES_BUCKET).")
    images_prefix: str = Field(default="", description="Only keys under this prefix are images (S3_IMAGES_PREFIX).")
    models_bucket: str = Field(default="", description="Bucket for generated models; empty means the images bucket.")
    models_prefix: str = Field(default="models/", description="Key prefix for generated models (S3_MODELS_PREFIX).")
    download_timeout: float = Field(default=60.0, description="Seconds allowed for one download (S3_DOWNLOAD_TIMEOUT).")
    temp_dir: str = Field(default="", description="Where local copies live (S3_TEMP_DIR); empty: system temp dir.")
    cleanup_temp_files: bool = Field(default=True, description="Delete local copies after processing.")
    ca_bundle: str = Field(default="", description="CA bundle file to verify the endpoint's TLS certificate with "
                           "(S3Resource's `verify` is only true/false); empty: `verify`, then AWS_CA_BUNDLE.")

    def __init__(self, **data: Any) -> None:
        # Refused rather than honoured: a resource field is resource config, which Dagster shows in the UI, keeps
        # in the definitions snapshot and lets the launchpad set per run, so a secret there is a secret leaked.
        # Silently ignoring them (as before) was worse: the run used other credentials than the ones given.
        given = [name for name in _CREDENTIAL_FIELDS if data.get(name) not in (None, "")]
        if given:
            raise ValueError(
                f"ImageStorage does not take credentials as resource fields ({', '.join(given)}): set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in the environment, or AWS_PROFILE, "
                "or use an IAM role; resource config is shown in the Dagster UI and stored with the definitions")
        super().__init__(**data)

    @classmethod
    def from_env(cls, **overrides: Any) -> "ImageStorage":
        """Configuration from the contract's environment variables, read when the code location loads."""
        values: dict[str, Any] = dict(
            images_bucket=os.getenv("S3_IMAGES_BUCKET", ""),
            images_prefix=os.getenv("S3_IMAGES_PREFIX", ""),
            models_bucket=os.getenv("S3_MODELS_BUCKET", ""),
            models_prefix=os.getenv("S3_MODELS_PREFIX", "models/"),
            region_name=default_region(),
            endpoint_url=os.getenv("S3_ENDPOINT_URL") or None,
            profile_name=os.getenv("AWS_PROFILE") or None,
            download_timeout=float(os.getenv("S3_DOWNLOAD_TIMEOUT", "60") or 60),
            temp_dir=default_temp_dir(),
            cleanup_temp_files=env_flag("S3_CLEANUP_TEMP_FILES", True),
        )
        values.update(overrides)
        return cls(**values)

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

    def local_dir(self) -> Path:
        path = Path(self.temp_dir or default_temp_dir())
        path.mkdir(parents=True, exist_ok=True)
        return path

    def local_path(self, info: ObjectInfo) -> Path:
        base = self.local_dir().resolve()
        path = (base / safe_local_name(info.key, info.etag)).resolve()
        if path.parent != base:  # belt and braces: safe_local_name already guarantees one component
            raise S3AccessError(f"refusing local path outside {base} for {info.url}")
        return path

    # ---- client ----------------------------------------------------------------------------------------------
    def client(self) -> Any:
        """A boto3 client with the download timeout applied, shared per process (clients are thread-safe)."""
        identity = "\0".join(os.getenv(v, "") for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
        verify = self.ca_bundle or self.verify
        key = (self.region_name, self.endpoint_url, self.profile_name, self.download_timeout, self.max_attempts,
               self.use_ssl, verify, hashlib.sha256(identity.encode()).hexdigest())
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session(profile_name=self.profile_name, region_name=self.region_name)
                timeout = max(1.0, float(self.download_timeout))
                client = session.client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    use_ssl=self.use_ssl,
                    verify=verify,
                    config=Config(
                        connect_timeout=min(timeout, 10.0),
                        read_timeout=timeout,
                        retries={"max_attempts": self.max_attempts, "mode": "standard"},
                        signature_version="s3v4",  # also for presigned listing URLs (see s3/listing.py)
                        s3={"addressing_style": "path"} if self.endpoint_url else None,
                        max_pool_connections=32,
                    ),
                )
                _clients[key] = client
            return client

    def _fail(self, exc: BaseException, bucket: str, key: str | None) -> S3AccessError:
        err = translate(exc, bucket, key, endpoint=self.endpoint_url)
        if key is not None and err.code in ("NoSuchKey", "AccessDenied") and _bare_status(exc):
            err = self._explain(bucket, key) or err
        return err

    def _explain(self, bucket: str, key: str) -> S3AccessError | None:
        """HEAD errors have no body, so a missing bucket, a missing key and bad credentials all look alike;
        a one-byte GET returns the real error code."""
        try:
            self.client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        except Exception as exc:  # noqa: BLE001
            return translate(exc, bucket, key, endpoint=self.endpoint_url)
        return None

    # ---- operations ------------------------------------------------------------------------------------------
    @staticmethod
    def _need(bucket: str) -> None:
        # no bucket configured: there is no safe default on AWS (a global name is someone else's bucket)
        if not bucket:
            raise S3AccessError(NO_BUCKET, code="NoBucketConfigured")

    def head(self, bucket: str, key: str) -> ObjectInfo:
        self._need(bucket)
        try:
            r = self.client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, bucket, key) from exc
        return ObjectInfo(bucket, key, r["ETag"].strip('"'), int(r["ContentLength"]), r.get("LastModified"),
                          r.get("ContentType"))

    def head_or_none(self, bucket: str, key: str, *, forbidden_is_absent: bool = False) -> dict | None:
        """Full HEAD response of an object that may not exist (models we may have written before).

        `forbidden_is_absent`: for "have we made this model yet" only. Without s3:ListBucket on a bucket, S3
        answers a HEAD of a missing key with 403, not 404, so a models bucket granted just Get/PutObject would
        fail every first generation. There a 403 means "not known to exist": the model is generated and its
        upload overwrites, which is idempotent. Never for source images, where absent means deleted."""
        self._need(bucket)
        try:
            return self.client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            # absence is the expected answer here: a bare 404 needs no second request to explain it (a missing
            # bucket still surfaces, by name, when the model is uploaded)
            err = translate(exc, bucket, key, endpoint=self.endpoint_url)
            if err.code == "NoSuchKey":
                return None
            if forbidden_is_absent and err.code == "AccessDenied" and _bare_status(exc):
                if bucket not in _warned_no_list:
                    _warned_no_list.add(bucket)
                    log.warning(
                        "S3 answered 403 to HEAD s3://%s/%s: taken as 'no model yet'. Grant s3:ListBucket on bucket "
                        "%r so missing objects answer 404 and existing models are recognised (without it S3 answers "
                        "403 instead of 404; if the credentials also lack s3:GetObject there, every model is made "
                        "again)", bucket, key, bucket)
                return None
            raise self._fail(exc, bucket, key) from exc

    def list_keys(self, bucket: str, prefix: str = "", start_after: str = "") -> Iterator[list[tuple[str, str, int]]]:
        """Pages of (key, etag, size) under `prefix`, in key order, resuming after `start_after`."""
        self._need(bucket)
        from hy3d_pipeline.s3.listing import list_pages

        try:
            yield from list_pages(self.client(), bucket, prefix, start_after, timeout=float(self.download_timeout))
        except S3AccessError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, bucket, None, endpoint=self.endpoint_url) from exc

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
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        deadline = time.monotonic() + float(self.download_timeout)
        try:
            try:
                resp = self.client().get_object(Bucket=info.bucket, Key=info.key, IfMatch=f'"{info.etag}"')
                md5 = hashlib.md5(usedforsecurity=False)
                size = 0
                with open(tmp, "wb") as out:
                    for chunk in resp["Body"].iter_chunks(_CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
                        size += len(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError()
            except Exception as exc:  # noqa: BLE001
                if isinstance(exc, TimeoutError):
                    raise S3AccessError(
                        f"download of {info.url} took longer than S3_DOWNLOAD_TIMEOUT={self.download_timeout:g} s; "
                        "raise it for large images or check the network", transient=True, code="Timeout") from exc
                raise self._fail(exc, info.bucket, info.key) from exc
            if size != info.size:
                raise S3AccessError(f"download of {info.url} is incomplete: got {size} of {info.size} bytes",
                                    transient=True, code="Incomplete")
            if etag_is_md5(info.etag, resp) and md5.hexdigest() != info.etag:
                raise S3AccessError(f"download of {info.url} does not match its ETag {info.etag}: corrupted in transit",
                                    transient=True, code="BadDigest")
            os.replace(tmp, dest)
            return dest
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, bucket: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
               metadata: dict[str, str] | None = None, if_match: str | None = None,
               if_none_match: bool = False) -> str:
        """Put `data`; returns the new ETag. With `if_match` (an ETag) or `if_none_match` (no object may exist)
        the write is conditional, and an S3AccessError with code PreconditionFailed says the object changed."""
        self._need(bucket)
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"} if if_none_match else {}
        put = dict(Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata or {})
        try:
            try:
                r = self.client().put_object(**put, **condition)
            except Exception as exc:  # noqa: BLE001
                # a store that predates conditional writes (older MinIO, Ceph) refuses the header outright; the
                # caller's own check of the source still holds there, only the race window is back
                if not (condition and _error_code(exc) == "NotImplemented"):
                    raise
                r = self.client().put_object(**put)
        except Exception as exc:  # noqa: BLE001
            if condition and _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise S3AccessError(f"s3://{bucket}/{key} was written by someone else meanwhile", transient=True,
                                    code="PreconditionFailed") from exc
            raise translate(exc, bucket, key, endpoint=self.endpoint_url) from exc
        return r["ETag"].strip('"')

    def read(self, bucket: str, key: str) -> bytes | None:
        """A small object's bytes (a model, its picture), or None when there is no such object."""
        self._need(bucket)
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            err = translate(exc, bucket, key, endpoint=self.endpoint_url)
            if err.code == "NoSuchKey":
                return None
            raise err from exc

    def sweep_temp(self, max_age_s: float | None = None) -> list[Path]:
        """Delete what dead processes left in the temp folder; returns what was deleted. Called at the start of
        every generation step; a worker may call it when it starts.

        `.part` files (a download killed mid-write, SIGKILL included) and local copies not modified for
        `max_age_s` (default 2 x S3_DOWNLOAD_TIMEOUT) go. Age is what tells a dead writer from a live one: a live
        download writes continuously and ends within S3_DOWNLOAD_TIMEOUT, and a cached copy is touched when it is
        reused. A live run's copy old enough to be swept is fetched again by that run when it is needed. With
        S3_CLEANUP_TEMP_FILES false only `.part` files go: the copies are then a cache by choice."""
        bound = 2 * float(self.download_timeout) if max_age_s is None else float(max_age_s)
        folder = Path(self.temp_dir or default_temp_dir())
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



def _error_code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


_MD5_ETAG = re.compile(r"[0-9a-fA-F]{32}")
# with these, S3's ETag is not the MD5 of the bytes a GET returns, even when it looks like one
_OPAQUE_SSE = ("aws:kms", "aws:kms:dsse")


def etag_is_md5(etag: str, response: dict) -> bool:
    """Whether `etag` (unquoted) is the MD5 of the object's bytes, judged from its form (multipart ETags end in
    "-N") and the GET/HEAD response's encryption headers (SSE-C, SSE-KMS and DSSE-KMS ETags are not MD5s)."""
    if not _MD5_ETAG.fullmatch(etag):
        return False
    if response.get("SSECustomerAlgorithm"):
        return False
    return str(response.get("ServerSideEncryption") or "").lower() not in _OPAQUE_SSE


def _bare_status(exc: BaseException) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code.isdigit()
