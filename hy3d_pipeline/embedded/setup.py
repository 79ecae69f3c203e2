"""Bring up the embedded default: SeaweedFS with a project-local data folder, a bucket, the sample images, and
a Dagster home, all under HY3D_HOME (default `./.hy3d`), so a second start finds the same data and history.

When S3 is configured (S3_IMAGES_BUCKET or S3_ENDPOINT_URL set) nothing is started: the commands run against it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from hy3d_pipeline.embedded.seaweedfs import SeaweedS3
from hy3d_pipeline.settings import current

EMBEDDED_BUCKET = "hy3d-images"
SAMPLES_PREFIX = "samples/"



def hy3d_home() -> Path:
    return current().home_folder


def s3_configured() -> bool:
    return current().s3_configured


def _credentials(home: Path) -> tuple[str, str]:
    """Random keys made on first start and kept (0600), so the data folder stays readable across restarts."""
    path = home / "embedded-credentials.json"
    if path.exists():
        data = json.loads(path.read_text())
        return data["access_key"], data["secret_key"]
    access, secret = "hy3d" + secrets.token_hex(8), secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": access, "secret_key": secret}, f)
    return access, secret


def start_embedded_s3(home: Path | None = None) -> SeaweedS3:
    """Start SeaweedFS, create the bucket and point this process's environment at it."""
    home = home or hy3d_home()
    access, secret = _credentials(home)
    server = SeaweedS3(data_dir=home / "seaweedfs", access_key=access, secret_key=secret).start()
    server.create_buckets(EMBEDDED_BUCKET)
    os.environ.update(server.client_env())
    os.environ["S3_IMAGES_BUCKET"] = EMBEDDED_BUCKET
    os.environ.setdefault("HY3D_GENERATOR", "extrude")  # no weights on a laptop; never used in place of hunyuan3d
    return server


def upload_samples(storage) -> list[str]:
    from hy3d_pipeline.embedded.samples import sample_images

    keys = []
    for name, data in sample_images().items():
        key = storage.image_key(SAMPLES_PREFIX + name.removeprefix(SAMPLES_PREFIX))
        ctype = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}.get(
            name.rsplit(".", 1)[-1].lower(), "application/octet-stream")
        storage.upload(storage.images_bucket, key, data, content_type=ctype)  # same bytes, same ETag: no rework
        keys.append(key)
    return keys


def prepare_dagster_home(home: Path | None = None) -> Path:
    """DAGSTER_HOME for `demo`, `dev`, `worker` and `report` (see fleet/instance.py)."""
    from hy3d_pipeline.fleet.instance import prepare_dagster_home as prepare

    return prepare(home)


def enter_embedded_default(stack, out=print) -> Path:
    """Everything `demo` and `dev` share: the embedded S3 with samples unless S3 is configured (stopped when
    `stack` closes), and the Dagster home. Returns DAGSTER_HOME."""
    if not s3_configured():
        from hy3d_pipeline.storage.resources import ImageStorage

        server = start_embedded_s3()
        stack.callback(server.stop)
        out(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, bucket {EMBEDDED_BUCKET}, data in {server.data_dir}")
        upload_samples(ImageStorage.from_env())
    return prepare_dagster_home()
