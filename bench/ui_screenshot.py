"""Check in a real browser that the Dagster UI shows the model thumbnails, and keep the picture.

    apt-get install -y chromium         # Debian's package; any Chromium/Chrome on PATH works (or set CHROMIUM)
    python3 bench/ui_screenshot.py      # writes docs/ui-thumbnail.png; --out PATH to write elsewhere

It starts `hy3d-pipeline dev` (embedded S3, sample images, UI and daemon) in a scratch folder on a free port,
waits until the sensor's run has materialized `models_3d` for the samples, then opens one partition of that
asset in headless Chromium and screenshots it. Markdown metadata is drawn inline only below 1000 characters
(longer values hide behind "[Show Markdown]"), so this is the check that our previews really appear. Everything
started here is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTITION = "samples/mug.png"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def graphql(port: int, query: str) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)["data"]


def materialized_partitions(port: int) -> set[str]:
    data = graphql(port, '{ assetOrError(assetKey: {path: ["models_3d"]}) { ... on Asset { '
                         'assetMaterializations(limit: 50) { partition } } } }')
    return {m["partition"] for m in data["assetOrError"]["assetMaterializations"]}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    raise SystemExit(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(url: str, out: Path, profile: Path, size: str = "1400,1000") -> None:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium (or set CHROMIUM)")
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={out}",
                    f"--window-size={size}", "--virtual-time-budget=15000", url],
                   check=True, timeout=120, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def shrink(path: Path) -> None:
    """A palette PNG: a UI screenshot has few colours, and the file is meant to be committed."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "ui-thumbnail.png"))
    parser.add_argument("--partition", default=PARTITION)
    parser.add_argument("--checks-out", default=None, help="also screenshot the asset's checks tab to this path")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)

    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="hy3d-ui-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
    env["HY3D_SENSOR_INTERVAL"] = "2"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = open(scratch / "dev.log", "w+")
    dev = subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "dev", "--port", str(port)], cwd=scratch,
                           env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: args.partition in materialized_partitions(port), 240, f"models_3d of {args.partition}")
        time.sleep(2)  # the run's remaining partitions and checks land; the page is opened once
        # the UI greets a first visit on 127.0.0.1 with a newsletter dialog; this is its "Skip" button
        graphql(port, "mutation { setNuxSeen }")
        url = (f"http://127.0.0.1:{port}/assets/models_3d?view=partitions&partition="
               + urllib.parse.quote(args.partition, safe=""))
        screenshot(url, out, scratch / "chromium-profile")
        shrink(out)
        print(f"{url} -> {out} ({out.stat().st_size} bytes)")
        if args.checks_out:
            checks_url = f"http://127.0.0.1:{port}/assets/models_3d?view=checks&checkDetail=silhouette_matches_input"
            checks_out = Path(args.checks_out).absolute()
            screenshot(checks_url, checks_out, scratch / "chromium-profile")
            shrink(checks_out)
            print(f"{checks_url} -> {checks_out} ({checks_out.stat().st_size} bytes)")
        return 0
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait()
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
