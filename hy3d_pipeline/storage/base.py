"""The interface every object store implements, and the two types that cross it (ObjectInfo, StorageError).

Small on purpose: these six operations are all the pipeline asks of a store, so a new store (GCS, Azure Blob)
is one module, and everything above it (sensor, assets, report, seed API) stays as it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, ClassVar


@dataclass(frozen=True)
class ObjectInfo:
    """One version of one object: the ETag is the version (a download is checked against it)."""

    bucket: str
    key: str
    etag: str  # without quotes
    size: int
    last_modified: datetime | None = None
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)  # the object's user metadata
    scheme: str = "s3"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


class StorageError(Exception):
    """A failed storage operation. The message names the object and says what to do; `transient` says whether
    a retry may succeed (timeouts, 5xx, an object changing while read), `code` is the store's error code."""

    def __init__(self, message: str, *, transient: bool = False, code: str = "") -> None:
        from hy3d_pipeline.s3.redact import redact

        # scrubbed here, once for every path: messages quote foreign exceptions, and those quote signed URLs
        super().__init__(redact(message))
        self.transient = transient
        self.code = code


class ObjectStore(ABC):
    """One object store (S3 and S3-compatible servers, or another kind)."""

    scheme: ClassVar[str]

    @abstractmethod
    def list(self, bucket: str, prefix: str = "", start_after: str = "") -> Iterator[list[tuple[str, str, int]]]:
        """Pages of (key, etag, size) under `prefix`, in key order, after `start_after`."""

    @abstractmethod
    def head(self, bucket: str, key: str, *, missing_ok: bool = False,
             forbidden_is_absent: bool = False) -> ObjectInfo | None:
        """The object's current version; None when it does not exist and `missing_ok` (else StorageError)."""

    @abstractmethod
    def fetch(self, info: ObjectInfo, out: BinaryIO, deadline: float) -> None:
        """Write exactly the version `info` describes to `out` (StorageError if it changed, is incomplete or
        does not match its digest; transient when a retry may help), before `time.monotonic()` passes `deadline`."""

    @abstractmethod
    def read(self, bucket: str, key: str) -> bytes | None:
        """A small object's bytes, or None when there is no such object."""

    @abstractmethod
    def write(self, bucket: str, key: str, data: bytes, *, content_type: str, metadata: dict[str, str],
              if_match: str | None = None, if_none_match: bool = False) -> str:
        """Put `data`, returning the new ETag. With `if_match` (an ETag) or `if_none_match` (nothing may exist)
        the write is conditional: StorageError with code PreconditionFailed when the condition does not hold."""

    @abstractmethod
    def sign(self, bucket: str, key: str, expires_s: int = 3600) -> str:
        """A URL anyone can GET the object with until it expires (a credential: never log it)."""

    def http_url(self, bucket: str, key: str) -> str | None:
        """A plain (unsigned) http(s) link to the object where one makes sense, else None."""
        return None
