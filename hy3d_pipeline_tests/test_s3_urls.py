"""Tests for hy3d_pipeline.s3.urls: what counts as an S3 object URL and what does not.

The refusal table matters as much as the acceptance table: these URLs are
fetched with real credentials, so every look-alike must stay refused.
"""

from __future__ import annotations

import ast
import pickle
import random
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from hy3d_pipeline.s3.redact import redact
from hy3d_pipeline.s3 import urls
from hy3d_pipeline.s3.urls import (
    S3Location,
    S3UrlError,
    is_s3_url,
    parse_s3_url,
    validate_bucket_name,
)

SIG = (
    "X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-west-2%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=" + "ab12" * 16
)

# (url, bucket, key, region)
ACCEPTED = [
    # --- s3:// : key literal, never decoded, ? and # are key characters
    ("s3://bucket/key", "bucket", "key", None),
    ("s3://my-bucket/images/cat.png", "my-bucket", "images/cat.png", None),
    ("S3://bucket/key", "bucket", "key", None),
    ("s3://my.dotted.bucket/a/b.jpg", "my.dotted.bucket", "a/b.jpg", None),
    ("s3://bucket/with space.png", "bucket", "with space.png", None),
    ("s3://bucket/a?b=c", "bucket", "a?b=c", None),
    ("s3://bucket/a#frag", "bucket", "a#frag", None),
    ("s3://bucket/100%25.png", "bucket", "100%25.png", None),
    ("s3://bucket/a%20b", "bucket", "a%20b", None),
    ("s3://bucket/a+b", "bucket", "a+b", None),
    ("s3://bucket/日本語/画像.png", "bucket", "日本語/画像.png", None),
    ("s3://bucket//leading-slash", "bucket", "/leading-slash", None),
    ("s3://bucket/dir/", "bucket", "dir/", None),
    ("s3://bucket/a@b.png", "bucket", "a@b.png", None),
    ("s3://abc/k", "abc", "k", None),
    ("s3://" + "a" * 63 + "/k", "a" * 63, "k", None),
    ("s3://bucket/" + "k" * 1024, "bucket", "k" * 1024, None),
    # --- virtual-hosted
    ("https://bucket.s3.amazonaws.com/key", "bucket", "key", None),
    ("http://bucket.s3.amazonaws.com/key", "bucket", "key", None),
    ("https://bucket.s3.us-west-2.amazonaws.com/a/b.png", "bucket", "a/b.png", "us-west-2"),
    ("https://bucket.s3-us-west-2.amazonaws.com/key", "bucket", "key", "us-west-2"),
    ("https://bucket.s3-external-1.amazonaws.com/key", "bucket", "key", "us-east-1"),
    ("https://bucket.s3.dualstack.eu-central-1.amazonaws.com/key", "bucket", "key", "eu-central-1"),
    ("https://bucket.s3-fips.us-gov-west-1.amazonaws.com/key", "bucket", "key", "us-gov-west-1"),
    ("https://bucket.s3-fips.dualstack.us-east-1.amazonaws.com/key", "bucket", "key", "us-east-1"),
    ("https://bucket.s3-accelerate.amazonaws.com/key", "bucket", "key", None),
    ("https://bucket.s3-accelerate.dualstack.amazonaws.com/key", "bucket", "key", None),
    ("https://bucket.s3.cn-north-1.amazonaws.com.cn/key", "bucket", "key", "cn-north-1"),
    ("https://bucket.s3.cn-northwest-1.amazonaws.com.cn/key", "bucket", "key", "cn-northwest-1"),
    ("https://bucket.s3.dualstack.cn-north-1.amazonaws.com.cn/k", "bucket", "k", "cn-north-1"),
    ("https://my.bucket.name.s3.us-west-2.amazonaws.com/key", "my.bucket.name", "key", "us-west-2"),
    ("https://my.bucket.name.s3.amazonaws.com/key", "my.bucket.name", "key", None),
    ("https://my.bucket.s3-eu-west-1.amazonaws.com/key", "my.bucket", "key", "eu-west-1"),
    ("https://a.s3.b.s3.us-east-2.amazonaws.com/key", "a.s3.b", "key", "us-east-2"),
    ("https://s3x.s3.amazonaws.com/key", "s3x", "key", None),
    ("https://s3.dualstack.s3.amazonaws.com/key", "s3.dualstack", "key", None),
    ("https://dualstack.s3.amazonaws.com/key", "dualstack", "key", None),
    ("https://BUCKET.S3.US-WEST-2.AMAZONAWS.COM/Key.PNG", "bucket", "Key.PNG", "us-west-2"),
    ("HTTPS://bucket.s3.amazonaws.com/key", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com:443/key", "bucket", "key", None),
    ("http://bucket.s3.amazonaws.com:80/key", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com//key", "bucket", "/key", None),
    ("https://bucket.s3.amazonaws.com/dir/", "bucket", "dir/", None),
    ("https://bucket.s3.amazonaws.com/a@b.png", "bucket", "a@b.png", None),
    # percent-decoding for http(s); "+" stays "+"
    ("https://bucket.s3.amazonaws.com/with%20space.png", "bucket", "with space.png", None),
    ("https://bucket.s3.amazonaws.com/a+b.png", "bucket", "a+b.png", None),
    ("https://bucket.s3.amazonaws.com/a%2Bb", "bucket", "a+b", None),
    ("https://bucket.s3.amazonaws.com/a%2Fb%2Fc.png", "bucket", "a/b/c.png", None),
    ("https://bucket.s3.amazonaws.com/a%2fb", "bucket", "a/b", None),
    ("https://bucket.s3.amazonaws.com/100%25.png", "bucket", "100%.png", None),
    ("https://bucket.s3.amazonaws.com/q%3Fx%23y", "bucket", "q?x#y", None),
    (
        "https://bucket.s3.amazonaws.com/%E6%97%A5%E6%9C%AC/%E7%94%BB%E5%83%8F.png",
        "bucket",
        "日本/画像.png",
        None,
    ),
    ("https://bucket.s3.amazonaws.com/caf%C3%A9.jpg", "bucket", "café.jpg", None),
    ("https://bucket.s3.amazonaws.com/café.jpg", "bucket", "café.jpg", None),
    ("https://bucket.s3.amazonaws.com/raw space.png", "bucket", "raw space.png", None),
    # query and fragment never become part of the key
    (f"https://bucket.s3.us-west-2.amazonaws.com/img/cat.png?{SIG}", "bucket", "img/cat.png", "us-west-2"),
    (f"https://bucket.s3.amazonaws.com/a%20b.png?{SIG}", "bucket", "a b.png", None),
    ("https://bucket.s3.amazonaws.com/key?versionId=3HL4kqtJlcpXroDTDmJ", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com/key#section", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com/key?", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com/key#frag?x=1", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com/key?a=b#c", "bucket", "key", None),
    ("https://bucket.s3.amazonaws.com/key?next=https://evil.com/x@y", "bucket", "key", None),
    # --- path-style
    ("https://s3.amazonaws.com/bucket/key", "bucket", "key", None),
    ("http://s3.amazonaws.com/bucket/key", "bucket", "key", None),
    ("https://s3.us-west-2.amazonaws.com/bucket/a/b.png", "bucket", "a/b.png", "us-west-2"),
    ("https://s3-us-west-2.amazonaws.com/bucket/key", "bucket", "key", "us-west-2"),
    ("https://s3-external-1.amazonaws.com/bucket/key", "bucket", "key", "us-east-1"),
    ("https://s3.dualstack.ap-southeast-2.amazonaws.com/bucket/key", "bucket", "key", "ap-southeast-2"),
    ("https://s3.cn-north-1.amazonaws.com.cn/bucket/key", "bucket", "key", "cn-north-1"),
    ("https://s3.us-west-2.amazonaws.com/my.bucket.name/key", "my.bucket.name", "key", "us-west-2"),
    ("https://s3.amazonaws.com/my.bucket.name/k", "my.bucket.name", "k", None),
    ("https://S3.AMAZONAWS.COM/bucket/Key", "bucket", "Key", None),
    ("https://s3.amazonaws.com:443/bucket/key", "bucket", "key", None),
    ("https://s3.amazonaws.com/bucket/a%2Fb.png", "bucket", "a/b.png", None),
    ("https://s3.amazonaws.com/bucket/%E6%97%A5.png", "bucket", "日.png", None),
    ("https://s3.amazonaws.com/bucket//key", "bucket", "/key", None),
    (f"https://s3.eu-west-1.amazonaws.com/bucket/dir/x.png?{SIG}", "bucket", "dir/x.png", "eu-west-1"),
    ("https://s3.amazonaws.com/bucket/key#frag", "bucket", "key", None),
]

# (url, fragment that must appear in the message, case-insensitive)
REFUSED = [
    # not URLs / wrong scheme
    ("", "empty"),
    ("bucket/key", "no scheme"),
    ("/bucket/key", "no scheme"),
    ("./images/cat.png", "no scheme"),
    ("images/cat.png", "no scheme"),
    (" s3://bucket/key", "leading whitespace"),
    ("file:///etc/passwd", "unsupported scheme 'file'"),
    ("ftp://bucket.s3.amazonaws.com/key", "unsupported scheme 'ftp'"),
    ("s3a://bucket/key", "unsupported scheme 's3a'"),
    ("gs://bucket/key", "unsupported scheme"),
    ("C:\\images\\cat.png", "unsupported scheme"),
    ("javascript:alert(1)", "unsupported scheme"),
    ("s3:bucket/key", "s3://bucket/key"),
    ("s3:/bucket/key", "s3://bucket/key"),
    ("https:bucket.s3.amazonaws.com/key", "'//'"),
    ("https:/bucket.s3.amazonaws.com/key", "'//'"),
    # missing bucket / key
    ("s3://", "missing bucket"),
    ("s3:///key", "missing bucket"),
    ("s3://bucket", "missing object key"),
    ("s3://bucket/", "missing object key"),
    ("https://s3.amazonaws.com/", "missing bucket"),
    ("https://s3.amazonaws.com", "missing bucket"),
    ("https://s3.amazonaws.com//key", "missing bucket"),
    ("https://s3.us-west-2.amazonaws.com/?list-type=2", "missing bucket"),
    ("https://s3.amazonaws.com/bucket", "missing object key"),
    ("https://s3.amazonaws.com/bucket/", "missing object key"),
    ("https://s3.amazonaws.com/bucket/?prefix=x", "missing object key"),
    ("https://bucket.s3.amazonaws.com", "missing object key"),
    ("https://bucket.s3.amazonaws.com/", "missing object key"),
    ("https://bucket.s3.amazonaws.com/?versionId=1", "missing object key"),
    ("https://bucket.s3.amazonaws.com/#frag", "missing object key"),
    (f"https://bucket.s3.amazonaws.com/?{SIG}", "missing object key"),
    ("https:///bucket/key", "missing host"),
    ("https://", "missing host"),
    # look-alike hosts
    ("https://bucket.s3.amazonaws.com.evil.com/key", "look-alike"),
    ("https://s3.amazonaws.com.evil.com/bucket/key", "look-alike"),
    ("https://evil-amazonaws.com/bucket/key", "look-alike"),
    ("https://bucket.evil-amazonaws.com/key", "look-alike"),
    ("https://bucket.s3.amazonaws.co/key", "look-alike"),
    ("https://bucket.s3.amazonaws.com.cn.evil.com/key", "look-alike"),
    ("https://bucket.s4.amazonaws.com/key", "look-alike"),
    ("https://bucket.amazonaws.com/key", "look-alike"),
    ("https://amazonaws.com/bucket/key", "look-alike"),
    ("https://bucket.s3.amazonaws.com./key", "look-alike"),
    ("https://bucket.s3.dualstack.amazonaws.com/key", "look-alike"),
    ("https://bucket.s3.us-west-2.amazonaws.com.attacker.net/key", "look-alike"),
    ("https://bucket.s3-website-us-east-1.amazonaws.com/key", "look-alike"),
    ("https://ap-111122223333.s3-accesspoint.us-west-2.amazonaws.com/key", "look-alike"),
    ("https://example.com/bucket/key", "not an AWS S3 endpoint"),
    ("https://storage.googleapis.com/bucket/key", "not an AWS S3 endpoint"),
    ("https://bucket.s3amazonaws.com/key", "look-alike"),
    # partition mismatches
    ("https://bucket.s3.amazonaws.com.cn/key", "china"),
    ("https://s3.us-east-1.amazonaws.com.cn/bucket/key", "china"),
    ("https://bucket.s3.cn-north-1.amazonaws.com/key", "amazonaws.com.cn"),
    # accelerate restrictions
    ("https://s3-accelerate.amazonaws.com/bucket/key", "transfer acceleration"),
    ("https://my.bucket.s3-accelerate.amazonaws.com/key", "transfer acceleration"),
    # userinfo
    ("https://bucket.s3.amazonaws.com@evil.com/x", "userinfo"),
    ("https://user:pass@bucket.s3.amazonaws.com/key", "userinfo"),
    ("https://@bucket.s3.amazonaws.com/key", "userinfo"),
    ("https://evil.com@s3.amazonaws.com/bucket/key", "userinfo"),
    ("s3://user@bucket/key", "userinfo"),
    # IP / metadata / localhost
    ("http://169.254.169.254/latest/meta-data/", "ip address"),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", "ip address"),
    ("http://[fd00:ec2::254]/", "ipv6"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "ipv6"),
    ("http://[::1]:9000/bucket/key", "ipv6"),
    ("http://127.0.0.1:9000/bucket/key", "ip address"),
    ("http://2130706433/bucket/key", "ip address"),
    ("http://0x7f.1/bucket/key", "ip address"),
    ("http://localhost/bucket/key", "localhost"),
    ("http://localhost:4566/bucket/key", "localhost"),
    ("http://bucket.localhost/key", "localhost"),
    ("http://metadata.google.internal/computeMetadata/v1/", "not an AWS S3 endpoint"),
    # whitespace / control / odd characters in the host
    ("https://bucket .s3.amazonaws.com/key", "whitespace"),
    ("https://bucket.s3.amazonaws.com\t/key", "control"),
    ("https://bucket.s3.amaz\nonaws.com/key", "control"),
    ("https://bucket.s3.amazonaws.com/ke\ny", "control"),
    ("https://bucket.s3.amazonaws.com/key\x00", "control"),
    ("s3://buck et/key", "whitespace"),
    ("s3://bucket\n/key", "whitespace"),
    ("https://bücket.s3.amazonaws.com/key", "non-ascii"),
    ("https://bucket.s3.amazonaws.com\\@evil.com/key", "userinfo"),
    ("https://evil.com\\.s3.amazonaws.com/key", "invalid character '\\\\'"),
    ("https://bucket_x.s3.amazonaws.com/key", "invalid character '_'"),
    ("https://bucket%2es3.amazonaws.com/key", "invalid character '%'"),
    ("https://bucket.s3.amazonaws.com:abc/key", "invalid port"),
    ("https://bucket.s3.amazonaws.com:/key", "invalid port"),
    ("https://bucket.s3.amazonaws.com:99999/key", "invalid port"),
    ("https://bucket.s3.amazonaws.com:0/key", "invalid port"),
    ("https://bucket.s3.amazonaws.com:443:443/key", "invalid port"),
    ("https://" + "a" * 300 + ".s3.amazonaws.com/key", "longer than 253"),
    # bucket naming rules, through every URL form
    ("s3://ab/key", "between 3 and 63"),
    ("s3://" + "a" * 64 + "/key", "between 3 and 63"),
    ("s3://MyBucket/key", "uppercase"),
    ("https://s3.amazonaws.com/MyBucket/key", "uppercase"),
    ("s3://my_bucket/key", "only lowercase letters"),
    ("s3://bucket:443/key", "only lowercase letters"),
    ("s3://-bucket/key", "begin and end"),
    ("s3://bucket-/key", "begin and end"),
    ("s3://bucket./key", "begin and end"),
    ("https://bucket..s3.amazonaws.com/key", "begin and end"),
    ("s3://my..bucket/key", "adjacent periods"),
    ("https://my..bucket.s3.amazonaws.com/key", "adjacent periods"),
    ("https://s3.amazonaws.com/my..bucket/key", "adjacent periods"),
    ("s3://192.168.5.4/key", "ip address"),
    ("https://s3.amazonaws.com/192.168.5.4/key", "ip address"),
    ("https://192.168.5.4.s3.amazonaws.com/key", "ip address"),
    ("s3://xn--bucket/key", "'xn--'"),
    ("https://xn--bcket-kva.s3.amazonaws.com/key", "'xn--'"),
    ("s3://sthree-bucket/key", "'sthree-'"),
    ("s3://sthree-configurator/key", "'sthree-'"),
    ("s3://amzn-s3-demo-bucket/key", "'amzn-s3-demo-'"),
    ("s3://myap-abc123-s3alias/key", "'-s3alias'"),
    ("s3://bucket--ol-s3/key", "'--ol-s3'"),
    ("s3://bucket.mrap/key", "'.mrap'"),
    ("s3://bucket--usw2-az1--x-s3/key", "'--x-s3'"),
    ("https://bucket--usw2-az1--x-s3.s3.us-west-2.amazonaws.com/key", "'--x-s3'"),
    ("s3://bucket--table-s3/key", "'--table-s3'"),
    ("s3://bucket?x/key", "only lowercase letters"),
    # keys
    ("https://bucket.s3.amazonaws.com/%", "malformed percent-escape"),
    ("https://bucket.s3.amazonaws.com/a%zzb", "malformed percent-escape"),
    ("https://bucket.s3.amazonaws.com/a%2", "malformed percent-escape"),
    ("https://bucket.s3.amazonaws.com/%FF%FE", "utf-8"),
    ("https://bucket.s3.amazonaws.com/%C3", "utf-8"),
    ("https://s3.amazonaws.com/%FF/key", "utf-8"),
    ("https://s3.amazonaws.com/bu%2Fcket/key", "only lowercase letters"),
    ("s3://bucket/" + "k" * 1025, "at most 1024"),
    ("s3://bucket/" + "é" * 513, "at most 1024"),
    ("https://bucket.s3.amazonaws.com/" + "%41" * 1025, "at most 1024"),
    ("s3://bucket/\ud800", "unicode"),
]


def _id(value: str) -> str:
    return ascii(value)[:80]


@pytest.mark.parametrize(
    ("url", "bucket", "key", "region"), ACCEPTED, ids=[_id(row[0]) for row in ACCEPTED]
)
def test_accepted(url: str, bucket: str, key: str, region: str | None) -> None:
    loc = parse_s3_url(url)
    assert loc == S3Location(bucket, key, region)
    assert is_s3_url(url) is True


@pytest.mark.parametrize(("url", "fragment"), REFUSED, ids=[_id(row[0]) for row in REFUSED])
def test_refused(url: str, fragment: str) -> None:
    with pytest.raises(S3UrlError) as info:
        parse_s3_url(url)
    message = str(info.value)
    assert fragment.lower() in message.lower(), message
    shown = redact(url)  # the input is named, but never a signature it carries
    shown = repr(shown) if len(shown) <= 200 else repr(shown[:200])
    assert shown in message, message
    assert "X-Amz-Signature" not in message and "AKIAIOSFODNN7EXAMPLE" not in message, message
    assert info.value.url == url
    assert info.value.reason and info.value.reason in message
    assert is_s3_url(url) is False


def test_tables_have_no_overlap() -> None:
    accepted = {row[0] for row in ACCEPTED}
    refused = [row[0] for row in REFUSED]
    assert not accepted.intersection(refused)
    assert len(refused) == len(set(refused))


def test_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_s3_url("ftp://x/y")


def test_long_url_is_truncated_in_message() -> None:
    url = "ftp://" + "x" * 10_000
    with pytest.raises(S3UrlError) as info:
        parse_s3_url(url)
    message = str(info.value)
    assert len(message) < 400
    assert "10006 characters" in message
    assert "unsupported scheme 'ftp'" in message


@pytest.mark.parametrize("value", [None, b"s3://bucket/key", 42, Path("s3://bucket/key"), ["s3://b/k"]])
def test_non_string_input(value: object) -> None:
    assert is_s3_url(value) is False
    with pytest.raises(TypeError, match="must be a str"):
        parse_s3_url(value)  # type: ignore[arg-type]


def test_str_subclass_is_accepted() -> None:
    class MyStr(str):
        pass

    assert parse_s3_url(MyStr("s3://bucket/key")) == S3Location("bucket", "key")


# --- S3Location -------------------------------------------------------------


def test_location_url_and_str() -> None:
    loc = S3Location("bucket", "dir/with space?#.png", "us-west-2")
    assert loc.url == "s3://bucket/dir/with space?#.png"
    assert str(loc) == loc.url
    assert f"{loc}" == loc.url
    assert S3Location("b", "k").region is None


def test_location_is_frozen_and_hashable() -> None:
    loc = S3Location("bucket", "key")
    with pytest.raises(FrozenInstanceError):
        loc.bucket = "other"  # type: ignore[misc]
    assert {loc, S3Location("bucket", "key")} == {loc}
    assert S3Location("bucket", "key", "us-east-1") != loc


@pytest.mark.parametrize(
    ("url", "bucket", "key", "region"), ACCEPTED, ids=[_id(row[0]) for row in ACCEPTED]
)
def test_round_trip_through_s3_url(url: str, bucket: str, key: str, region: str | None) -> None:
    loc = parse_s3_url(url)
    assert parse_s3_url(loc.url) == S3Location(loc.bucket, loc.key)


# --- bucket names -----------------------------------------------------------

VALID_BUCKETS = [
    "abc",
    "a" * 63,
    "my-bucket",
    "my.bucket.name",
    "bucket123",
    "123bucket",
    "1.2.3",
    "1.2.3.4.5",
    "a-b.c-d",
    "xn-bucket",
    "bucket-s3alias-not",
    "s3x",
]

INVALID_BUCKETS = [
    ("", "between 3 and 63"),
    ("ab", "between 3 and 63"),
    ("a" * 64, "between 3 and 63"),
    ("MyBucket", "uppercase"),
    ("my_bucket", "only lowercase letters"),
    ("my bucket", "only lowercase letters"),
    ("bücket", "only lowercase letters"),
    ("bucket١", "only lowercase letters"),  # Arabic-Indic digit is not [0-9]
    ("-bucket", "begin and end"),
    ("bucket-", "begin and end"),
    (".bucket", "begin and end"),
    ("bucket.", "begin and end"),
    ("my..bucket", "adjacent periods"),
    ("192.168.5.4", "ip address"),
    ("10.0.0.1", "ip address"),
    ("xn--bucket", "'xn--'"),
    ("sthree-bucket", "'sthree-'"),
    ("amzn-s3-demo-bucket", "'amzn-s3-demo-'"),
    ("myap-s3alias", "'-s3alias'"),
    ("bucket--ol-s3", "'--ol-s3'"),
    ("bucket.mrap", "'.mrap'"),
    ("bucket--use1-az4--x-s3", "'--x-s3'"),
    ("bucket--table-s3", "'--table-s3'"),
]


@pytest.mark.parametrize("name", VALID_BUCKETS)
def test_valid_bucket_names(name: str) -> None:
    assert validate_bucket_name(name) is None
    assert is_s3_url(f"s3://{name}/key")


@pytest.mark.parametrize(("name", "rule"), INVALID_BUCKETS, ids=[_id(r[0]) for r in INVALID_BUCKETS])
def test_invalid_bucket_names(name: str, rule: str) -> None:
    with pytest.raises(S3UrlError) as info:
        validate_bucket_name(name)
    message = str(info.value)
    assert rule.lower() in message.lower(), message
    assert repr(name) in message
    assert info.value.url is None


def test_validate_bucket_name_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        validate_bucket_name(None)  # type: ignore[arg-type]


# --- robustness and contract ------------------------------------------------


def test_error_pickles() -> None:
    # Dagster and multiprocessing move exceptions across processes.
    with pytest.raises(S3UrlError) as info:
        parse_s3_url("s3://bucket")
    clone = pickle.loads(pickle.dumps(info.value))
    assert isinstance(clone, S3UrlError)
    assert str(clone) == str(info.value)


def test_is_s3_url_never_raises_and_agrees_with_parse() -> None:
    rng = random.Random(1234)
    pieces = [
        "s3://", "https://", "http://", "HTTPS://", "ftp://", "bucket", "my.bucket", ".s3",
        ".s3-", "us-west-2", ".amazonaws.com", ".cn", ".evil.com", "/", "//", "?", "#", "@",
        ":", ":443", "[", "]", "%", "%2F", "%FF", "%C3%A9", " ", "\t", "\n", "\x00", "é",
        "\ud800", "\\", "..", "-", "xn--", "key", "s3", "dualstack", "169.254.169.254",
    ]
    for _ in range(3000):
        candidate = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        verdict = is_s3_url(candidate)
        assert isinstance(verdict, bool)
        try:
            loc = parse_s3_url(candidate)
        except S3UrlError:
            assert verdict is False, candidate
        else:
            assert verdict is True, candidate
            assert isinstance(loc, S3Location)
            assert loc.key and loc.bucket


def test_public_api() -> None:
    assert set(urls.__all__) == {
        "S3Location", "S3UrlError", "is_s3_url", "parse_s3_url", "validate_bucket_name",
    }
    assert issubclass(S3UrlError, ValueError)


def test_module_imports_only_the_standard_library() -> None:
    tree = ast.parse(Path(urls.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would pull in sibling modules"
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
