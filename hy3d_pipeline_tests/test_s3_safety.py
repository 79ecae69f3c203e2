"""Nothing lost, nothing stale, nothing leaked (issue 9): listings that cannot end quietly, TLS and proxy settings
that the fast listing honours, no signatures or credentials in errors, a models bucket without s3:ListBucket,
encrypted objects' ETags, no guessed bucket, and transient failures that say they will be retried.

Where SeaweedFS cannot produce the answer under test (a truncated page without a token, a 403 for a missing
key, a self-signed TLS endpoint, a proxy) a tiny real HTTP server on 127.0.0.1 serves it: boto3 and the listing
talk real HTTP to it, nothing in the process is patched.
"""

from __future__ import annotations

import logging
import uuid

import pytest

from hy3d_pipeline.s3.errors import S3AccessError
from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage, ObjectInfo
from hy3d_pipeline.storage.s3 import etag_is_md5
from hy3d_pipeline_tests.crafted import Crafted, closed_port, self_signed

EMPTY_PAGE = (b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix></Prefix>'
              b"<KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated></ListBucketResult>")


def page(keys, truncated=False, token=None) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><ETag>&quot;{'a' * 32}&quot;</ETag><Size>3</Size></Contents>"
                       for k in keys)
    tail = f"<NextContinuationToken>{token}</NextContinuationToken>" if token else ""
    return (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name>{contents}'
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>{tail}</ListBucketResult>").encode()


@pytest.fixture
def fake_creds(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHY3DTESTKEY12345")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hy3d-test-secret-" + uuid.uuid4().hex)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "HTTPS_PROXY",
                 "HTTP_PROXY", "https_proxy", "http_proxy", "NO_PROXY", "no_proxy", "S3_MODELS_BUCKET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("S3_TEMP_DIR", str(tmp_path / "cache"))


# ---- 4. listing safety -----------------------------------------------------------------------------------------

def test_truncated_page_without_token_fails_the_listing(fake_creds):
    """Ending the listing there would make every key after the page look deleted."""
    with Crafted(lambda m, p: (200, page(["a.png", "b.png"], truncated=True))) as srv:
        storage = ImageStorage(images_bucket="b", endpoint_url=srv.url(), max_attempts=1)
        with pytest.raises(S3AccessError) as err:
            list(storage.list_keys("b"))
    assert err.value.code == "TruncatedListing" and "s3://b/" in str(err.value)
    assert "continuation token" in str(err.value)


def test_listing_verifies_tls_against_the_configured_ca_bundle(fake_creds, tmp_path, monkeypatch):
    cert, key = self_signed(tmp_path)
    with Crafted(lambda m, p: (200, page(["tls.png"])), tls=(cert, key)) as srv:
        endpoint = srv.url("https")
        default = ImageStorage(images_bucket="b", endpoint_url=endpoint, max_attempts=1)
        with pytest.raises(S3AccessError) as err:
            list(default.list_keys("b"))
        assert err.value.code == "SSLError" and "AWS_CA_BUNDLE" in str(err.value)

        trusting = ImageStorage(images_bucket="b", endpoint_url=endpoint, max_attempts=1, ca_bundle=str(cert))
        assert [k for p in trusting.list_keys("b") for k, _, _ in p] == ["tls.png"]

        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        from_env = ImageStorage(images_bucket="b", endpoint_url=endpoint, max_attempts=2)  # a fresh client
        assert [k for p in from_env.list_keys("b") for k, _, _ in p] == ["tls.png"]


def test_listing_goes_through_the_proxy_env_unless_no_proxy(fake_creds, monkeypatch):
    """The endpoint is a closed port: only a request sent through the proxy can be answered."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with Crafted(lambda m, p: (200, page(["via-proxy.png"]))) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        storage = ImageStorage(images_bucket="b", endpoint_url=endpoint, max_attempts=1)
        assert [k for p in storage.list_keys("b") for k, _, _ in p] == ["via-proxy.png"]
        assert proxy.requests and all(path.startswith(endpoint + "/b") for _, path in proxy.requests)

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        seen = len(proxy.requests)
        direct = ImageStorage(images_bucket="b", endpoint_url=endpoint, max_attempts=1, download_timeout=7)
        with pytest.raises(S3AccessError) as err:
            list(direct.list_keys("b"))
        assert err.value.code == "Connection" and len(proxy.requests) == seen


# ---- 7. no credentials or signatures ----------------------------------------------------------------------------

def _assert_clean(text: str) -> None:
    import os

    assert "X-Amz-Signature" not in text and "X-Amz-Credential" not in text, text
    assert os.environ["AWS_ACCESS_KEY_ID"] not in text and os.environ["AWS_SECRET_ACCESS_KEY"] not in text, text


def test_unreachable_listing_leaks_no_signature(s3_env):
    storage = ImageStorage.from_env(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    with pytest.raises(S3AccessError) as err:
        list(storage.list_keys(storage.images_bucket))
    assert err.value.transient and "cannot reach" in str(err.value)
    _assert_clean(str(err.value))


def test_sensor_tick_with_s3_unreachable_leaks_no_signature(s3_env, instance, monkeypatch):
    from hy3d_pipeline_tests.conftest import Ticker

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    ticker = Ticker(instance)
    with pytest.raises(Exception) as err:
        ticker()
    text, cause = str(err.value), err.value
    while cause is not None:  # the whole chain, as the daemon's tick record serializes it
        text += "\n" + repr(cause) + str(cause)
        cause = cause.__cause__ or cause.__context__
    assert "cannot reach" in text, text
    _assert_clean(text)


@pytest.mark.parametrize("field", ["aws_secret_access_key", "aws_access_key_id", "aws_session_token"])
def test_credential_fields_are_refused_not_ignored(s3_env, field):
    secret = "never-in-config-" + uuid.uuid4().hex
    with pytest.raises(ValueError) as err:
        ImageStorage.from_env(**{field: secret})
    assert field in str(err.value) and "AWS_PROFILE" in str(err.value)
    assert secret not in str(err.value)


# ---- 8. a models bucket without s3:ListBucket -------------------------------------------------------------------

def test_model_head_403_without_listbucket_is_absent_and_warned_once(fake_creds, caplog):
    """AWS answers 403 (no body) to HEAD of a missing key when s3:ListBucket is not granted. SeaweedFS answers
    404 even to an identity without List (checked with its -s3.config identities), so a loopback server gives
    AWS's answer here."""
    from hy3d_pipeline.models.processing import existing_model
    from hy3d_pipeline.models.resources import GeneratorResource

    with Crafted(lambda m, p: (403, b"")) as srv:
        models_bucket = f"models-{uuid.uuid4().hex[:8]}"
        storage = ImageStorage(images_bucket="imgs", models_bucket=models_bucket, endpoint_url=srv.url(),
                               max_attempts=1)
        source = ObjectInfo("imgs", "a.png", "b" * 32, 3)
        settings = GeneratorResource(generator="extrude").settings()
        with caplog.at_level(logging.WARNING, logger="hy3d_pipeline.storage.s3"):
            assert existing_model(storage, "models/a.png.glb", source, settings) is None
            assert existing_model(storage, "models/b.png.glb", source, settings) is None
        warnings = [r.getMessage() for r in caplog.records if "s3:ListBucket" in r.getMessage()]
        assert len(warnings) == 1 and models_bucket in warnings[0], caplog.records
        # a source image is not a model: there a 403 stays an error that says what to grant
        with pytest.raises(S3AccessError) as err:
            storage.head_or_none("imgs", "a.png")
        assert err.value.code == "AccessDenied" and "s3:ListBucket on bucket 'imgs'" in str(err.value)


# ---- 9. encrypted objects ---------------------------------------------------------------------------------------

ETAG_CASES = [
    ("0" * 32, {}, True),
    ("0" * 32, {"ServerSideEncryption": "AES256"}, True),  # SSE-S3 keeps the MD5 ETag
    ("0" * 32, {"ServerSideEncryption": "aws:kms"}, False),
    ("0" * 32, {"ServerSideEncryption": "aws:kms:dsse"}, False),
    ("0" * 32, {"SSECustomerAlgorithm": "AES256"}, False),
    ("0" * 32, {"ServerSideEncryption": "AES256", "SSECustomerAlgorithm": "AES256"}, False),
    ("0" * 32 + "-3", {}, False),  # multipart
    ("not-an-md5", {}, False),
]


def test_etag_is_md5_only_for_plain_or_sse_s3_objects():
    """Unit level: SeaweedFS stores SSE-C objects but gives them the plaintext's MD5 as ETag (AWS does not) and
    refuses aws:kms, so no real server here returns an encrypted object whose ETag is not its MD5."""
    wrong = [(etag, response) for etag, response, is_md5 in ETAG_CASES if etag_is_md5(etag, response) is not is_md5]
    assert wrong == []


# ---- 13. no surprise bucket -------------------------------------------------------------------------------------

def test_nothing_configured_loads_but_lists_no_strangers_bucket(monkeypatch, instance, tmp_path):
    from dagster import SkipReason, build_sensor_context

    from hy3d_pipeline.definitions import build_defs

    for name in ("S3_IMAGES_BUCKET", "S3_ENDPOINT_URL", "S3_IMAGES_PREFIX", "S3_MODELS_BUCKET", "S3_EVENTS_QUEUE_URL",
                 "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "HY3D_IMAGES_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAHY3DTESTKEY12345")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hy3d-test-secret")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("S3_TEMP_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HY3D_GENERATOR", "extrude")
    with Crafted(lambda m, p: (502, b"")) as proxy:
        # any request to AWS would have to pass here; none may
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        defs = build_defs()
        storage = defs.resources["storage"]
        assert storage.images_bucket == ""
        sensor = defs.resolve_sensor_def("new_images_sensor")
        result = sensor(build_sensor_context(instance=instance, resources=defs.resources, definitions=defs))
        assert isinstance(result, SkipReason) and result.skip_message == NO_BUCKET

        from dagster import materialize

        from hy3d_pipeline.models.assets import image_to_model

        instance.add_dynamic_partitions("images", ["x.png"])
        run = materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="x.png",
                          raise_on_error=False)
        assert not run.success
        failures = [e.step_failure_data.user_failure_data.description for e in run.get_step_failure_events()]
        assert failures and NO_BUCKET in failures[0]
        assert proxy.requests == []


# ---- 14. transient failures say they will be retried ------------------------------------------------------------

def test_transient_failure_says_it_will_be_retried(s3_env, instance):
    from dagster import DagsterEventType, materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.models.assets import image_to_model

    storage = ImageStorage.from_env(endpoint_url=f"http://127.0.0.1:{closed_port()}", max_attempts=1)
    instance.add_dynamic_partitions("images", ["t.png"])
    run = materialize([image_to_model], instance=instance, resources={**build_defs().resources, "storage": storage},
                      partition_key="t.png", raise_on_error=False)
    assert not run.success
    retried = [e for e in run.all_events if e.event_type == DagsterEventType.STEP_UP_FOR_RETRY]
    assert retried, [e.event_type for e in run.all_events]
    error, first = retried[0].event_specific_data.error, ""
    while error is not None:  # RetryRequestedFromPolicy, caused by the step's Failure
        first, error = first + error.message, error.cause
    assert "cannot reach" in first and "(transient: this step will be retried)" in first, first
    last = run.get_step_failure_events()[-1].step_failure_data.user_failure_data.description
    assert "retries are used up" in last, last
