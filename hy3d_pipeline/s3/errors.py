"""Turn boto errors into one exception type (a StorageError) whose message names the object and says what to do.

The Dagster retry policy and the seed API both need to know whether a failure is transient (worth a retry) or
a fact about the object (missing, forbidden): `S3AccessError.transient` carries that.
"""

from __future__ import annotations

from hy3d_pipeline.storage.base import StorageError


class S3AccessError(StorageError):
    """A failed S3 operation (its message redacted, `transient` and `code` as for any StorageError)."""


def _where(bucket: str, key: str | None) -> str:
    return f"s3://{bucket}/{key}" if key else f"bucket {bucket!r}"


def missing_bucket(bucket: str, key: str | None) -> S3AccessError:
    return S3AccessError(
        f"bucket {bucket!r} does not exist (reading {_where(bucket, key)}): check S3_IMAGES_BUCKET or the URL, "
        "and the region",
        code="NoSuchBucket",
    )


def translate(exc: BaseException, bucket: str, key: str | None = None, *, endpoint: str | None = None) -> S3AccessError:
    """An S3AccessError for `exc`, raised while touching bucket/key. Never includes credentials."""
    from botocore import exceptions as bx

    where = _where(bucket, key)
    target = endpoint or "AWS S3"
    if isinstance(exc, S3AccessError):
        return exc
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return S3AccessError(
            f"no AWS credentials found to read {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE (aws configure), or attach an IAM role with s3:GetObject and s3:ListBucket",
            code="NoCredentials",
        )
    if isinstance(exc, bx.ProfileNotFound):
        return S3AccessError(f"AWS profile not found while accessing {where}: {exc}; check AWS_PROFILE", code="ProfileNotFound")
    if isinstance(exc, bx.SSLError):
        return S3AccessError(
            f"TLS verification failed talking to {target} for {where}: point AWS_CA_BUNDLE (or the resource's "
            "`verify`) at the CA bundle that signed the endpoint's certificate", code="SSLError",
        )
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)) or isinstance(exc, TimeoutError):
        return S3AccessError(
            f"timed out talking to {target} for {where}; check connectivity, or raise S3_DOWNLOAD_TIMEOUT",
            transient=True, code="Timeout",
        )
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ConnectionError)):
        return S3AccessError(
            f"cannot reach {target} for {where}: check the network and S3_ENDPOINT_URL", transient=True, code="Connection"
        )
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return missing_bucket(bucket, key)
        if code in ("NoSuchKey", "404", "NotFound"):
            return S3AccessError(f"object not found: {where}; check the key (it may have been deleted)", code="NoSuchKey")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
            return S3AccessError(
                f"{target} rejected the credentials ({code}) for {where}: check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the profile",
                code=code,
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return S3AccessError(
                f"access denied to {where}: the credentials need s3:GetObject, and s3:ListBucket on bucket {bucket!r} "
                "(without it S3 answers 403 instead of 404 for a missing object)",
                code="AccessDenied",
            )
        if code in ("PreconditionFailed", "412"):
            return S3AccessError(f"{where} changed while it was being read; it will be fetched again", transient=True, code=code)
        if code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "503", "500") or (status or 0) >= 500:
            return S3AccessError(f"{target} is unavailable ({code}) for {where}; retrying later may succeed", transient=True, code=code)
        return S3AccessError(f"S3 error {code or status} for {where}: {err.get('Message', '')}".rstrip(": "), code=code)
    return S3AccessError(f"unexpected error accessing {where}: {type(exc).__name__}: {exc}", transient=True, code=type(exc).__name__)
