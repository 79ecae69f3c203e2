"""End to end under `hy3d-pipeline dev`: N images uploaded while the daemon runs, until every model exists,
against the floor of the same work in one plain loop (extrude backend, embedded SeaweedFS).

    python3 bench/dev_end_to_end.py --images 200
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # hy3d_pipeline_tests is not installed; run from a checkout
    sys.path.insert(0, str(ROOT))

from hy3d_pipeline_tests.dev_process import DevProcess, wait_for  # noqa: E402


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


class _kept:
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def __enter__(self) -> str:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        return self.folder

    def __exit__(self, *exc) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--folder", default=None, help="keep dev's folder (logs) here instead of a temp dir")
    args = parser.parse_args()

    with (tempfile.TemporaryDirectory() if args.folder is None else _kept(args.folder)) as tmp, \
            DevProcess(Path(tmp), sensor_interval=args.interval) as dev:
        s3 = dev.s3_client()
        wait_for(lambda: count_models(s3, "hy3d-images", "models/samples/") >= 5, 120, "the start-up samples")
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
        # models in a bucket of their own: in the images bucket the running sensor would take their thumbnails
        # for new images and compete with the loop for the CPU
        dev.s3_client().create_bucket(Bucket="hy3d-floor")
        os.environ.update({**dev.s3_env(), "S3_MODELS_BUCKET": "hy3d-floor", "HY3D_GENERATOR": "extrude",
                           "S3_TEMP_DIR": str(Path(tmp) / "floor-cache")})
        from hy3d_pipeline.models.processing import process_object
        from hy3d_pipeline.models.resources import GeneratorResource
        from hy3d_pipeline.storage.resources import ImageStorage

        from hy3d_pipeline.models.generators.base import load_generator

        storage, settings = ImageStorage.from_env(), GeneratorResource.from_env().settings()
        load_generator(settings)  # dev's worker loaded its own at start, before the uploads
        t1 = time.time()
        for key in bodies:
            process_object(storage, storage.head("hy3d-images", key), key, settings)
        floor_s = time.time() - t1
    print(f"{args.images} images uploaded in {uploaded:.1f} s; models for {done}/{args.images} after {dev_s:.1f} s "
          f"under `hy3d-pipeline dev` (sensor interval {args.interval} s): {dev_s / args.images:.3f} s/image")
    print(f"floor (plain loop, one process): {floor_s:.1f} s, {floor_s / args.images:.3f} s/image")
    print(f"ratio dev/floor = {dev_s / floor_s:.1f}")


if __name__ == "__main__":
    main()
