"""The same images through the fleet's engines, against a plain loop doing the same work in one process.

    python3 bench/fleet.py --images 200                   # extrude backend
    python3 bench/fleet.py --images 200 --device-seconds 0.5   # each image also holds a simulated accelerator

Starts its own SeaweedFS, PostgreSQL (with its default durability: fsync on, as SQLite's) and Redis on
127.0.0.1. Each engine variant gets a bucket of its own with the
same `--images` PNGs and a Postgres database of its own, runs under `hy3d-pipeline dev` (webserver + daemon) and
is timed from the first upload until every model exists:

  (a) plain loop       one process: `process_object` per image (check, download, generate, export, upload), its
                       generator loaded before the clock starts, as the workers' are (they load it at start)
  (b) default launcher Dagster's DefaultRunLauncher (HY3D_RUN_LAUNCHER=default): a new process per run
  (c) workers x1       WorkerRunLauncher, one `hy3d-pipeline worker` on Redis
  (d) workers x2       the same with two workers (HY3D_GPU_SLOTS=2)

For each: s/image, the ratio to (a), runs, generator loads (the distinct `worker` values of the models_3d
materializations and their `generator_loads`), and the machine's busy cores meanwhile (/proc/stat). On a small
machine the servers, the daemon and every worker share the cores; `--pin` gives the loop core 0 and worker w
core w alone (the rest runs anywhere), as a fleet's worker owns its GPU. Then the per-event cost of Dagster
storage: one in-process run of 32 images on SQLite (Dagster's classes and ours), on Postgres through
dagster-postgres as shipped (a connection per operation) and through our pooled storages, each minus the plain
loop over the same images.
`--real-size N`: then (a), (b) and (c) again over N images, one run per image, with Hunyuan3D at the published
2mini size (random weights written as `bench/gpu_shapes.py` writes them, loaded through hy3dgen's real
`from_pretrained`), octree 16 (the lowest) and one step on the CPU: what the default launcher's load per run
costs when the load is a real one.
`--device-seconds S`: every variant's generator is `bench/simulated_device.py` (S seconds of a simulated
accelerator with the CPU idle, then the extrude backend's work), so that adding a worker adds compute, as a GPU
does, instead of sharing the machine's cores. Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
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
from hy3d_pipeline_tests.services import PostgresServer, RedisServer  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import simulated_device  # noqa: E402
from dev_end_to_end import image  # noqa: E402  (the same images as the dev bench)


def count_models(s3, bucket: str, prefix: str = "models/") -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(1 for page in pages for o in page.get("Contents", []) if o["Key"].endswith(".glb"))


def upload(s3, bucket: str, n: int) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"img/{i:04d}.png", Body=image(i)), range(n)))


def loads(dev) -> tuple[int, int, int]:
    """(runs, distinct generating processes, total generator loads) from the instance."""
    data = dev.graphql('{ runsOrError { ... on Runs { count } } assetOrError(assetKey: {path: ["models_3d"]}) '
                       '{ ... on Asset { assetMaterializations(limit: 10000) { metadataEntries { label '
                       '... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } } } } } }')
    per_worker: dict[str, int] = {}
    for m in data["assetOrError"]["assetMaterializations"]:
        meta = {e["label"]: e.get("text", e.get("intValue")) for e in m["metadataEntries"]}
        if "worker" in meta:
            per_worker[meta["worker"]] = max(per_worker.get(meta["worker"], 0), int(meta.get("generator_loads", 0)))
    return data["runsOrError"]["count"], len(per_worker), sum(per_worker.values())


def plain_loop(s3_env: dict, bucket: str, n: int, tmp: Path, models_prefix: str = "models/") -> float:
    from hy3d_pipeline.models.generators.base import load_generator
    from hy3d_pipeline.models.processing import process_object
    from hy3d_pipeline.models.resources import GeneratorResource
    from hy3d_pipeline.storage.resources import ImageStorage

    os.environ.update({**s3_env, "S3_IMAGES_BUCKET": bucket, "S3_TEMP_DIR": str(tmp / "loop-cache"),
                       "S3_MODELS_PREFIX": models_prefix})
    storage, settings = ImageStorage.from_env(), GeneratorResource.from_env().settings()
    # loaded before the clock starts, as a worker loads its generator when it starts (before any upload here)
    load_generator(settings)
    t0 = time.perf_counter()
    for i in range(n):
        key = f"img/{i:04d}.png"
        process_object(storage, storage.head(bucket, key), key, settings)
    return time.perf_counter() - t0


def busy_cores() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, wall seconds) so far, from /proc/stat: two readings give the cores
    that were busy in between, whatever the processes."""
    fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / tick, time.monotonic()


def cores_between(start: tuple[float, float]) -> float:
    end = busy_cores()
    return (end[0] - start[0]) / max(end[1] - start[1], 1e-9)


def engine(name: str, s3_env: dict, bucket: str, n: int, tmp: Path, env: dict, workers: int, interval: int,
           timeout: float, pin: bool = False) -> dict:
    import subprocess

    folder = tmp / name
    env = {**s3_env, "S3_IMAGES_BUCKET": bucket, "S3_TEMP_DIR": str(folder / "cache"), **env}
    with DevProcess(folder, sensor_interval=interval, env=env) as dev:
        procs = []
        for w in range(workers):
            log = open(folder / f"worker{w}.log", "w")
            # --pin: worker w on core w alone, as a fleet's worker owns its GPU (the loop is one thread on core 0)
            pinned = ["taskset", "-c", str(w % os.cpu_count())] if pin else []
            procs.append(subprocess.Popen([*pinned, sys.executable, "-m", "hy3d_pipeline.cli", "worker"], cwd=folder,
                                          env=dev.env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        for w in range(workers):  # serving, its generator loaded (as the loop's is before its clock starts)
            wait_for(lambda: all(s in (folder / f"worker{w}.log").read_text() for s in ("ready", "loaded in")),
                     1200, f"worker {w}")
        s3 = _client(s3_env)
        t0, cpu0 = time.perf_counter(), busy_cores()
        upload(s3, bucket, n)
        wait_for(lambda: count_models(s3, bucket) >= n, timeout, f"{name}: every model", every=0.5)
        seconds, cores = time.perf_counter() - t0, cores_between(cpu0)
        runs, processes, total_loads = loads(dev)
        for p in procs:
            p.terminate()
            p.wait(30)
    return {"name": name, "seconds": seconds, "runs": runs, "processes": processes, "loads": total_loads,
            "cores": cores}


def _client(s3_env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=s3_env["S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"])


def event_cost(server, s3_env: dict, n: int, tmp: Path, pg: PostgresServer) -> list[tuple[str, float, float]]:
    """(storage, s/image of one in-process run over n images, the same minus the plain loop's): each storage gets
    a bucket of its own with the same images, and the loop runs right before its run over the same bucket (models
    under another prefix), so that load on the machine falls on both alike."""
    import yaml
    from dagster import DagsterInstance, materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.fleet.instance import sqlite_storage
    from hy3d_pipeline.fleet.postgres import psycopg2_url
    from hy3d_pipeline.models.assets import image_to_model

    keys = [f"img/{i:04d}.png" for i in range(n)]
    pooled_url = pg.database("pooled")
    pooled = {k: {"module": "hy3d_pipeline.fleet.postgres", "class": c, "config": {"postgres_url": pooled_url}}
              for k, c in (("run_storage", "RunStorage"), ("event_log_storage", "EventLogStorage"),
                           ("schedule_storage", "ScheduleStorage"))}
    variants = (
        ("SQLite, Dagster's classes", lambda home: {}),
        ("SQLite, hy3d_pipeline.fleet.sqlite", sqlite_storage),
        ("Postgres, dagster-postgres as shipped",
         lambda home: {"storage": {"postgres": {"postgres_url": psycopg2_url(pg.database("stock"))}}}),
        ("Postgres, hy3d_pipeline.fleet.postgres", lambda home: pooled),
    )
    results = []
    for i, (label, config) in enumerate(variants):
        bucket = f"events-{i}"
        server.create_buckets(bucket)
        upload(_client(s3_env), bucket, n)
        loop_s = plain_loop(s3_env, bucket, n, tmp, models_prefix="loop/")
        home = tmp / f"events-{i}"
        home.mkdir()
        (home / "dagster.yaml").write_text(yaml.safe_dump({**config(str(home)), "telemetry": {"enabled": False}}))
        os.environ.update({"S3_IMAGES_BUCKET": bucket, "S3_MODELS_PREFIX": "models/"})
        with DagsterInstance.from_config(str(home)) as instance:
            instance.add_dynamic_partitions("images", keys)
            t0 = time.perf_counter()
            result = materialize([image_to_model], instance=instance, resources=build_defs().resources,
                                 tags={"dagster/asset_partition_range_start": keys[0],
                                       "dagster/asset_partition_range_end": keys[-1]})
            run_s = time.perf_counter() - t0
        made = count_models(_client(s3_env), bucket)  # the run's, under models/ (the loop's are under loop/)
        assert result.success and made == n, f"{label}: {made} of {n} models made by the run"
        results.append((label, run_s / n, (run_s - loop_s) / n))
    return results


def real_size(args, s3_env: dict, server, pg: PostgresServer, redis_server: RedisServer, tmp: Path) -> None:
    from gpu_shapes import MODELS, published_config, write_random_model

    model_path, subfolder, depth, single, latents = MODELS["2mini"]
    models = tmp / "weights"
    t0 = time.perf_counter()
    counts = write_random_model(models, model_path, subfolder, published_config(depth, single, latents, blob=True),
                                build_device="cpu", blob=True)
    print(f"\nwrote a random 2mini-size checkpoint ({sum(counts.values()) / 1e6:.0f} M parameters) in "
          f"{time.perf_counter() - t0:.0f} s")
    gen = {"HY3D_GENERATOR": "hunyuan3d", "HY3DGEN_MODELS": str(models), "HY3D_MODEL_PATH": model_path,
           "HY3D_MODEL_SUBFOLDER": subfolder, "HY3D_OCTREE_RESOLUTION": "16", "HY3D_STEPS": "1",
           "HY3D_DEVICE": "cpu", "HY3D_BATCH_SIZE": "1", "HY3D_MAX_BATCH_SIZE": "1"}
    env = {**s3_env, **gen}
    n = args.real_size
    buckets = {v: f"real-{v}" for v in ("loop", "default", "workers1")}
    server.create_buckets(*buckets.values())
    upload(_client(env), buckets["loop"], n)
    os.environ.update(gen)
    loop_s = plain_loop(env, buckets["loop"], n, tmp)
    rows = [{"name": "plain loop", "seconds": loop_s, "runs": 0, "processes": 1, "loads": 1}]
    for v, extra, workers in (("default", {"HY3D_RUN_LAUNCHER": "default"}, 0),
                              ("workers1", {"HY3D_BROKER_URL": redis_server.url.replace("/0", "/3")}, 1)):
        rows.append(engine(f"real-{v}", env, buckets[v], n, tmp,
                           {**extra, "DAGSTER_PG_URL": pg.database(f"real_{v}")}, workers, args.interval, args.timeout))
    print(f"{n} images, Hunyuan3D 2mini size (random weights), CPU, octree 16, 1 step, one run per image")
    print_rows(rows, n, loop_s)


def print_rows(rows: list[dict], n: int, loop_s: float) -> None:
    print(f"{'variant':<18}{'s/image':>10}{'x loop':>9}{'runs':>6}{'processes':>11}{'loads':>7}"
          f"{'busy cores':>12}  (of {os.cpu_count()})")
    for r in rows:
        print(f"{r['name']:<18}{r['seconds'] / n:>10.3f}{r['seconds'] / loop_s:>9.2f}"
              f"{r['runs']:>6}{r['processes']:>11}{r['loads']:>7}{r.get('cores', float('nan')):>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--interval", type=int, default=2, help="sensor interval, s")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--variants", default="default,workers1,workers2")
    parser.add_argument("--real-size", type=int, default=0, metavar="N", help="images for the 2mini-size variant")
    parser.add_argument("--events", type=int, default=32, help="images of the in-process storage runs (0: none)")
    parser.add_argument("--folder", default=None, help="keep the variants' folders (logs) here, not in a temp dir")
    parser.add_argument("--device-seconds", type=float, default=0.0, metavar="S", help="each image also holds a "
                        "simulated accelerator for S s, CPU idle (bench/simulated_device.py)")
    parser.add_argument("--pin", action="store_true", help="the loop on core 0, worker w on core w alone (one "
                        "compute unit per worker, as a fleet's GPU; the servers and the daemon run anywhere)")
    args = parser.parse_args()

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3

    with (tempfile.TemporaryDirectory() if args.folder is None else contextlib.nullcontext(args.folder)) as tmp_name, \
            PostgresServer(durable=True) as pg, RedisServer() as redis_server:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        with SeaweedS3(data_dir=tmp / "s3") as server:
            generator = {"HY3D_GENERATOR": "extrude"}
            if args.device_seconds:
                found = simulated_device.declare(tmp / "simulated-device")
                sys.path[:0] = found
                generator = {"HY3D_GENERATOR": simulated_device.NAME,
                             "HY3D_BENCH_DEVICE_SECONDS": str(args.device_seconds),
                             "PYTHONPATH": os.pathsep.join([str(ROOT), *found])}
            s3_env = {**server.client_env(), **generator}
            os.environ.update(s3_env)
            buckets = {v: f"fleet-{v}" for v in ["loop", *filter(None, args.variants.split(","))]}
            server.create_buckets(*buckets.values())
            upload(_client(s3_env), buckets["loop"], args.images)
            if args.pin:
                os.sched_setaffinity(0, {0})
            cpu0 = busy_cores()
            loop_s = plain_loop(s3_env, buckets["loop"], args.images, tmp)
            rows = [{"name": "plain loop", "seconds": loop_s, "runs": 0, "processes": 1, "loads": 1,
                     "cores": cores_between(cpu0)}]
            os.sched_setaffinity(0, range(os.cpu_count()))
            variant_env = {
                "default": ({"HY3D_RUN_LAUNCHER": "default"}, 0),
                "workers1": ({"HY3D_BROKER_URL": redis_server.url.replace("/0", "/1")}, 1),
                "workers2": ({"HY3D_BROKER_URL": redis_server.url.replace("/0", "/2"), "HY3D_GPU_SLOTS": "2"}, 2),
            }
            for v in filter(None, args.variants.split(",")):
                env, workers = variant_env[v]
                env = {**env, "DAGSTER_PG_URL": pg.database(f"v_{v}")}
                rows.append(engine(v, s3_env, buckets[v], args.images, tmp, env, workers, args.interval, args.timeout,
                                   pin=args.pin))
            backend = (f"extrude behind a simulated accelerator ({args.device_seconds:g} s per image)"
                       if args.device_seconds else "extrude backend")
            print(f"\n{args.images} images, {backend}, Postgres storage, sensor interval {args.interval} s"
                  f"{', workers and loop pinned to a core each' if args.pin else ''}")
            print_rows(rows, args.images, loop_s)
            by = {r["name"]: r for r in rows}
            if "workers1" in by and "workers2" in by:
                print(f"2 workers: {by['workers1']['seconds'] / by['workers2']['seconds']:.2f}x the throughput of 1")

            n = args.events
            if n:
                print(f"\nOne in-process run of {n} images per storage, and its cost beyond a plain loop run just before:")
            for label, per_image, cost in (event_cost(server, s3_env, n, tmp, pg) if n else []):
                print(f"  {label:<42}{per_image:>8.3f} s/image, {cost:>+8.3f} s/image beyond the loop")
            if args.real_size:
                real_size(args, s3_env, server, pg, redis_server, tmp)


if __name__ == "__main__":
    main()
