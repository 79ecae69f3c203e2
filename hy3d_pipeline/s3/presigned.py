"""Fetch an image through a presigned URL, with the URL's own signature.

A web app hands a worker a presigned URL so that the worker needs no read access of its own. Reading the object
with the worker's credentials instead (what an s3:// URL gets) fails on a credential-less worker, and elsewhere
reads with rights the URL's signer never granted. So the URL is sent as given: one plain GET, nothing signed.

The URL comes from outside, so:
- its host has already been checked to be AWS S3 or the configured S3_ENDPOINT_URL (s3/urls.py
  `parse_object_url`), and a redirect is never followed: it would carry the request, signature included, to a
  host nobody checked. (S3 redirects only to another regional endpoint of the same bucket; the refusal says to
  ask for a URL of that one.)
- TLS is verified as the boto3 client verifies it (the resource's `ca_bundle` / `verify`, AWS_CA_BUNDLE), proxies
  are boto3's (HTTPS_PROXY / HTTP_PROXY / NO_PROXY), connect and read timeouts are S3_DOWNLOAD_TIMEOUT's.
- the bytes get every download's checks (storage/s3.py `write_checked`: exact size from Content-Length, MD5
  against the ETag, the whole download within S3_DOWNLOAD_TIMEOUT) and its `.part`-then-rename
  (ImageStorage); the image itself is then checked by content like any other (images/validation.py).
- a presigned URL is a credential until it expires: it is named without its query everywhere, and while it is in
  flight its signature values are scrubbed from urllib3's and botocore's own log records (s3/redact.py).

`http_get` is the whole HTTP part (botocore's URLLib3Session, what boto3 itself sends with); `fetch_presigned`
writes its answer, checked, to a file, with the shape of ObjectStore.fetch; S3Store.fetch_presigned calls it, and
ImageStorage.download_presigned makes the local copy.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any, BinaryIO
from urllib.parse import unquote, urljoin

from hy3d_pipeline.s3.errors import S3AccessError, translate
from hy3d_pipeline.s3.redact import redact, secrets_in_flight
from hy3d_pipeline.s3.urls import SIGNED_QUERY_PARAMS, S3Location, without_query
from hy3d_pipeline.storage.base import ObjectInfo

log = logging.getLogger(__name__)

EXPIRED = "the presigned URL has expired or its signature is invalid; ask for a new one"
# S3's answers (400 or 403) that mean the signature, not the object, is the problem
_SIGNATURE_CODES = frozenset(("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken",
                              "InvalidToken", "TokenRefreshRequired", "AuthorizationQueryParametersError",
                              "RequestExpired", "RequestTimeTooSkewed"))
_ERROR_BODY_LIMIT = 64 * 1024  # an S3 error document is a few hundred bytes
_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(r"<Message>([^<]{1,500})</Message>")
_sessions: dict[tuple, Any] = {}
_sessions_lock = threading.Lock()


def signed_values(url: str) -> tuple[str, ...]:
    """The secret parts of a presigned URL's query, raw and percent-decoded: signature, credential (and the
    access key id inside it), security token."""
    values: list[str] = []
    for part in url.partition("?")[2].partition("#")[0].split("&"):
        name, _, value = part.partition("=")
        if name.lower() in SIGNED_QUERY_PARAMS and value:
            values += [value, unquote(value)]
            if name.lower() == "x-amz-credential":
                values.append(unquote(value).split("/", 1)[0])
    return tuple(dict.fromkeys(values))


def origin(url: str) -> str:
    """scheme://host[:port] of a URL: all of it that may be shown."""
    match = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*", url)
    return match.group() if match else "(no URL)"


def tls_verify(verify: bool | str | None) -> bool | str:
    """What to verify the server's certificate with, resolved as boto3 resolves it: the store's `verify` (a CA
    bundle, or True/False), else botocore's own `ca_bundle` setting (AWS_CA_BUNDLE, ~/.aws/config), else the
    default CA bundle."""
    if verify is not None:
        return verify
    import botocore.session

    return botocore.session.Session().get_config_variable("ca_bundle") or True


def _session(verify: bool | str, timeout: float, proxies: dict[str, str]) -> Any:
    from botocore.httpsession import URLLib3Session

    key = (verify, timeout, tuple(sorted(proxies.items())))
    with _sessions_lock:
        session = _sessions.get(key)
        if session is None:
            session = _sessions[key] = URLLib3Session(verify=verify, proxies=proxies,
                                                      timeout=(min(timeout, 10.0), timeout))
        return session


def http_get(url: str, *, timeout: float, verify: bool | str) -> Any:
    """One GET of `url` exactly as given: nothing signed, no redirect followed (a 3xx comes back as it is), TLS
    checked against `verify`, connect/read timeouts from `timeout`. Returns botocore's AWSResponse, streaming
    (`.raw` is the urllib3 response); close `.raw` when done. Raises botocore's connection errors, which name
    the URL: callers must not show them."""
    from botocore.awsrequest import AWSPreparedRequest
    from botocore.utils import get_environ_proxies

    # URLLib3Session answers 3xx without following (it sends with urllib3's Retry(False)) and never signs
    session = _session(verify, max(1.0, float(timeout)), get_environ_proxies(url))
    return session.send(AWSPreparedRequest("GET", url, {"User-Agent": "hy3d-pipeline"}, None, True))


def fetch_presigned(url: str, location: S3Location, out: BinaryIO, deadline: float, *, timeout: float,
                    verify: bool | str | None = None) -> ObjectInfo:
    """Write the object of the presigned `url` to `out`, with the URL's own signature; `location` is its bucket
    and key (s3/urls.py parsed them from it). Returns what the answer said of the object. Checked like every
    download (storage/s3.py `write_checked`); `out` is the caller's to make durable (ImageStorage writes a
    `.part` and renames it). Raises S3AccessError naming the object, never the signature."""
    from hy3d_pipeline.storage.s3 import CHUNK_BYTES, etag_is_md5, write_checked

    secrets = signed_values(url)
    with secrets_in_flight(*secrets):
        log.debug("fetching %s with its presigned query", without_query(url))
        try:
            response = http_get(url, timeout=timeout, verify=tls_verify(verify))
        except Exception as exc:  # noqa: BLE001
            # from None: botocore's exceptions quote the whole signed URL
            raise _clean(translate(exc, location.bucket, location.key, endpoint=origin(url)), secrets) from None
        try:
            if response.status_code != 200:
                raise _refusal(response, url, location, secrets)
            info = _object_info(response, location)
            sse = {"ServerSideEncryption": response.headers.get("x-amz-server-side-encryption"),
                   "SSECustomerAlgorithm": response.headers.get("x-amz-server-side-encryption-customer-algorithm")}
            # decode_content=False: the stored bytes, as the size and the ETag have them
            write_checked(response.raw.stream(CHUNK_BYTES, decode_content=False), info, out, deadline,
                          check_md5=etag_is_md5(info.etag, sse), timeout_s=timeout,
                          fail=lambda exc: _read_failure(exc, url, location, secrets))
            return info
        finally:
            # a fully read answer has already given its connection back; this closes a partly read one
            response.raw.close()


def _object_info(response: Any, location: S3Location) -> ObjectInfo:
    length = str(response.headers.get("Content-Length") or "")
    if not length.isdigit():
        # every S3 GetObject answer has one; without it the copy's completeness could not be checked
        raise S3AccessError(f"the answer for {location.url} has no Content-Length: not an S3 object download",
                            code="NoContentLength")
    etag = str(response.headers.get("ETag") or "").strip().strip('"')
    return ObjectInfo(location.bucket, location.key, etag, int(length), None, response.headers.get("Content-Type"))


def _refusal(response: Any, url: str, location: S3Location, secrets: tuple[str, ...]) -> S3AccessError:
    status, name = response.status_code, location.url
    if 300 <= status < 400:
        target = origin(urljoin(url, response.headers.get("Location") or ""))
        return _clean(S3AccessError(
            f"{name}: the presigned URL ({origin(url)}) answered {status}, a redirect to {target}; not followed "
            "(redirects never are: one could take the request and its signature to a host nobody checked): ask "
            "for a presigned URL of the bucket's own regional endpoint", code="Redirect"), secrets)
    body = response.raw.read(_ERROR_BODY_LIMIT, decode_content=True) or b""
    text = body.decode("utf-8", "replace")
    # only Code and Message: AWS's SignatureDoesNotMatch document also quotes the signature and canonical request
    code = (_CODE.search(text) or [None, ""])[1]
    message = (_MESSAGE.search(text) or [None, ""])[1]
    said = f"{status} {code}: {message}" if message else f"{status} {code}".rstrip()
    if status == 403 or (status == 400 and code in _SIGNATURE_CODES):
        hint = ""
        if code == "AccessDenied" and "expire" not in message.lower():
            hint = "; or whoever signed it may not read this object (s3:GetObject)"
        return _clean(S3AccessError(f"{name}: {EXPIRED} (S3 answered {said}{hint})", code=code or "AccessDenied"),
                      secrets)
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code or str(status), "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    return _clean(translate(error, location.bucket, location.key, endpoint=origin(url)), secrets)


def _read_failure(exc: BaseException, url: str, location: S3Location, secrets: tuple[str, ...]) -> S3AccessError:
    """An error while the body streamed in (urllib3's own exceptions: botocore wraps only the sending)."""
    from urllib3.exceptions import ProtocolError, TimeoutError as Urllib3Timeout

    if isinstance(exc, Urllib3Timeout):
        exc = TimeoutError()
    elif isinstance(exc, ProtocolError):
        reason = exc.args[0] if exc.args else type(exc).__name__  # args[1] repeats it as a repr
        return _clean(S3AccessError(f"download of {location.url} was cut off ({reason}); fetching it again may "
                                    "succeed", transient=True, code="Incomplete"), secrets)
    return _clean(translate(exc, location.bucket, location.key, endpoint=origin(url)), secrets)


def _clean(error: S3AccessError, secrets: tuple[str, ...]) -> S3AccessError:
    return S3AccessError(redact(str(error), *secrets), transient=error.transient, code=error.code)
