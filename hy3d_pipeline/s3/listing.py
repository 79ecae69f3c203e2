"""Fast bucket listing for the sensor.

Listing a large bucket through boto3 costs about 80 µs per key, nearly all of it botocore building dicts from
the XML. The sensor lists the whole prefix every tick, so that cost is its tick time. Here each ListObjectsV2
page is requested with a presigned URL (the same credentials, signature and endpoint as the client) and only
the fields the sensor needs are cut out of the XML with regular expressions. Any non-200 answer, and any
failure to get one, is replayed through boto3 so the error is the ordinary, translated one (and a blip that
boto3's retries ride over costs one slow page, not the listing).

The request goes through the client's own botocore HTTP session, not a pool of ours: that is what makes the
TLS `verify` setting, AWS_CA_BUNDLE, botocore's `proxies` config and HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply
exactly as they do to every other request the client makes.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from urllib.parse import unquote_plus

from hy3d_pipeline.s3.errors import S3AccessError
from hy3d_pipeline.s3.redact import scrub_library_logs

_CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.S)
_KEY = re.compile(r"<Key>([^<]*)</Key>")
_ETAG = re.compile(r"<ETag>([^<]*)</ETag>")
_SIZE = re.compile(r"<Size>(\d+)</Size>")
_TRUNCATED = re.compile(r"<IsTruncated>true</IsTruncated>")
_TOKEN = re.compile(r"<NextContinuationToken>([^<]*)</NextContinuationToken>")

pages_requested = 0  # process-wide count of listing requests, for benchmarks


class TruncatedWithoutToken(ValueError):
    pass


def parse_page(xml: str) -> tuple[list[tuple[str, str, int]], str | None]:
    """([(key, etag, size)], continuation token or None) of one url-encoded ListObjectsV2 page.

    Raises TruncatedWithoutToken for a page that says more follows but not where: ending the listing there
    would make every key after it look deleted."""
    items = []
    for block in _CONTENTS.findall(xml):
        key = unquote_plus(html.unescape(_KEY.search(block).group(1)))
        etag = _ETAG.search(block)
        size = _SIZE.search(block)
        items.append((key, html.unescape(etag.group(1)).strip('"') if etag else "", int(size.group(1)) if size else 0))
    token = None
    if _TRUNCATED.search(xml):
        match = _TOKEN.search(xml)
        token = html.unescape(match.group(1)) if match else None
        if not token:
            raise TruncatedWithoutToken("IsTruncated=true without a NextContinuationToken")
    return items, token


def http_session(client):
    """The client's own botocore HTTP session (its verify, CA bundle and proxy settings). botocore's one private
    API that we use (`client._endpoint.http_session`, unchanged since botocore 1.11); botocore has no public way
    to send a prepared request through a client. test_s3_resource.py checks it, since `list_pages` falls back to
    boto3 (slow, not wrong) when it fails."""
    return client._endpoint.http_session


def _send(client, url: str) -> tuple[int, bytes]:
    from botocore.awsrequest import AWSPreparedRequest

    response = http_session(client).send(AWSPreparedRequest("GET", url, {}, None, False))
    return response.status_code, response.content


def _boto_page(client, params: dict) -> tuple[list[tuple[str, str, int]], str | None]:
    """The same page through boto3 (which raises the proper ClientError for the caller to translate)."""
    r = client.list_objects_v2(**params)
    items = [(unquote_plus(o["Key"]), o.get("ETag", "").strip('"'), int(o.get("Size", 0))) for o in r.get("Contents", [])]
    token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
    if r.get("IsTruncated") and not token:
        raise TruncatedWithoutToken("IsTruncated=true without a NextContinuationToken")
    return items, token


def list_pages(client, bucket: str, prefix: str = "", start_after: str = "", timeout: float = 60.0,
               page_size: int = 1000) -> Iterator[list[tuple[str, str, int]]]:
    """Pages of (key, etag, size) under `prefix` in key order, resuming after `start_after`.

    `timeout` is kept for callers; the client's own connect/read timeouts apply (ImageStorage sets them)."""
    scrub_library_logs()  # urllib3 logs each page's signed URL at DEBUG
    params = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size, "EncodingType": "url"}
    if start_after:
        params["StartAfter"] = start_after
    while True:
        global pages_requested
        url = client.generate_presigned_url("list_objects_v2", Params=params, ExpiresIn=900)
        pages_requested += 1
        try:
            try:
                status, body = _send(client, url)
            except Exception:  # noqa: BLE001 - the exception names the signed URL; boto3's own names none
                status, body = 0, b""
            if status == 200:
                items, token = parse_page(body.decode("utf-8"))
            else:
                items, token = _boto_page(client, params)
        except TruncatedWithoutToken as exc:
            raise S3AccessError(
                f"listing of s3://{bucket}/{prefix} stopped early: the endpoint said more keys follow but gave no "
                "continuation token, so the rest of the bucket cannot be listed (nothing is treated as deleted); "
                "check S3_ENDPOINT_URL's S3 compatibility (ListObjectsV2)", code="TruncatedListing",
            ) from exc
        yield items
        if not token:
            return
        params["ContinuationToken"] = token
        params.pop("StartAfter", None)
