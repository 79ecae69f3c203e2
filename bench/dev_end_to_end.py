"""End to end under `hy3d-pipeline dev`: N images uploaded while the daemon runs, until every model exists,
against the floor of the same work in one plain loop (extrude backend, embedded SeaweedFS).

    python3 bench/dev_end_to_end.py --images 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def image(i: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (96 + i % 7 * 8, 96), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((10, 10 + i % 5, 80, 86), fill=(40 + i % 200, 90, 200, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def count_models(s3, bucket: str, prefix: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(1 for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".glb"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    import boto3

    from hy3d_pipeline.embedded.seaweedfs import free_ports

    port = free_ports(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
        env["HY3D_SENSOR_INTERVAL"] = str(args.interval)
        log = open(Path(tmp) / "dev.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "hy3d_pipeline.cli", "dev", "--port", str(port)], cwd=tmp,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                text = (Path(tmp) / "dev.log").read_text()
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).close()
                    if "embedded S3" in text:
                        break
                except OSError:
                    pass
                time.sleep(0.5)
            endpoint = re.search(r"embedded S3 \(SeaweedFS\) at (http://127\.0\.0\.1:\d+)", text).group(1)
            creds = json.loads((Path(tmp) / ".hy3d" / "embedded-credentials.json").read_text())
            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"])
            while count_models(s3, "hy3d-images", "models/samples/") < 5:  # the start-up samples are done
                time.sleep(0.5)
            bodies = {f"burst/{i:04d}.png": image(i) for i in range(args.images)}
            t0 = time.time()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda kv: s3.put_object(Bucket="hy3d-images", Key=kv[0], Body=kv[1]), bodies.items()))
            uploaded = time.time() - t0
            done = 0
            while time.time() - t0 < args.timeout:
                done = count_models(s3, "hy3d-images", "models/burst/")
                if done >= args.images:
                    break
                time.sleep(1)
            dev_s = time.time() - t0

            # the floor: the same work in one process, one plain loop, same server and generator
            os.environ.update({"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": creds["access_key"],
                               "AWS_SECRET_ACCESS_KEY": creds["secret_key"], "S3_IMAGES_BUCKET": "hy3d-images",
                               "S3_MODELS_PREFIX": "floor/", "HY3D_GENERATOR": "extrude",
                               "S3_TEMP_DIR": str(Path(tmp) / "floor-cache")})
            from hy3d_pipeline.models.processing import process_object
            from hy3d_pipeline.models.resources import GeneratorResource
            from hy3d_pipeline.s3.resources import ImageStorage

            storage, settings = ImageStorage.from_env(), GeneratorResource.from_env().settings()
            t1 = time.time()
            with ThreadPoolExecutor(1) as pool:  # one worker: the plain loop
                for key in bodies:
                    process_object(storage, storage.head("hy3d-images", key), key, settings)
            floor_s = time.time() - t1
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print(f"{args.images} images uploaded in {uploaded:.1f} s; models for {done}/{args.images} after {dev_s:.1f} s "
          f"under `hy3d-pipeline dev` (sensor interval {args.interval} s): {dev_s / args.images:.3f} s/image")
    print(f"floor (plain loop, one process): {floor_s:.1f} s, {floor_s / args.images:.3f} s/image")
    print(f"ratio dev/floor = {dev_s / floor_s:.1f}")


if __name__ == "__main__":
    main()
