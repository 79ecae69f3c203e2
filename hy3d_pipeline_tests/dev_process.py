"""`hy3d-pipeline dev` as a child process in a scratch folder, for the tests and benches that drive it the way a
person would: the UI over GraphQL, the embedded S3 with its own credentials, and a Ctrl-C at the end."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out waiting for {what}")


class DevProcess:
    """Start with `with DevProcess(folder, sensor_interval=2) as dev:`; stopped with SIGINT on exit."""

    def __init__(self, folder: Path, sensor_interval: int = 2, env: dict[str, str] | None = None) -> None:
        self.folder, self.port = Path(folder), free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
        self.env["HY3D_SENSOR_INTERVAL"] = str(sensor_interval)
        self.env["PYTHONPATH"] = str(ROOT) + os.pathsep + self.env.get("PYTHONPATH", "")
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        return self.folder / "dev.log"

    def __enter__(self) -> "DevProcess":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "dev", "--port", str(self.port)],
                                     cwd=self.folder, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_for(lambda: self.graphql("{ version }"), 120, "the Dagster UI")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        return self.proc.returncode

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/graphql",
                                     data=json.dumps({"query": query, "variables": variables or {}}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.load(resp)["data"]
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GraphQL answered {exc.code}: {exc.read()[:2000]!r}") from None

    def sensor_selector(self, name: str = "new_images_sensor") -> dict[str, str]:
        nodes = self.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } "
                             "sensors { name } } } } }")["repositoriesOrError"]["nodes"]
        node = next(n for n in nodes if name in {s["name"] for s in n["sensors"]})
        return {"repositoryLocationName": node["location"]["name"], "repositoryName": node["name"], "sensorName": name}

    def sensor_state(self, name: str = "new_images_sensor") -> dict:
        """The sensor's origin and selector ids, status, and its latest ticks (newest first)."""
        data = self.graphql("query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { "
                            "jobOriginId sensorState { selectorId status ticks(limit: 20) { status timestamp } } } } }",
                            {"s": self.sensor_selector(name)})["sensorOrError"]
        return {"origin": data["jobOriginId"], **data["sensorState"]}

    def stop_sensor(self, name: str = "new_images_sensor") -> None:
        """Stop the sensor and wait until no tick of it is under way."""
        state = self.sensor_state(name)
        self.graphql("mutation($o: String, $s: String) { stopSensor(jobOriginId: $o, jobSelectorId: $s) { "
                     "__typename } }", {"o": state["origin"], "s": state["selectorId"]})
        wait_for(lambda: all(t["status"] != "STARTED" for t in self.sensor_state(name)["ticks"]), 60,
                 f"the last tick of {name} to end")

    def start_sensor(self, name: str = "new_images_sensor") -> float:
        """Start the sensor; returns the time it was started (compare with tick timestamps)."""
        started = time.time()
        self.graphql("mutation($s: SensorSelector!) { startSensor(sensorSelector: $s) { __typename } }",
                     {"s": self.sensor_selector(name)})
        return started

    def ticks_since(self, when: float, name: str = "new_images_sensor") -> int:
        """How many ticks of the sensor began after `when` and have ended."""
        return sum(t["timestamp"] > when and t["status"] != "STARTED" for t in self.sensor_state(name)["ticks"])

    def partitions(self) -> dict[str, list[str]]:
        data = self.graphql("{ assetNodes { assetKey { path } partitionKeys } }")
        return {"/".join(n["assetKey"]["path"]): n["partitionKeys"] for n in data["assetNodes"]}

    def runs(self) -> list[dict]:
        data = self.graphql("{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
        return [{"id": r["runId"], "status": r["status"], "tags": {t["key"]: t["value"] for t in r["tags"]}}
                for r in data["runsOrError"]["results"]]

    def materializations(self, asset: str = "models_3d") -> list[dict]:
        """Each materialization's partition, run id and text/int metadata."""
        data = self.graphql(f'{{ assetOrError(assetKey: {{path: ["{asset}"]}}) {{ ... on Asset {{ '
                            'assetMaterializations(limit: 10000) { partition runId metadataEntries { label '
                            '... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } } } } } }')
        out = []
        for m in data["assetOrError"]["assetMaterializations"]:
            meta = {e["label"]: e.get("text", e.get("intValue")) for e in m["metadataEntries"]}
            out.append({"partition": m["partition"], "run": m["runId"], **meta})
        return out

    def s3_env(self) -> dict[str, str]:
        """Endpoint and credentials of the embedded S3 this dev process started."""
        text = wait_for(lambda: (t := self.log_path.read_text()) and "embedded S3" in t and t, 60, "embedded S3")
        endpoint = re.search(r"embedded S3 \(SeaweedFS\) at (http://127\.0\.0\.1:\d+)", text).group(1)
        creds = json.loads((self.folder / ".hy3d" / "embedded-credentials.json").read_text())
        return {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": creds["access_key"],
                "AWS_SECRET_ACCESS_KEY": creds["secret_key"], "S3_IMAGES_BUCKET": "hy3d-images"}

    def s3_client(self):
        import boto3

        env = self.s3_env()
        return boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1",
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
