"""Parse and vet the S3 object URLs that users hand to the pipeline.

Image locations arrive as free text (run config, sensors, CLI arguments) in
whatever form people copy them: ``s3://`` URIs, console or SDK https links,
presigned URLs.  The pipeline later fetches these with real credentials, so a
loose parser is a security problem, not just a correctness one: a URL that
merely *looks* like S3 (``bucket.s3.amazonaws.com.evil.com``, userinfo tricks,
the instance-metadata address) must never be turned into a fetch.  Everything
else in the package therefore goes through :func:`parse_s3_url`, which either
returns a normalised :class:`S3Location` or raises :class:`S3UrlError` with a
message a user can act on.

URLs of the configured S3-compatible endpoint (S3_ENDPOINT_URL) are S3 URLs
too, but only through :func:`parse_object_url`, and only with exactly that
scheme, host and port.  :func:`is_presigned_url` tells the URLs that carry their
own signature (fetched with it: s3/presigned.py) from the ones read with the
worker's credentials.

The parser is deliberately hand-written instead of built on
``urllib.parse.urlsplit``: urlsplit silently drops tabs and newlines anywhere
in the URL and strips leading control characters, and it would split an
``s3://`` key at ``?``/``#``, which for ``s3://`` URIs are ordinary key
characters.

Only the standard library is imported: this module is loaded when the package
is imported and must stay cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

__all__ = [
    "S3Location",
    "S3UrlError",
    "is_s3_url",
    "parse_s3_url",
    "validate_bucket_name",
]


@dataclass(frozen=True)
class S3Location:
    """A bucket/key pair, plus the region when the URL it came from named one."""

    bucket: str
    key: str
    region: str | None = None

    @property
    def url(self) -> str:
        # Not percent-encoded: s3:// URIs carry the key verbatim, so this
        # round-trips through parse_s3_url.
        return f"s3://{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return self.url


class S3UrlError(ValueError):
    """A string is not a well-formed S3 object URL (or bucket name).

    ``url`` is the offending input (None when raised by
    :func:`validate_bucket_name`), ``reason`` the problem without the quoted URL.
    """

    def __init__(self, message: str, *, url: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.reason = reason if reason is not None else message


# Long inputs (a pasted presigned URL, a whole file read by mistake) would
# otherwise swamp logs and Dagster's error view.
_MAX_SHOWN = 200


# the query parameters that make a URL a credential: SigV4 and SigV2 presigning, STS tokens. Kept here (this
# module imports only the standard library) and used by s3/redact.py for every other message.
SIGNED_QUERY_PARAMS = frozenset(("x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
                                 "signature"))
# in running text a query string ends at the first character that cannot be part of a URL there
_QUERY_IN_TEXT = re.compile(r"\?[^\s'\"<>()\[\]{}]*")
SIGNED_QUERY_REDACTED = "?<signed query redacted>"


def _scrub_query(match: re.Match) -> str:
    names = {part.split("=", 1)[0].lower() for part in re.split(r"[?&;]", match.group(0)) if part}
    return SIGNED_QUERY_REDACTED if names & SIGNED_QUERY_PARAMS else match.group(0)


def scrub_signed_queries(text: str) -> str:
    """`text` with every query string that carries a signature or credential replaced by a placeholder."""
    return _QUERY_IN_TEXT.sub(_scrub_query, text)


def _show(text: str) -> str:
    text = scrub_signed_queries(text)  # a presigned URL is a credential until it expires
    if len(text) > _MAX_SHOWN:
        return f"{text[:_MAX_SHOWN]!r}... ({len(text)} characters)"
    return repr(text)


def _fail(url: str, reason: str) -> S3UrlError:
    return S3UrlError(f"invalid S3 URL {_show(url)}: {reason}", url=url, reason=reason)


# --- bucket names ---------------------------------------------------------
# Rules from the S3 "general purpose bucket naming rules" documentation.  The
# reserved prefixes/suffixes belong to other S3 features (access point
# aliases, Object Lambda, multi-region access points, directory buckets,
# table buckets) whose names would make a plain GetObject go somewhere else.

_BUCKET_CHARS_RE = re.compile(r"[a-z0-9.-]+")
_IPV4_FORMAT_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def _bucket_problem(name: str) -> str | None:
    """The first naming rule ``name`` breaks, or None when it is valid."""
    if not 3 <= len(name) <= 63:
        return f"must be between 3 and 63 characters long (got {len(name)})"
    if not _BUCKET_CHARS_RE.fullmatch(name):
        bad = next(c for c in name if not _BUCKET_CHARS_RE.fullmatch(c))
        if "A" <= bad <= "Z":
            return "must not contain uppercase letters"
        return f"may contain only lowercase letters, digits, dots and hyphens (found {bad!r})"
    if name[0] not in _ALNUM or name[-1] not in _ALNUM:
        return "must begin and end with a letter or digit"
    if ".." in name:
        return "must not contain two adjacent periods"
    if _IPV4_FORMAT_RE.fullmatch(name):
        return "must not be formatted as an IP address"
    for prefix in _RESERVED_PREFIXES:
        if name.startswith(prefix):
            return f"must not start with the reserved prefix {prefix!r}"
    for suffix in _RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return f"must not end with the reserved suffix {suffix!r}"
    return None


def validate_bucket_name(name: str) -> None:
    """Raise :class:`S3UrlError` naming the S3 bucket-naming rule ``name`` breaks."""
    if not isinstance(name, str):
        raise TypeError(f"bucket name must be a str, not {type(name).__name__}")
    problem = _bucket_problem(name)
    if problem is not None:
        raise S3UrlError(f"invalid S3 bucket name {_show(name)}: {problem}", reason=problem)


# --- endpoint hosts --------------------------------------------------------

_REGION = r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}"

# Anchored at the end (used with fullmatch) so that nothing may follow the AWS
# domain; the greedy bucket group makes the *last* s3 label the endpoint, so
# dotted bucket names such as "a.s3.b" still parse.
_HOST_RE = re.compile(
    rf"""
    (?:(?P<bucket>.+)\.)?
    (?:
        s3(?:-fips)?(?:\.dualstack)?\.(?P<region>{_REGION})
      | s3-(?P<legacy_region>{_REGION}|external-1)
      | (?P<accelerate>s3-accelerate(?:\.dualstack)?)
      | s3
    )
    \.(?P<domain>amazonaws\.com(?:\.cn)?)
    """,
    re.VERBOSE,
)

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_HOST_CHARS_RE = re.compile(r"[A-Za-z0-9.-]+")
# Dotted-decimal plus the decimal/hex/octal shorthands resolvers accept
# ("2130706433", "0x7f.1"): only used to pick a clearer message.
_NUMERIC_HOST_RE = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*\.?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE_OR_CONTROL_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_MAX_KEY_BYTES = 1024


def _check_key(url: str, key: str) -> str:
    if not key:
        raise _fail(url, "missing object key (the URL names a bucket, not an object)")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise _fail(url, "object key is not valid Unicode text") from None
    if size > _MAX_KEY_BYTES:
        raise _fail(url, f"object key is {size} bytes long; S3 allows at most {_MAX_KEY_BYTES}")
    return key


def _check_bucket(url: str, bucket: str) -> str:
    problem = _bucket_problem(bucket)
    if problem is not None:
        raise _fail(url, f"invalid bucket name {_show(bucket)}: {problem}")
    return bucket


def _decode(url: str, raw: str, what: str) -> str:
    # A stray "%" means the URL was never properly encoded, so any reading of
    # it would be a guess; S3 itself rejects such requests.
    if _BAD_PERCENT_RE.search(raw):
        raise _fail(url, f"malformed percent-escape in the {what}")
    try:
        # "+" is deliberately left alone: in a URL path it is a literal plus.
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeError:
        raise _fail(url, f"the {what} does not percent-decode to UTF-8 text") from None


def _parse_s3_scheme(url: str, rest: str) -> S3Location:
    if not rest.startswith("//"):
        raise _fail(url, "expected the form s3://bucket/key")
    bucket, _, key = rest[2:].partition("/")
    if not bucket:
        raise _fail(url, "missing bucket name")
    if _SPACE_OR_CONTROL_RE.search(bucket):
        raise _fail(url, "bucket (host) part contains whitespace or control characters")
    if "@" in bucket:
        raise _fail(url, "userinfo ('@') is not allowed in S3 URLs")
    _check_bucket(url, bucket)
    # The key is literal: "?", "#", "%" and spaces are ordinary key characters
    # in s3:// URIs (that is how the AWS CLI treats them).
    return S3Location(bucket, _check_key(url, key))


def _refuse_host(url: str, host: str) -> S3UrlError:
    if _NUMERIC_HOST_RE.fullmatch(host):
        return _fail(url, f"IP address hosts are not S3 endpoints ({host!r})")
    if host == "localhost" or host.endswith((".localhost", ".localhost.")):
        return _fail(url, "localhost is not an S3 endpoint")
    if "amazonaws" in host:
        return _fail(
            url,
            f"look-alike host {host!r}: not an AWS S3 endpoint "
            "(expected *.amazonaws.com or *.amazonaws.com.cn)",
        )
    return _fail(url, f"host {host!r} is not an AWS S3 endpoint")


def _split_http(url: str, rest: str) -> tuple[str, str, str]:
    """(lower-case host, port or "", the rest after the authority) of an http(s) URL, every trick refused."""
    if _CONTROL_RE.search(url):
        raise _fail(url, "contains control characters (tab, newline, ...)")
    if not rest.startswith("//"):
        raise _fail(url, "expected '//' and a host after the scheme")
    rest = rest[2:]
    authority = re.match(r"[^/?#]*", rest).group()
    tail = rest[len(authority):]

    if not authority:
        raise _fail(url, "missing host")
    if _SPACE_OR_CONTROL_RE.search(authority):
        raise _fail(url, "host contains whitespace or control characters")
    # Any userinfo is refused: "https://bucket.s3.amazonaws.com@evil.com/" is
    # a request to evil.com however convincing the part before "@" looks.
    if "@" in authority:
        raise _fail(url, "userinfo ('@') is not allowed in S3 URLs")
    if authority.startswith("["):
        raise _fail(url, "IP address hosts are not S3 endpoints (IPv6 literal)")
    if not authority.isascii():
        raise _fail(url, "host contains non-ASCII characters")
    host, colon, port = authority.partition(":")
    if colon and not (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
        raise _fail(url, f"invalid port {port!r}")
    if not host:
        raise _fail(url, "missing host")
    if not _HOST_CHARS_RE.fullmatch(host):
        bad = next(c for c in host if not _HOST_CHARS_RE.fullmatch(c))
        raise _fail(url, f"invalid character {bad!r} in host")
    if len(host) > 253:
        raise _fail(url, "host name is longer than 253 characters")
    return host.lower(), port, tail


def _parse_http_scheme(url: str, rest: str) -> S3Location:
    host, _, tail = _split_http(url, rest)

    match = _HOST_RE.fullmatch(host)
    if match is None:
        raise _refuse_host(url, host)

    region = match["region"] or match["legacy_region"]
    if region == "external-1":
        region = "us-east-1"
    # China regions live only under amazonaws.com.cn and vice versa; a mixed
    # pair does not resolve, so it is a typo or a forgery either way.
    if match["domain"].endswith(".cn"):
        if region is None or not region.startswith("cn-"):
            raise _fail(url, "amazonaws.com.cn endpoints must name a China (cn-*) region")
    elif region is not None and region.startswith("cn-"):
        raise _fail(url, f"China region {region!r} requires the amazonaws.com.cn domain")

    path = re.match(r"[^?#]*", tail).group()  # query and fragment never reach the key
    if match["accelerate"]:
        if match["bucket"] is None:
            raise _fail(url, "Transfer Acceleration endpoints require the bucket in the host name")
        _check_bucket(url, match["bucket"])
        if "." in match["bucket"]:
            raise _fail(url, "buckets with dots in their name cannot use Transfer Acceleration")
    bucket, key = _object_in_path(url, path, match["bucket"])
    return S3Location(bucket, key, region)


def _object_in_path(url: str, path: str, bucket: str | None) -> tuple[str, str]:
    """Bucket and percent-decoded key of an http(s) URL's path: `bucket` when the host named it
    (virtual-hosted style), else the path's first segment (path style)."""
    if bucket is not None:
        raw_key = path[1:]
    else:
        raw_bucket, _, raw_key = path[1:].partition("/")
        if not raw_bucket:
            raise _fail(url, "missing bucket name (path-style URL with an empty path)")
        bucket = _decode(url, raw_bucket, "bucket name")
    _check_bucket(url, bucket)
    if not raw_key:
        raise _fail(url, "missing object key (the URL names a bucket, not an object)")
    key = _decode(url, raw_key, "object key")
    if not key:
        raise _fail(url, "object key decodes to an empty string")
    return bucket, _check_key(url, key)


def parse_s3_url(url: str) -> S3Location:
    """Split an S3 object URL into bucket, key and (when the host names one) region.

    Accepts ``s3://bucket/key`` (key taken literally) and AWS virtual-hosted
    or path-style ``http(s)`` URLs (key percent-decoded, query and fragment
    dropped).  Raises :class:`S3UrlError` for anything else, and
    :class:`TypeError` when ``url`` is not a string.
    """
    if not isinstance(url, str):
        raise TypeError(f"S3 URL must be a str, not {type(url).__name__}")
    if not url:
        raise _fail(url, "empty string is not an S3 URL")
    scheme_match = _SCHEME_RE.match(url)
    if scheme_match is None:
        if url[0].isspace():
            raise _fail(url, "leading whitespace; expected s3://bucket/key or an https:// S3 URL")
        raise _fail(
            url,
            "not an S3 URL: no scheme (relative paths are not accepted); "
            "expected s3://bucket/key or an https:// S3 URL",
        )
    scheme = scheme_match.group()[:-1].lower()
    rest = url[scheme_match.end():]
    if scheme == "s3":
        return _parse_s3_scheme(url, rest)
    if scheme in ("http", "https"):
        return _parse_http_scheme(url, rest)
    raise _fail(url, f"unsupported scheme {scheme!r} (expected s3, http or https)")


def is_s3_url(url: object) -> bool:
    """True exactly when :func:`parse_s3_url` would accept ``url``; never raises."""
    if not isinstance(url, str):
        return False
    try:
        parse_s3_url(url)
    except S3UrlError:
        return False
    return True


# --- presigned URLs and the configured endpoint ------------------------------

def _http_scheme(url: str) -> str | None:
    match = _SCHEME_RE.match(url)
    scheme = match.group()[:-1].lower() if match else None
    return scheme if scheme in ("http", "https") else None


def is_presigned_url(url: object) -> bool:
    """True for an http(s) URL whose query carries a signature or credential (SigV4 `X-Amz-Signature`,
    `X-Amz-Credential`, ...; SigV2 `Signature`, `AWSAccessKeyId`): it is fetched with that signature, never
    with the worker's own credentials. A partial set counts too: S3 then refuses it, which says more than
    quietly reading the object with other credentials."""
    if not isinstance(url, str) or _http_scheme(url) is None:
        return False
    query = url.partition("?")[2].partition("#")[0]
    return bool({part.split("=", 1)[0].lower() for part in query.split("&")} & SIGNED_QUERY_PARAMS)


def without_query(url: str) -> str:
    """An http(s) URL without its query and fragment (how a presigned URL is named anywhere it is shown).
    Other strings unchanged: in s3:// URIs "?" and "#" are key characters."""
    if _http_scheme(url) is None:
        return url
    return url.partition("?")[0].partition("#")[0]


class _Endpoint:
    # a plain class, not a dataclass: this module is imported with the package, and @dataclass costs more than
    # the whole rest of this section
    __slots__ = ("scheme", "host", "port", "prefix")

    def __init__(self, scheme: str, host: str, port: int, prefix: str) -> None:
        # prefix: the path under which the endpoint serves S3, without the trailing "/"
        self.scheme, self.host, self.port, self.prefix = scheme, host, port, prefix

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"


def _endpoint(endpoint_url: str) -> _Endpoint | None:
    # configuration, not user input: the standard parser is fine here
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(endpoint_url.strip())
        scheme = parts.scheme.lower()
        port = parts.port or {"http": 80, "https": 443}.get(scheme)
    except ValueError:
        return None
    if scheme not in ("http", "https") or not parts.hostname or port is None:
        return None
    return _Endpoint(scheme, parts.hostname.lower(), port, parts.path.rstrip("/"))


def _on_endpoint(url: str, endpoint: _Endpoint) -> tuple[str, str, str] | None:
    """(scheme, host, tail) when `url` addresses `endpoint`'s host and port, either as the host itself (path
    style) or as BUCKET.host (virtual-hosted style); None when it addresses another host."""
    scheme = _http_scheme(url)
    if scheme is None:
        return None
    host, port, tail = _split_http(url, url[len(scheme) + 1:])
    port_number = int(port) if port else {"http": 80, "https": 443}[scheme]
    if port_number != endpoint.port or not (host == endpoint.host or host.endswith("." + endpoint.host)):
        return None
    return scheme, host, tail


def parse_endpoint_url(url: str, endpoint_url: str) -> S3Location:
    """Bucket and key of an http(s) URL of the S3-compatible endpoint `endpoint_url` (S3_ENDPOINT_URL):
    path style `ENDPOINT/bucket/key` or virtual-hosted `BUCKET.host`. The scheme, host and port must be the
    endpoint's own; any other host raises :class:`S3UrlError`, so only the configured server is ever fetched."""
    if not isinstance(url, str):
        raise TypeError(f"S3 URL must be a str, not {type(url).__name__}")
    endpoint = _endpoint(endpoint_url)
    if endpoint is None:
        raise _fail(url, f"S3_ENDPOINT_URL {_show(endpoint_url)} is not an http(s) URL")
    found = _on_endpoint(url, endpoint)
    if found is None:
        raise _fail(url, f"not a URL of S3_ENDPOINT_URL ({endpoint})")
    scheme, host, tail = found
    if scheme != endpoint.scheme:
        raise _fail(url, f"uses {scheme}:// but S3_ENDPOINT_URL is {endpoint.scheme}:// ({endpoint})")
    path = re.match(r"[^?#]*", tail).group()
    if endpoint.prefix:
        if not path.startswith(endpoint.prefix + "/"):
            raise _fail(url, f"path is not under S3_ENDPOINT_URL's path {endpoint.prefix!r}")
        path = path[len(endpoint.prefix):]
    bucket = host[: -len(endpoint.host) - 1] if host != endpoint.host else None
    bucket, key = _object_in_path(url, path, bucket)
    return S3Location(bucket, key)


def parse_object_url(url: str, endpoint_url: str | None = None) -> S3Location:
    """:func:`parse_s3_url`, plus http(s) URLs of `endpoint_url` (S3_ENDPOINT_URL) when one is configured.
    The refusal of any other host says that neither AWS nor the endpoint was matched."""
    endpoint = _endpoint(endpoint_url) if endpoint_url else None
    scheme = _http_scheme(url) if isinstance(url, str) else None
    if endpoint is not None and scheme is not None:
        if _on_endpoint(url, endpoint) is not None:
            return parse_endpoint_url(url, endpoint_url)
        host = _split_http(url, url[len(scheme) + 1:])[0]
        if _HOST_RE.fullmatch(host) is None:
            raise _fail(url, f"{_refuse_host(url, host).reason}, and not a URL of S3_ENDPOINT_URL ({endpoint})")
    return parse_s3_url(url)
