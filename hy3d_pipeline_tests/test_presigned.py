"""Presigned URLs in the seed API (issue 10, point 1): fetched with their own signature, by a worker that has no
credentials; URLs of the configured S3_ENDPOINT_URL accepted; every other host refused saying what to use;
redirects not followed; the signature nowhere in the result, the messages or any log record (urllib3's and
botocore's own DEBUG lines included); bad objects refused like any image; no temp file left.

The URLs are made by boto3's `generate_presigned_url` (SigV4 and SigV2) against the real SeaweedFS of the
`seaweed` fixture, which checks their signatures and expiry. Where SeaweedFS cannot give the answer under test
(a redirect, a body cut short, a wrong ETag, a self-signed TLS certificate) the endpoint is a tiny real HTTP
server on 127.0.0.1 (hy3d_pipeline_tests/crafted.py), configured as S3_ENDPOINT_URL so the host check passes.
"""

from __future__ import annotations

import hashlib
import logging
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import pytest

from hy3d_pipeline import generate_3d_from_image_core
from hy3d_pipeline.s3.presigned import EXPIRED
from hy3d_pipeline.s3.redact import scrub_log_text
from hy3d_pipeline.s3.urls import S3UrlError, is_presigned_url, parse_object_url, without_query
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.crafted import Crafted, self_signed

SIGV4, SIGV2 = "s3v4", "s3"


def presign(server, bucket: str, key: str, *, version: str = SIGV4, expires: int = 600) -> str:
    """What a web app hands the worker: a GET URL signed with the app's own credentials."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
                          config=Config(signature_version=version, s3={"addressing_style": "path"}))
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires)


def secrets_of(url: str) -> list[str]:
    """The signature and credential a presigned URL carries, as they appear in it and percent-decoded."""
    query = dict(part.split("=", 1) for part in url.split("?", 1)[1].split("&"))
    raw = [query[name] for name in ("X-Amz-Signature", "X-Amz-Credential", "Signature", "AWSAccessKeyId")
           if name in query]
    return raw + [unquote(v) for v in raw]


def drop_credentials(monkeypatch, tmp_path) -> None:
    """This process becomes a worker with no AWS credentials anywhere: none in the environment, no credential or
    config file, no instance metadata to ask."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def temp_files(s3_env) -> list[Path]:
    folder = s3_env["tmp"] / "cache"
    return sorted(folder.iterdir()) if folder.exists() else []


def refused(result: dict, *secrets: str) -> str:
    assert result["status"] == "error", result
    for secret in secrets:
        assert secret not in repr(result), (secret, result)
    return result["message"]


# ---- a credential-less worker ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [SIGV4, SIGV2])
def test_worker_without_credentials_generates_from_a_presigned_url(s3_env, s3, monkeypatch, version):
    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="in dir/cat.png", Body=png_bytes())
    with_credentials = generate_3d_from_image_core(f"s3://{bucket}/in dir/cat.png")
    assert with_credentials["status"] == "success", with_credentials
    url = presign(server, bucket, "in dir/cat.png", version=version)
    assert is_presigned_url(url)

    drop_credentials(monkeypatch, s3_env["tmp"])
    result = generate_3d_from_image_core(url)
    assert result["status"] == "success", result
    assert result["source"] == url.split("?")[0] == f"{server.endpoint_url}/{bucket}/in%20dir/cat.png"
    # the same object: the same mesh, on the same path, as when it was read with credentials
    assert result["model_path"] == with_credentials["model_path"] and result["faces"] == with_credentials["faces"]
    assert Path(result["model_path"]).stat().st_size > 0
    assert temp_files(s3_env) == []

    # proof that this worker really has no credentials: the same object as s3:// cannot be read
    plain = generate_3d_from_image_core(f"s3://{bucket}/in dir/cat.png")
    assert "no AWS credentials found" in refused(plain)


def test_expired_or_tampered_presigned_url_asks_for_a_new_one(s3_env, s3, monkeypatch):
    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    expiring = presign(server, bucket, "cat.png", expires=1)
    good = presign(server, bucket, "cat.png")
    signature = good.rsplit("X-Amz-Signature=", 1)[1]
    tampered = good.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    for _ in range(100):  # wait until SeaweedFS itself says the first one has expired (1 s, at second precision)
        try:
            urllib.request.urlopen(expiring, timeout=5).close()
        except urllib.error.HTTPError as exc:
            assert exc.code == 403
            break
        time.sleep(0.2)
    drop_credentials(monkeypatch, s3_env["tmp"])
    for url in (expiring, tampered):
        result = generate_3d_from_image_core(url)
        message = refused(result, *secrets_of(url), *secrets_of(good))
        assert EXPIRED in message and f"s3://{bucket}/cat.png" in message, message
        assert result["source"] == without_query(url)
    assert temp_files(s3_env) == []


# ---- the configured endpoint, and every other host -------------------------------------------------------------

def test_endpoint_url_without_signature_is_read_with_credentials_like_s3(s3_env, s3, monkeypatch):
    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="a b/dog.png", Body=png_bytes(shape="box"))
    url = f"{server.endpoint_url}/{bucket}/a%20b/dog.png"
    result = generate_3d_from_image_core(url)
    assert result["status"] == "success", result
    assert result["source"] == url
    assert result["model_path"] == generate_3d_from_image_core(f"s3://{bucket}/a b/dog.png")["model_path"]
    assert temp_files(s3_env) == []

    drop_credentials(monkeypatch, s3_env["tmp"])  # read as s3:// would be: with this worker's credentials
    assert f"no AWS credentials found to read s3://{bucket}/a b/dog.png" in refused(generate_3d_from_image_core(url))


def test_other_hosts_are_refused_naming_the_accepted_forms(s3_env):
    endpoint = s3_env["server"].endpoint_url
    with Crafted(lambda m, p: (200, png_bytes())) as other:  # a live server that must never be asked
        cases = [
            f"{other.url()}/{s3_env['bucket']}/cat.png?X-Amz-Signature=feedfacecafebeef0123&X-Amz-Credential=AKIDX",
            "https://images.example.com/cat.png?Signature=feedfacecafebeef0123&AWSAccessKeyId=AKIDEXAMPLE99",
            endpoint.replace("http://", "https://") + f"/{s3_env['bucket']}/cat.png",
            "https://bucket.s3.amazonaws.com.evil.com/cat.png",
            "http://169.254.169.254/latest/meta-data/",
        ]
        for url in cases:
            message = refused(generate_3d_from_image_core(url), "feedfacecafebeef0123", "AKIDEXAMPLE99")
            assert "neither a local path nor an S3 URL" in message, message
            for form in ("s3://BUCKET/KEY", "https://BUCKET.s3.REGION.amazonaws.com/KEY", f"{endpoint}/BUCKET/KEY",
                         "presigned"):
                assert form in message, (form, message)
        assert other.requests == []
    assert temp_files(s3_env) == []


def test_redirect_to_another_host_is_not_followed(s3_env, monkeypatch):
    with Crafted(lambda m, p: (200, png_bytes())) as elsewhere:
        target = f"{elsewhere.url()}/b-stolen/cat.png?X-Amz-Signature=0123456789abcdef0123"

        def redirect(method, path):
            to = target if "away" in path else f"/{s3_env['bucket']}/again.png?X-Amz-Signature=0123456789abcdef0123"
            return 307, b"", {"Location": to}

        with Crafted(redirect) as endpoint:
            monkeypatch.setenv("S3_ENDPOINT_URL", endpoint.url())
            for key, shown in (("away.png", elsewhere.url()), ("same-host.png", f"redirect to {endpoint.url()}")):
                url = f"{endpoint.url()}/{s3_env['bucket']}/{key}?X-Amz-Signature=0123456789abcdef0123"
                message = refused(generate_3d_from_image_core(url), "0123456789abcdef0123")
                assert "307" in message and "not followed" in message and shown in message, message
                assert f"s3://{s3_env['bucket']}/{key}" in message
            assert len(endpoint.requests) == 2  # one GET each, never a second one
        assert elsewhere.requests == []
    assert temp_files(s3_env) == []


# ---- nothing secret anywhere -----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [SIGV4, SIGV2])
def test_signature_is_in_no_log_record_and_not_in_the_result(s3_env, s3, monkeypatch, caplog, version):
    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    good = presign(server, bucket, "cat.png", version=version)
    missing = presign(server, bucket, "missing.png", version=version)
    secrets = secrets_of(good) + secrets_of(missing) + [server.access_key, server.secret_key]
    drop_credentials(monkeypatch, s3_env["tmp"])  # nothing left for the env-based redaction to know about
    caplog.set_level(logging.DEBUG)
    for name in ("urllib3", "botocore", "boto3", "hy3d_pipeline"):
        caplog.set_level(logging.DEBUG, logger=name)

    result = generate_3d_from_image_core(good)
    assert result["status"] == "success", result
    failed = generate_3d_from_image_core(missing)
    assert f"object not found: s3://{bucket}/missing.png" in refused(failed)

    http_lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3.")]
    # the HTTP library did log both requests, and at DEBUG: what must be scrubbed was really captured
    assert any(f"/{bucket}/cat.png" in line for line in http_lines), http_lines
    assert any(f"/{bucket}/missing.png" in line for line in http_lines), http_lines
    texts = [caplog.text, repr(result), repr(failed)]
    texts += [r.getMessage() + str(r.exc_text or "") for r in caplog.records]
    for text in texts:
        for secret in secrets:
            assert secret not in text, (secret, text)


def test_generate_command_prints_no_signature(s3_env, s3, monkeypatch, capsys):
    from hy3d_pipeline.cli import main

    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="cat.png", Body=png_bytes())
    url = presign(server, bucket, "cat.png")
    drop_credentials(monkeypatch, s3_env["tmp"])
    assert main(["generate", url, "--format", "stl", "--out", str(s3_env["tmp"] / "cli")]) == 0
    printed = capsys.readouterr()
    assert f'"source": "{without_query(url)}"' in printed.out
    for secret in secrets_of(url):
        assert secret not in printed.out + printed.err


def test_library_log_scrubbing_covers_signing_details_outside_urls():
    canonical = ("GET\n/b/k\nX-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDLEAK1234%2F20260101"
                 "&X-Amz-Signature=abcdef0123456789\nhost:s3")
    clean = scrub_log_text(canonical + "\nSignature:\n" + "ab" * 32)
    assert "AKIDLEAK1234" not in clean and "abcdef0123456789" not in clean and "ab" * 32 not in clean
    assert "/b/k" in clean  # the rest of the line stays readable


def test_listing_leaves_no_signature_in_debug_logs(s3_env, s3, storage, caplog):
    """The sensor's fast listing sends presigned URLs through urllib3 too; its DEBUG lines are scrubbed."""
    s3.put_object(Bucket=storage.images_bucket, Key="x.png", Body=b"x")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    assert [k for page in storage.list_keys(storage.images_bucket) for k, _, _ in page] == ["x.png"]
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("urllib3.")]
    assert any(f"/{storage.images_bucket}" in line for line in lines), lines
    assert not any("X-Amz-Signature=" in line and "X-Amz-Signature=<redacted>" not in line for line in lines)


# ---- the object itself: checked like any other -----------------------------------------------------------------

def test_non_image_and_oversized_presigned_objects_are_refused_like_any_image(s3_env, s3, monkeypatch):
    bucket, server = s3_env["bucket"], s3_env["server"]
    s3.put_object(Bucket=bucket, Key="notes.png", Body=b"just some text, not a picture")
    s3.put_object(Bucket=bucket, Key="big.png", Body=png_bytes(size=(96, 96)))
    notes, big = presign(server, bucket, "notes.png"), presign(server, bucket, "big.png")
    drop_credentials(monkeypatch, s3_env["tmp"])
    monkeypatch.setenv("HY3D_MAX_IMAGE_PIXELS", "5000")  # 96 x 96 = 9216 pixels
    message = refused(generate_3d_from_image_core(notes), *secrets_of(notes))
    assert f"s3://{bucket}/notes.png" in message and "not a supported image" in message, message
    message = refused(generate_3d_from_image_core(big), *secrets_of(big))
    assert f"s3://{bucket}/big.png" in message and "decompression bomb refused" in message, message
    assert temp_files(s3_env) == []


def test_cut_short_or_corrupted_answers_leave_no_temp_file(s3_env, monkeypatch):
    body = png_bytes()
    answers = {
        "short.png": (200, body[:40], {"Content-Type": "image/png", "Content-Length": str(len(body))}),
        "corrupt.png": (200, body, {"ETag": f'"{hashlib.md5(b"other bytes").hexdigest()}"'}),
        "gone.png": (404, b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"),
        "busy.png": (503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"),
        "no-bucket.png": (404, b"<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist"
                               b"</Message></Error>"),
    }
    with Crafted(lambda m, p: answers[p.split("?")[0].rsplit("/", 1)[1]]) as endpoint:
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint.url())
        drop_credentials(monkeypatch, s3_env["tmp"])
        expected = {"short.png": "cut off", "corrupt.png": "does not match its ETag", "gone.png": "object not found",
                    "busy.png": "unavailable", "no-bucket.png": "bucket 'b-crafted' does not exist"}
        for key, words in expected.items():
            url = f"{endpoint.url()}/b-crafted/{key}?X-Amz-Signature=5ec2e75ec2e75ec2e7&X-Amz-Credential=AKIDCRAFTED"
            message = refused(generate_3d_from_image_core(url), "5ec2e75ec2e75ec2e7", "AKIDCRAFTED")
            assert words in message and f"s3://b-crafted/{key}" in message, message
    assert temp_files(s3_env) == []


def test_unreachable_or_silent_endpoint_fails_within_the_download_timeout(s3_env, monkeypatch):
    import threading

    from hy3d_pipeline_tests.crafted import closed_port

    drop_credentials(monkeypatch, s3_env["tmp"])
    query = "?X-Amz-Signature=0ff11e0ff11e0ff11e&X-Amz-Credential=AKIDQUIET"
    down = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("S3_ENDPOINT_URL", down)
    message = refused(generate_3d_from_image_core(f"{down}/b-quiet/cat.png{query}"), "0ff11e0ff11e0ff11e")
    assert "cannot reach" in message and "s3://b-quiet/cat.png" in message, message

    release = threading.Event()

    def silent(method, path):  # answers only once the test is over: the client must give up first
        release.wait(30)
        return 200, png_bytes()

    with Crafted(silent) as srv:
        monkeypatch.setenv("S3_ENDPOINT_URL", srv.url())
        monkeypatch.setenv("S3_DOWNLOAD_TIMEOUT", "1")
        try:
            message = refused(generate_3d_from_image_core(f"{srv.url()}/b-quiet/cat.png{query}"), "0ff11e0ff11e0ff11e")
        finally:
            release.set()
    assert "timed out" in message and "S3_DOWNLOAD_TIMEOUT" in message and "s3://b-quiet/cat.png" in message, message
    assert temp_files(s3_env) == []


def test_presigned_fetch_goes_through_the_proxy_env(s3_env, monkeypatch):
    """The endpoint is a closed port: only a request sent through the proxy can be answered."""
    from hy3d_pipeline_tests.crafted import closed_port

    body = png_bytes()
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with Crafted(lambda m, p: (200, body, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        for name in ("NO_PROXY", "no_proxy", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        drop_credentials(monkeypatch, s3_env["tmp"])
        url = f"{endpoint}/b-proxied/cat.png?X-Amz-Signature=9a0c9a0c9a0c9a0c9a&X-Amz-Credential=AKIDPROXY"
        result = generate_3d_from_image_core(url)
        assert result["status"] == "success", result
        assert [path for _, path in proxy.requests] == [url]  # the signed URL, sent as given, to the proxy
    assert temp_files(s3_env) == []


def test_tls_is_verified_for_presigned_urls(s3_env, monkeypatch, tmp_path):
    cert, key = self_signed(tmp_path)
    body = png_bytes()
    with Crafted(lambda m, p: (200, body, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}), tls=(cert, key)) as srv:
        monkeypatch.setenv("S3_ENDPOINT_URL", srv.url("https"))
        drop_credentials(monkeypatch, s3_env["tmp"])
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
        url = f"{srv.url('https')}/b-tls/cat.png?X-Amz-Signature=7157715771577157&X-Amz-Credential=AKIDTLS"
        message = refused(generate_3d_from_image_core(url), "7157715771577157")
        assert "TLS verification failed" in message and "s3://b-tls/cat.png" in message, message
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        result = generate_3d_from_image_core(url)
        assert result["status"] == "success", result
    assert temp_files(s3_env) == []


# ---- recognising the forms --------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, presigned", [
    ("https://b.s3.amazonaws.com/k.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=A%2Fx&X-Amz-Signature=f", True),
    ("https://b.s3.amazonaws.com/k.png?AWSAccessKeyId=AKID&Signature=abc%3D&Expires=1700000000", True),
    ("https://b.s3.amazonaws.com/k.png?x-amz-security-token=tok", True),
    ("https://b.s3.amazonaws.com/k.png?versionId=3", False),
    ("https://b.s3.amazonaws.com/k.png", False),
    ("s3://b/k.png?X-Amz-Signature=f", False),  # in s3:// URIs "?" belongs to the key
])
def test_presigned_urls_are_recognised_by_their_query(url, presigned):
    assert is_presigned_url(url) is presigned


@pytest.mark.parametrize("url, endpoint, expected", [
    ("http://127.0.0.1:8333/b-1/a%20b/c.png?X-Amz-Signature=f", "http://127.0.0.1:8333", ("b-1", "a b/c.png")),
    ("https://minio.example.com/b-1/c.png", "https://MINIO.example.com:443/", ("b-1", "c.png")),
    ("https://b-1.minio.example.com/c.png", "https://minio.example.com", ("b-1", "c.png")),
    ("https://store.example.com/s3/b-1/c.png", "https://store.example.com/s3", ("b-1", "c.png")),
    ("https://b-1.s3.eu-west-1.amazonaws.com/c.png", "http://127.0.0.1:8333", ("b-1", "c.png")),
])
def test_urls_of_the_configured_endpoint_parse(url, endpoint, expected):
    location = parse_object_url(url, endpoint)
    assert (location.bucket, location.key) == expected


@pytest.mark.parametrize("url, endpoint, reason", [
    ("http://127.0.0.1:8334/b-1/c.png", "http://127.0.0.1:8333", "not a URL of S3_ENDPOINT_URL"),
    ("https://127.0.0.1:8333/b-1/c.png", "http://127.0.0.1:8333", "S3_ENDPOINT_URL is http://"),
    ("https://minio.example.com.evil.com/b-1/c.png", "https://minio.example.com", "not a URL of S3_ENDPOINT_URL"),
    ("https://u@minio.example.com/b-1/c.png", "https://minio.example.com", "userinfo"),
    ("https://store.example.com/other/b-1/c.png", "https://store.example.com/s3", "not under S3_ENDPOINT_URL's path"),
    ("http://127.0.0.1:8333/b-1/", "http://127.0.0.1:8333", "missing object key"),
    ("http://127.0.0.1:8333/c.png", None, "IP address hosts are not S3 endpoints"),
])
def test_other_urls_do_not_parse_as_the_endpoint(url, endpoint, reason):
    with pytest.raises(S3UrlError) as err:
        parse_object_url(url, endpoint)
    assert reason in err.value.reason, err.value.reason
