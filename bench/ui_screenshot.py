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
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # hy3d_pipeline_tests is not installed; run from a checkout
    sys.path.insert(0, str(ROOT))

from hy3d_pipeline_tests.dev_process import DevProcess, wait_for  # noqa: E402
PARTITION = "samples/mug.png"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]


def materialized_partitions(dev: DevProcess) -> set[str]:
    data = dev.graphql('{ assetOrError(assetKey: {path: ["models_3d"]}) { ... on Asset { '
                       'assetMaterializations(limit: 50) { partition } } } }')
    return {m["partition"] for m in data["assetOrError"]["assetMaterializations"]}


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

    scratch = Path(tempfile.mkdtemp(prefix="hy3d-ui-"))
    try:
        with DevProcess(scratch, sensor_interval=2) as dev:
            port = dev.port
            wait_for(lambda: args.partition in materialized_partitions(dev), 240, f"models_3d of {args.partition}", 1.0)
            time.sleep(2)  # the run's remaining partitions and checks land; the page is opened once
            # the UI greets a first visit on 127.0.0.1 with a newsletter dialog; this is its "Skip" button
            dev.graphql("mutation { setNuxSeen }")
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
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
