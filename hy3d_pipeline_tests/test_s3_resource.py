"""The S3 resource against a real SeaweedFS: errors that name the object, verified downloads, safe local names."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from hy3d_pipeline.s3.errors import S3AccessError
from hy3d_pipeline.storage.resources import ImageStorage, ObjectInfo, safe_local_name


def test_missing_key_names_object(storage):
    with pytest.raises(S3AccessError) as err:
        storage.head(storage.images_bucket, "nope/missing.png")
    assert f"s3://{storage.images_bucket}/nope/missing.png" in str(err.value)
    assert "not found" in str(err.value) and not err.value.transient


def test_missing_bucket_says_so(storage):
    with pytest.raises(S3AccessError) as err:
        storage.head("no-such-bucket-hy3d", "a.png")
    assert err.value.code == "NoSuchBucket"
    assert "'no-such-bucket-hy3d' does not exist" in str(err.value)


def test_wrong_credentials_are_named_not_leaked(storage, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    bad = ImageStorage.from_env()
    with pytest.raises(S3AccessError) as err:
        bad.head(bad.images_bucket, "a.png")
    assert "rejected the credentials" in str(err.value)
    assert "definitely-wrong-secret" not in str(err.value)


def test_missing_credentials_say_what_to_do(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = ImageStorage.from_env(max_attempts=1)
    with pytest.raises(S3AccessError) as err:
        storage.head(storage.images_bucket, "a.png")
    assert err.value.code == "NoCredentials"
    assert "AWS_ACCESS_KEY_ID" in str(err.value) and "IAM role" in str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_transient_and_names_endpoint(s3_env):
    endpoint = f"http://127.0.0.1:{_free_port()}"
    storage = ImageStorage.from_env(endpoint_url=endpoint, max_attempts=1)
    with pytest.raises(S3AccessError) as err:
        storage.head(storage.images_bucket, "a.png")
    assert err.value.transient and endpoint in str(err.value)


def test_download_timeout(s3_env):
    """A server that accepts and never answers: the download gives up after S3_DOWNLOAD_TIMEOUT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        storage = ImageStorage.from_env(endpoint_url=f"http://127.0.0.1:{port}", download_timeout=1, max_attempts=1)
        info = ObjectInfo(storage.images_bucket, "slow.png", "0" * 32, 10)
        with pytest.raises(S3AccessError) as err:
            storage.download(info)
        assert err.value.code == "Timeout" and err.value.transient
        assert "s3://" in str(err.value) and "S3_DOWNLOAD_TIMEOUT" in str(err.value)
        assert list(Path(storage.temp_dir).iterdir()) == []
    finally:
        stop.set()
        thread.join()
        listener.close()
        for conn in held:
            conn.close()


def test_download_verified_and_cached(storage, s3):
    s3.put_object(Bucket=storage.images_bucket, Key="dir/a.png", Body=b"x" * 5000)
    info = storage.head(storage.images_bucket, "dir/a.png")
    path = storage.download(info)
    assert path.read_bytes() == b"x" * 5000
    assert path.parent == Path(storage.temp_dir).resolve()
    inode = path.stat().st_ino  # a new download would be renamed into place: another inode
    assert storage.download(info) == path and path.stat().st_ino == inode  # cached per key + ETag
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no partial files left


def test_download_refuses_other_version(storage, s3):
    """An object overwritten since it was listed is never saved under the old ETag."""
    s3.put_object(Bucket=storage.images_bucket, Key="b.png", Body=b"old")
    old = storage.head(storage.images_bucket, "b.png")
    s3.put_object(Bucket=storage.images_bucket, Key="b.png", Body=b"new!")
    with pytest.raises(S3AccessError) as err:
        storage.download(old)
    assert err.value.transient and "b.png" in str(err.value)
    assert list(Path(storage.temp_dir).iterdir()) == []


def test_download_size_mismatch_leaves_nothing(storage, s3):
    s3.put_object(Bucket=storage.images_bucket, Key="c.png", Body=b"12345")
    real = storage.head(storage.images_bucket, "c.png")
    lying = ObjectInfo(real.bucket, real.key, real.etag, real.size + 1)
    with pytest.raises(S3AccessError, match="incomplete"):
        storage.download(lying)
    assert list(Path(storage.temp_dir).iterdir()) == []


@pytest.mark.parametrize("key", [
    "../../etc/x.png", "/abs/olute.png", "a/../../b.png", "..", "dir/", "ünïcödé/猫.png", "x" * 1024,
    "con\x00trol\n.png", "a\\..\\b.png", ".hidden.png",
])
def test_local_names_never_leave_temp_dir(storage, key):
    info = ObjectInfo(storage.images_bucket, key, "e" * 32, 1)
    path = storage.local_path(info)
    base = Path(storage.temp_dir).resolve()
    assert path.parent == base
    assert len(path.name) <= 120 and "/" not in path.name and not path.name.startswith(".")
    assert safe_local_name(key, "a") != safe_local_name(key, "b")


def test_cleanup_flag(storage, s3, monkeypatch):
    s3.put_object(Bucket=storage.images_bucket, Key="d.png", Body=b"d")
    path = storage.download(storage.head(storage.images_bucket, "d.png"))
    keep = ImageStorage.from_env(cleanup_temp_files=False)
    keep.discard_local(path)
    assert path.exists()
    storage.discard_local(path)
    assert not path.exists()


def test_settings_from_env(s3_env, monkeypatch):
    monkeypatch.setenv("S3_IMAGES_PREFIX", "in/")
    monkeypatch.setenv("S3_MODELS_BUCKET", "out-bucket")
    monkeypatch.setenv("S3_DOWNLOAD_TIMEOUT", "7")
    monkeypatch.setenv("S3_CLEANUP_TEMP_FILES", "False")
    monkeypatch.delenv("S3_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    storage = ImageStorage.from_env()
    assert (storage.images_prefix, storage.models_bucket_name, storage.download_timeout) == ("in/", "out-bucket", 7)
    assert storage.cleanup_temp_files is False and storage.region_name == "eu-west-3"
    assert storage.model_key("a/b.png", "glb") == "models/a/b.png.glb"
    assert storage.is_model_key("out-bucket", "models/x.png") and not storage.is_model_key(storage.images_bucket, "models/x.png")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in repr(storage)  # credentials are never resource config


def test_fast_listing_matches_boto3(storage, s3):
    """The sensor's own listing parser returns exactly what boto3's does, odd keys and pagination included."""
    keys = ["a b+c.png", "tab\there.png", "ünï/猫.png", "amp&lt;.png", "x<y>.png", "q?#%25.png", "plus+.png"]
    keys += [f"many/{i:04d}.png" for i in range(1010)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=storage.images_bucket, Key=k, Body=k.encode()), keys))
    ours = [item for page in storage.list_keys(storage.images_bucket) for item in page]
    theirs = [(o["Key"], o["ETag"].strip('"'), o["Size"])
              for page in s3.get_paginator("list_objects_v2").paginate(Bucket=storage.images_bucket)
              for o in page.get("Contents", [])]
    assert ours == theirs and len(ours) == len(keys)
    after = [item[0] for page in storage.list_keys(storage.images_bucket, "many/", start_after="many/1000.png")
             for item in page]
    assert after == [f"many/{i:04d}.png" for i in range(1001, 1010)]


def test_listing_errors_are_translated(storage):
    with pytest.raises(S3AccessError) as err:
        list(storage.list_keys("no-such-bucket-hy3d"))
    assert err.value.code == "NoSuchBucket"


def test_fast_listing_goes_through_botocores_http_session(storage):
    """The listing's one botocore private (`client._endpoint.http_session`): a presigned page fetched through the
    client's own session. `list_pages` falls back to boto3 when this breaks, slower but right, so only this test
    notices a botocore change."""
    from botocore.httpsession import URLLib3Session

    from hy3d_pipeline.s3 import listing

    client = storage.client()
    assert isinstance(listing.http_session(client), URLLib3Session)
    url = client.generate_presigned_url("list_objects_v2", Params={"Bucket": storage.images_bucket}, ExpiresIn=60)
    status, body = listing._send(client, url)
    assert status == 200 and b"<ListBucketResult" in body
