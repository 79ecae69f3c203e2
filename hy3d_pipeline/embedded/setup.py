"""Bring up the embedded default: SeaweedFS with a project-local data folder, a bucket, the sample images, and
a Dagster home, all under HY3D_HOME (default `./.hy3d`), so a second start finds the same data and history.

The S3 endpoint is part of what is kept: a user saves `--endpoint-url` in scripts and AWS profiles, so the port
is chosen once and remembered (`embedded-s3.json`, next to the credentials), with the pid of the server using it,
so that other commands (`upload`, `report`) find a running `dev` and use its server instead of starting a
second one on the same data.

When S3 is configured (S3_IMAGES_BUCKET or S3_ENDPOINT_URL set) nothing is started: the commands run against it.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
from dataclasses import dataclass
from pathlib import Path

from hy3d_pipeline.embedded.seaweedfs import (HOST, EmbeddedS3Error, SeaweedS3, client_env, lasting_free_port,
                                              port_is_free)
from hy3d_pipeline.settings import current

EMBEDDED_BUCKET = "hy3d-images"
SAMPLES_PREFIX = "samples/"
_STATE_FILE = "embedded-s3.json"


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


def _read_state(home: Path) -> dict:
    try:
        state = json.loads((home / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _write_state(home: Path, **values) -> None:
    path = home / _STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**_read_state(home), **values}))
    os.replace(tmp, path)  # a reader never sees half a file


@dataclass(frozen=True)
class RunningS3:
    """The embedded S3 of a home, started by a command that is still running."""

    endpoint_url: str
    pid: int
    access_key: str
    secret_key: str


def running_s3(home: Path | None = None) -> RunningS3 | None:
    """The server a `dev` (or `demo`, `report`) of this home is running now, else None. The recorded pid must
    still be a `weed` serving this home's data folder: a pid reused by another program does not count."""
    import psutil

    home = home or hy3d_home()
    state = _read_state(home)
    pid, port = state.get("pid"), state.get("running_port")
    if not isinstance(pid, int) or not isinstance(port, int):
        return None
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.Error, OSError):
        return None
    if f"-dir={home / 'seaweedfs'}" not in cmdline or f"-s3.port={port}" not in cmdline:
        return None
    access, secret = _credentials(home)
    return RunningS3(f"http://{HOST}:{port}", pid, access, secret)


def _started(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _owner_alive(home: Path) -> bool:
    """Whether the command that started the home's server still runs (its pid, not reused: same start time)."""
    state = _read_state(home)
    owner = state.get("owner")
    if not isinstance(owner, int):
        return True  # recorded before owners were: assume it is in use
    return _started(owner) is not None and _started(owner) == state.get("owner_started")


def _stop_orphan(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout=15)
    except psutil.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except (psutil.Error, OSError):
        pass


def _point_environment_at(endpoint_url: str, access: str, secret: str) -> None:
    # a profile or session token from the user's shell would be used instead of (or sent with) the plain keys
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(name, None)
    os.environ.update(client_env(endpoint_url, access, secret))
    os.environ["S3_IMAGES_BUCKET"] = EMBEDDED_BUCKET


def use_running_s3(home: Path | None = None) -> RunningS3 | None:
    """Point this process's environment at the running embedded S3 of `home`, if there is one."""
    running = running_s3(home)
    if running is not None:
        _point_environment_at(running.endpoint_url, running.access_key, running.secret_key)
    return running


def _s3_port(home: Path, out) -> int:
    """The remembered S3 port when it is free; a new lasting one on first start. A taken port falls back to a
    free one for this start only, announced: the remembered one stays, so the usual URL is back next time."""
    remembered = _read_state(home).get("port")
    if isinstance(remembered, int) and port_is_free(remembered):
        return remembered
    port = lasting_free_port()
    if isinstance(remembered, int):
        out(f"port {remembered} of the embedded S3 (remembered in {home / _STATE_FILE}) is taken by another "
            f"program: using port {port} this time; the endpoint printed below has it")
    else:
        _write_state(home, port=port)
    return port


def start_embedded_s3(home: Path | None = None, out=print) -> SeaweedS3:
    """Start SeaweedFS on the home's lasting port, create the bucket and point this process's environment at
    it. Refused while another command runs this home's server: two servers must never share one data folder."""
    home = home or hy3d_home()
    running = running_s3(home)
    if running is not None and not _owner_alive(home):
        # the command that started it was killed (SIGKILL, OOM) and could not stop it: the server is ours to stop
        out(f"stopping the embedded S3 left running by a command that was killed (weed pid {running.pid})")
        _stop_orphan(running.pid)
        running = None
    if running is not None:
        raise EmbeddedS3Error(
            f"the embedded S3 of {home} is already running at {running.endpoint_url} (weed pid {running.pid}, "
            "started by another hy3d-pipeline command in this folder): stop that command first, or set HY3D_HOME "
            "to another folder")
    access, secret = _credentials(home)
    server = SeaweedS3(data_dir=home / "seaweedfs", access_key=access, secret_key=secret,
                       port=_s3_port(home, out)).start()
    _write_state(home, pid=server.process.pid, running_port=server.port, owner=os.getpid(),
                 owner_started=_started(os.getpid()))
    server.create_buckets(EMBEDDED_BUCKET)
    _point_environment_at(server.endpoint_url, access, secret)
    os.environ.setdefault("HY3D_GENERATOR", "extrude")  # no weights on a laptop; never used in place of hunyuan3d
    return server


def drop_in_lines(endpoint_url: str, access: str, secret: str) -> list[str]:
    """What a user types to put images into the embedded bucket: the AWS CLI, or `upload` from this folder."""
    keys = f"AWS_ACCESS_KEY_ID={shlex.quote(access)} AWS_SECRET_ACCESS_KEY={shlex.quote(secret)}"
    return [
        "drop images in (the embedded S3 listens on 127.0.0.1 only; these are its own keys):",
        f"  export {keys}",
        f"  aws s3 cp photo.jpg s3://{EMBEDDED_BUCKET}/ --endpoint-url {endpoint_url}",
        f"  (a folder: aws s3 cp --recursive FOLDER s3://{EMBEDDED_BUCKET}/FOLDER/ --endpoint-url {endpoint_url})",
        "or, from this folder with nothing exported: hy3d-pipeline upload PATH... (files and folders)",
    ]


def upload_samples(storage) -> list[str]:
    from hy3d_pipeline.embedded.samples import sample_images
    from hy3d_pipeline.images.formats import content_type_for_name

    keys = []
    for name, data in sample_images().items():
        key = storage.image_key(SAMPLES_PREFIX + name.removeprefix(SAMPLES_PREFIX))
        # same bytes, same ETag: no rework
        storage.upload(storage.images_bucket, key, data, content_type=content_type_for_name(name))
        keys.append(key)
    return keys


def prepare_dagster_home(home: Path | None = None) -> Path:
    """DAGSTER_HOME for `demo`, `dev`, `worker` and `report` (see fleet/instance.py)."""
    from hy3d_pipeline.fleet.instance import prepare_dagster_home as prepare

    return prepare(home)


def enter_embedded_default(stack, out=print, *, drop_in: bool = False) -> Path:
    """Everything `demo` and `dev` share: the embedded S3 with samples unless S3 is configured (stopped when
    `stack` closes), and the Dagster home. With `drop_in`, also the lines that upload into it. Returns
    DAGSTER_HOME."""
    if not s3_configured():
        from hy3d_pipeline.storage.resources import ImageStorage

        server = start_embedded_s3(out=out)
        stack.callback(server.stop)
        out(f"embedded S3 (SeaweedFS) at {server.endpoint_url}, bucket {EMBEDDED_BUCKET}, data in {server.data_dir}")
        upload_samples(ImageStorage.from_env())
        if drop_in:
            for line in drop_in_lines(server.endpoint_url, server.access_key, server.secret_key):
                out(line)
    return prepare_dagster_home()
