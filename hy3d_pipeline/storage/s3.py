"""S3 and S3-compatible servers (SeaweedFS, MinIO, Ceph, LocalStack) as an ObjectStore, through boto3.

The standard credential chain (env, profile, IAM role) applies and credentials are never arguments here, so
they never reach resource config, run config, logs or metadata. Errors become S3AccessErrors that name the
object and say what to do (s3/errors.py); a HEAD's bodiless 403/404 is explained with a one-byte GET.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from hy3d_pipeline.s3.errors import S3AccessError, translate
from hy3d_pipeline.s3.urls import S3Location
from hy3d_pipeline.settings import secret_values
from hy3d_pipeline.storage.base import ObjectInfo, ObjectStore

CHUNK_BYTES = 1 << 20  # read size of downloads
_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_warned_no_list: set[str] = set()
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Store(ObjectStore):
    scheme = "s3"

    region_name: str = "us-east-1"
    endpoint_url: str | None = None
    profile_name: str | None = None
    download_timeout: float = 60.0
    max_attempts: int = 5
    use_ssl: bool = True
    verify: bool | str | None = None  # a CA bundle path, or True/False

    # ---- client ----------------------------------------------------------------------------------------------
    def client(self) -> Any:
        """A boto3 client with the download timeout applied, shared per process (clients are thread-safe) and
        per credentials (a changed key in the environment gets a new client)."""
        identity = hashlib.sha256("\0".join(secret_values()).encode()).hexdigest()
        key = (self.region_name, self.endpoint_url, self.profile_name, self.download_timeout, self.max_attempts,
               self.use_ssl, self.verify, identity)
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
                    verify=self.verify,
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

    # ---- the interface ---------------------------------------------------------------------------------------
    def list(self, bucket: str, prefix: str = "", start_after: str = "") -> Iterator[list[tuple[str, str, int]]]:
        from hy3d_pipeline.s3.listing import list_pages

        try:
            yield from list_pages(self.client(), bucket, prefix, start_after, timeout=float(self.download_timeout))
        except S3AccessError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise translate(exc, bucket, None, endpoint=self.endpoint_url) from exc

    def head(self, bucket: str, key: str, *, missing_ok: bool = False,
             forbidden_is_absent: bool = False) -> ObjectInfo | None:
        """`forbidden_is_absent`: for "have we made this model yet" only. Without s3:ListBucket on a bucket, S3
        answers a HEAD of a missing key with 403, not 404, so a models bucket granted just Get/PutObject would
        fail every first generation. There a 403 means "not known to exist": the model is generated and its
        upload overwrites, which is idempotent. Never for source images, where absent means deleted."""
        try:
            r = self.client().head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if not missing_ok:
                raise self._fail(exc, bucket, key) from exc
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
        etag = r["ETag"].strip('"')
        return ObjectInfo(bucket, key, etag, int(r["ContentLength"]), r.get("LastModified"), r.get("ContentType"),
                          metadata=dict(r.get("Metadata") or {}))

    def fetch(self, info: ObjectInfo, out: BinaryIO, deadline: float) -> None:
        try:
            # conditional on the ETag: an overwrite while we read is detected, not mixed into the copy
            resp = self.client().get_object(Bucket=info.bucket, Key=info.key, IfMatch=f'"{info.etag}"')
        except Exception as exc:  # noqa: BLE001
            raise self._fail(exc, info.bucket, info.key) from exc
        write_checked(resp["Body"].iter_chunks(CHUNK_BYTES), info, out, deadline,
                      check_md5=etag_is_md5(info.etag, resp), timeout_s=self.download_timeout,
                      fail=lambda exc: self._fail(exc, info.bucket, info.key))

    def fetch_presigned(self, url: str, location: S3Location, out: BinaryIO, deadline: float) -> ObjectInfo:
        """Write the object of the presigned `url` to `out` with the URL's own signature (no credentials of
        ours); returns what the answer said of it. `location` is its bucket and key (s3/urls.py parsed them)."""
        from hy3d_pipeline.s3.presigned import fetch_presigned

        return fetch_presigned(url, location, out, deadline, timeout=self.download_timeout, verify=self.verify)

    def read(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            err = translate(exc, bucket, key, endpoint=self.endpoint_url)
            if err.code == "NoSuchKey":
                return None
            raise err from exc

    def write(self, bucket: str, key: str, data: bytes, *, content_type: str = "application/octet-stream",
              metadata: dict[str, str] | None = None, if_match: str | None = None,
              if_none_match: bool = False) -> str:
        condition = ({"IfMatch": f'"{if_match.strip(chr(34))}"'} if if_match else
                     {"IfNoneMatch": "*"} if if_none_match else {})
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

    def sign(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        return self.client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                    ExpiresIn=int(expires_s))

    def http_url(self, bucket: str, key: str) -> str | None:
        from urllib.parse import quote

        # only for a configured endpoint (a SeaweedFS on a laptop): on AWS a plain link needs a public object
        return f"{self.endpoint_url.rstrip('/')}/{bucket}/{quote(key)}" if self.endpoint_url else None


def write_checked(chunks: Iterable[bytes], info: ObjectInfo, out: BinaryIO, deadline: float, *, check_md5: bool,
                  timeout_s: float, fail: Callable[[BaseException], BaseException]) -> None:
    """The checks every download gets, whoever sends the GET (boto3 in S3Store.fetch, a presigned URL's own
    signature in s3/presigned.py): `chunks` copied to `out`, done by `deadline` (time.monotonic()), exactly
    `info.size` bytes, their MD5 equal to the ETag when `check_md5` (see etag_is_md5). `fail` turns an error
    raised while reading into the S3AccessError to raise."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = 0
    try:
        for chunk in chunks:
            out.write(chunk)
            md5.update(chunk)
            size += len(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError()
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, TimeoutError):
            raise S3AccessError(
                f"download of {info.url} took longer than S3_DOWNLOAD_TIMEOUT={timeout_s:g} s; "
                "raise it for large images or check the network", transient=True, code="Timeout") from exc
        raise fail(exc) from exc
    if size != info.size:
        raise S3AccessError(f"download of {info.url} is incomplete: got {size} of {info.size} bytes",
                            transient=True, code="Incomplete")
    if check_md5 and md5.hexdigest() != info.etag:
        raise S3AccessError(f"download of {info.url} does not match its ETag {info.etag}: corrupted in transit",
                            transient=True, code="BadDigest")


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
