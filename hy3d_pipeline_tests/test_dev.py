"""`hy3d-pipeline dev` end to end: the UI and daemon on 127.0.0.1, the sensor picking up a dropped image, and a
Ctrl-C that stops dagster and SeaweedFS with it."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import boto3


def _graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["data"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _partitions(port: int) -> dict:
    data = _graphql(port, "{ assetNodes { assetKey { path } partitionKeys } }")
    return {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in data["assetNodes"]}


def test_dev_ui_sensor_and_shutdown(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
    env["HY3D_SENSOR_INTERVAL"] = "2"
    log = open(tmp_path / "dev.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "dev", "--port", str(port)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # the samples uploaded at start become partitions and models without anyone asking
        parts = _wait(lambda: (p := _partitions(port)) and len(p.get("models_3d", [])) >= 5 and p, 120, "sample partitions")
        assert set(parts) == {"source_images", "local_images", "models_3d"}
        endpoint = re.search(r"embedded S3 \(SeaweedFS\) at (http://127\.0\.0\.1:\d+)", (tmp_path / "dev.log").read_text()).group(1)
        creds = json.loads((tmp_path / ".hy3d" / "embedded-credentials.json").read_text())
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"])
        from hy3d_pipeline_tests.conftest import png_bytes

        s3.put_object(Bucket="hy3d-images", Key="dropped/new.png", Body=png_bytes())
        _wait(lambda: s3.head_object(Bucket="hy3d-images", Key="models/dropped/new.png.glb"), 90, "the dropped image's model")
        assert "dropped/new.png" in _partitions(port)["models_3d"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode is not None
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], (tmp_path / "dev.log").read_text()[-3000:]
