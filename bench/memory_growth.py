"""Resident memory of one run that processes many images with one warm model.

    python3 bench/memory_growth.py --images 100

Target (product spec): RSS grows by at most 50 MB from image 10 to image 100. Starts its own SeaweedFS, writes the
tiny Hunyuan3D checkpoint, uploads `--images` distinct images, then materializes all of them as ONE Dagster run
(one range of partitions, in-process, the way a batched sensor run or a backfill chunk executes) and records
the process's RSS at the end of each image's cycle in the step (after it is uploaded and recorded and the step has
returned freed memory: `assets.return_free_memory`), while the generation thread is already on the next images.
Prints RSS at image 10 and at the last image, and the growth; and the peak RSS (sampled every 20 ms) over images
1-10 and over the last 10, since the step holds up to two images' work at any moment.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def png(i: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (96 + i % 9 * 8, 96 + i % 4 * 8), (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((8 + i % 5, 10, 84, 88), fill=(30 + i % 200, 120, 220 - i % 100, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--generator", default="hunyuan3d", choices=["hunyuan3d", "extrude"])
    args = parser.parse_args()

    from dagster import materialize

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3
    from hy3d_pipeline.fleet.instance import local_instance
    from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(data_dir=Path(tmp) / "s3") as server:
        build_tiny_model(Path(tmp) / "models")
        os.environ.update(server.client_env())
        os.environ.update({"S3_IMAGES_BUCKET": "mem-images", "S3_TEMP_DIR": str(Path(tmp) / "cache"),
                           "HY3D_GENERATOR": args.generator, "HY3DGEN_MODELS": str(Path(tmp) / "models"),
                           "HY3D_MODEL_PATH": "tiny/Hunyuan3D-tiny", "HY3D_MODEL_SUBFOLDER": "hunyuan3d-dit-v2-0",
                           "HY3D_OCTREE_RESOLUTION": "64", "HY3D_STEPS": "3", "HY3D_DEVICE": "cpu"})
        server.create_buckets("mem-images")
        from hy3d_pipeline.definitions import build_defs
        from hy3d_pipeline.models.assets import image_to_model

        defs = build_defs()
        client = defs.resources["storage"].client()
        keys = [f"m/{i:04d}.png" for i in range(args.images)]
        for i, key in enumerate(keys):
            client.put_object(Bucket="mem-images", Key=key, Body=png(i))

        import threading

        from hy3d_pipeline.models import assets

        samples: list[float] = []
        peaks: list[float] = [0.0]  # peak RSS while image len(peaks) is under way
        original = assets.return_free_memory

        def recording_cycle_end():
            original()
            samples.append(rss_mb())
            peaks.append(0.0)

        assets.return_free_memory = recording_cycle_end
        running = threading.Event()

        def sample_peaks():
            while not running.wait(0.02):
                peaks[-1] = max(peaks[-1], rss_mb())

        threading.Thread(target=sample_peaks, daemon=True).start()
        (Path(tmp) / "dagster").mkdir()
        with local_instance(Path(tmp) / "dagster") as instance:
            instance.add_dynamic_partitions("images", keys)
            start = rss_mb()
            result = materialize([image_to_model], instance=instance, resources=defs.resources,
                                 tags={"dagster/asset_partition_range_start": keys[0],
                                       "dagster/asset_partition_range_end": keys[-1]},
                                 run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
        running.set()
        print(f"one run, {args.images} images, {args.generator}: success={result.success}, models={len(samples)}")
        if len(samples) >= 10:
            growth = samples[-1] - samples[9]
            print(f"RSS before the run {start:.0f} MB; after image 10 {samples[9]:.0f} MB; after image "
                  f"{len(samples)} {samples[-1]:.0f} MB; growth {growth:+.1f} MB (target <= 50 MB); "
                  f"max {max(samples):.0f} MB")
            first, last = max(peaks[:10]), max(peaks[-11:-1])
            print(f"peak RSS over images 1-10 {first:.0f} MB, over the last 10 {last:.0f} MB: {last - first:+.1f} MB")


if __name__ == "__main__":
    main()
