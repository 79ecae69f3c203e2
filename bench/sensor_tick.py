"""Sensor tick time and S3 requests over a large bucket: listing mode, event mode, and the baseline.

    python3 bench/sensor_tick.py --objects 100000 --new 100

Starts SeaweedFS (the bucket) and moto's server (the SQS queue for event mode) on 127.0.0.1, fills the bucket,
commits a first tick (the initial scan), adds `--new` objects, then times, each the best of `--repeat`:
  - listing mode: our steady-state tick (full listing + compare + requests);
  - baseline: dagster-aws's `get_objects(bucket, since_last_modified=...)`, which lists the whole prefix;
  - event mode: a tick reading the `--new` objects' S3 event notifications from SQS.
Reports whether any new object was missed, S3 requests per tick, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path


def start_moto(port: int) -> subprocess.Popen:
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto did not start")


def expand(instance, data) -> set[str]:
    order = instance.get_dynamic_partitions("images") + [
        k for add in data.dynamic_partitions_requests for k in getattr(add, "partition_keys", [])]
    found = set()
    for r in data.run_requests:
        if r.partition_key:
            found.add(r.partition_key)
        else:
            a = order.index(r.tags["dagster/asset_partition_range_start"])
            b = order.index(r.tags["dagster/asset_partition_range_end"])
            found.update(order[a:b + 1])
    return found


def event_body(bucket: str, key: str, etag: str, n: int) -> str:
    from urllib.parse import quote_plus

    return json.dumps({"Records": [{"eventName": "ObjectCreated:Put", "s3": {
        "bucket": {"name": bucket}, "object": {"key": quote_plus(key), "eTag": etag, "sequencer": f"{n:016X}"}}}]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    import boto3
    from dagster import DagsterInstance

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3, free_ports

    moto_port = free_ports(1)[0]
    moto = start_moto(moto_port)
    with tempfile.TemporaryDirectory() as tmp, SeaweedS3(data_dir=Path(tmp) / "s3") as server:
        os.environ.update(server.client_env())
        os.environ.update({"S3_IMAGES_BUCKET": "bench-images", "HY3D_BATCH_SIZE": "8",
                           "HY3D_SENSOR_MAX_IMAGES": str(args.objects + args.new)})
        bucket = "bench-images"
        server.create_buckets(bucket)
        from hy3d_pipeline.definitions import build_defs
        from hy3d_pipeline.embedded.demo import apply_sensor_records, tick
        from hy3d_pipeline.images.planner import Cursor
        from hy3d_pipeline.s3 import listing

        defs = build_defs()
        client = defs.resources["storage"].client()
        t = time.perf_counter()
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"x"),
                          (f"img/{i:07d}.png" for i in range(args.objects))))
        print(f"uploaded {args.objects} objects in {time.perf_counter() - t:.1f} s", flush=True)

        (Path(tmp) / "dagster").mkdir()
        with DagsterInstance.local_temp(tempdir=str(Path(tmp) / "dagster")) as instance:
            t = time.perf_counter()
            first = tick(defs, instance)
            apply_sensor_records(instance, first)
            print(f"first tick (initial scan, {args.objects} new): {time.perf_counter() - t:.2f} s, "
                  f"{len(first.run_requests)} runs, cursor {len(first.cursor)} bytes", flush=True)
            watermark = datetime.now(timezone.utc)
            time.sleep(1.1)
            new_keys = [f"img/{i:07d}-new.png" for i in range(args.new)]
            etags = {}
            for k in new_keys:
                etags[k] = client.put_object(Bucket=bucket, Key=k, Body=k.encode())["ETag"].strip('"')

            s3_calls = {"n": 0}
            client.meta.events.register("before-send.s3.*", lambda **_: s3_calls.__setitem__("n", s3_calls["n"] + 1))
            from dagster_aws.s3.sensor import get_objects

            ours, base, ours_pages, base_calls = [], [], 0, 0
            for _ in range(args.repeat):
                before = listing.pages_requested
                t = time.perf_counter()
                data = tick(defs, instance, first.cursor)
                ours.append(time.perf_counter() - t)
                ours_pages = listing.pages_requested - before
                s3_calls["n"] = 0
                t = time.perf_counter()
                objs = get_objects(bucket, since_last_modified=watermark, client=client)
                base.append(time.perf_counter() - t)
                base_calls = s3_calls["n"]
            ours_missed = len(set(new_keys) - expand(instance, data))
            base_missed = len(set(new_keys) - {o["Key"] for o in objs})

            # event mode: the same new objects, as S3 would announce them
            sqs = boto3.client("sqs", endpoint_url=f"http://127.0.0.1:{moto_port}", region_name="us-east-1")
            cursor = Cursor.load(first.cursor)
            cursor.reconciled_at = time.time()
            event_cursor = cursor.dump()
            ev, ev_missed, ev_calls = [], 0, 0
            for rep in range(args.repeat):
                queue = sqs.create_queue(QueueName=f"bench-events-{rep}")["QueueUrl"]
                os.environ["S3_EVENTS_QUEUE_URL"] = queue
                for i in range(0, len(new_keys), 10):
                    sqs.send_message_batch(QueueUrl=queue, Entries=[
                        {"Id": str(n), "MessageBody": event_body(bucket, k, etags[k], i + n)}
                        for n, k in enumerate(new_keys[i:i + 10])])
                before, s3_calls["n"] = listing.pages_requested, 0
                t = time.perf_counter()
                data = tick(defs, instance, event_cursor)
                ev.append(time.perf_counter() - t)
                ev_calls = s3_calls["n"] + listing.pages_requested - before
                ev_missed = len(set(new_keys) - expand(instance, data))
            del os.environ["S3_EVENTS_QUEUE_URL"]

            o, b, e = min(ours), min(base), min(ev)
            total = args.objects + args.new
            print(f"bucket of {total} objects, {args.new} new (best of {args.repeat}):")
            print(f"  listing mode tick          {o:7.3f} s  S3 requests {ours_pages:5d}  missed {ours_missed}")
            print(f"  dagster-aws get_objects    {b:7.3f} s  S3 requests {base_calls:5d}  missed {base_missed}")
            print(f"  event mode tick (SQS)      {e:7.3f} s  S3 requests {ev_calls:5d}  missed {ev_missed}")
            print(f"ratio listing/get_objects = {o / b:.2f} (target <= 0.5)")
            print(f"ratio events/listing      = {e / o:.3f} (target <= 0.1)")
    moto.terminate()


if __name__ == "__main__":
    main()
