"""Sensor tick time over a large bucket, against dagster-aws's `get_objects` over the same bucket.

    python3 bench/sensor_tick.py --objects 5000 --new 100

Starts its own SeaweedFS on 127.0.0.1, fills a bucket, commits a first tick (the initial scan), adds `--new`
objects, then times: our steady-state tick (listing + compare + requests), and the baseline
`dagster_aws.s3.sensor.get_objects(bucket, since_last_modified=...)`, which lists the whole prefix every call.
Also reports whether either missed any of the new objects. Prints the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=5000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import os

    from dagster import DagsterInstance

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3

    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(data_dir=Path(tmp) / "s3") as server:
        os.environ.update(server.client_env())
        os.environ["S3_IMAGES_BUCKET"] = bucket = "bench-images"
        os.environ["HY3D_BATCH_SIZE"] = "8"
        server.create_buckets(bucket)
        from hy3d_pipeline.definitions import build_defs
        from hy3d_pipeline.embedded.demo import tick

        defs = build_defs()
        client = defs.resources["storage"].client()

        def put(key):
            client.put_object(Bucket=bucket, Key=key, Body=b"x")

        t = time.perf_counter()
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(put, (f"img/{i:07d}.png" for i in range(args.objects))))
        print(f"uploaded {args.objects} objects in {time.perf_counter() - t:.1f} s")

        (Path(tmp) / "dagster").mkdir()
        with DagsterInstance.local_temp(tempdir=str(Path(tmp) / "dagster")) as instance:
            t = time.perf_counter()
            first = tick(defs, instance)
            for add in first.dynamic_partitions_requests:
                instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
            print(f"first tick (initial scan, {args.objects} new): {time.perf_counter() - t:.2f} s, "
                  f"{len(first.run_requests)} runs, cursor {len(first.cursor)} bytes")
            watermark = datetime.now(timezone.utc)
            time.sleep(1.1)
            new_keys = [f"img/{i:07d}-new.png" for i in range(args.new)]
            with ThreadPoolExecutor(12) as pool:
                list(pool.map(put, new_keys))

            ours, base = [], []
            for _ in range(args.repeat):
                t = time.perf_counter()
                data = tick(defs, instance, first.cursor)
                ours.append(time.perf_counter() - t)
                t = time.perf_counter()
                from dagster_aws.s3.sensor import get_objects

                objs = get_objects(bucket, since_last_modified=watermark, client=client)
                base.append(time.perf_counter() - t)
            order = instance.get_dynamic_partitions("images") + [
                k for add in data.dynamic_partitions_requests for k in add.partition_keys]
            found = set()
            for r in data.run_requests:
                if r.partition_key:
                    found.add(r.partition_key)
                else:
                    a = order.index(r.tags["dagster/asset_partition_range_start"])
                    b = order.index(r.tags["dagster/asset_partition_range_end"])
                    found.update(order[a:b + 1])
            ours_missed = len({k.removeprefix("") for k in new_keys} - found)
            base_missed = len(set(new_keys) - {o["Key"] for o in objs})
            o, b = min(ours), min(base)
            print(f"steady tick, {args.objects + args.new} objects, {args.new} new: ours {o:.3f} s "
                  f"(missed {ours_missed}, {len(data.run_requests)} runs); "
                  f"dagster-aws get_objects {b:.3f} s (missed {base_missed})")
            print(f"ratio ours/baseline = {o / b:.2f}")


if __name__ == "__main__":
    main()
