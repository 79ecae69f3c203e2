"""Seconds per image through the Dagster assets, against a plain loop doing the same work in one process.

    python3 bench/pipeline_overhead.py                       # 32 images, batches of 8, tiny Hunyuan3D model, CPU
    python3 bench/pipeline_overhead.py --images 16 --batch 4 --octree 64 --steps 3
    python3 bench/pipeline_overhead.py --generator extrude   # no model at all

Target (product spec): seconds per image through the assets, batched runs, tiny Hunyuan model on CPU, at most
1.3 x the baseline. The baseline is a plain loop in one process: list the bucket, then for each object
`process_object` (everything the product does to one image: check existing, download, prepare, generate, and
whatever else it does today, export, upload) with the same warm generator.

Starts its own SeaweedFS on 127.0.0.1 in a temp dir, writes the tiny Hunyuan3D checkpoint
(`hy3d_pipeline_tests.tiny_hunyuan`) in a temp `HY3DGEN_MODELS`, uploads `--images` distinct small RGBA PNGs
(sizes, shapes and colours vary). Before anything is timed, the generator is loaded once (`load_generator`), one
image goes through `process_object` and one (skipped-existing) Dagster run executes, so every variant uses the
same warm model and none pays first-call costs. Then, each with its own models prefix so nothing is skipped as
already existing:

  (a) baseline  list the bucket (boto3's paginator), then `process_object` per object
  (b) batched   fresh Dagster instance on the storage `demo` and `dev` keep (`local_instance`); the sensor
                evaluated once with HY3D_BATCH_SIZE=--batch and its records applied (timed); each RunRequest
                executed in-process by the product's `execute_sensor_result` (what `hy3d-pipeline demo` does), log level ERROR
  (c) per-image the same with HY3D_BATCH_SIZE=HY3D_MAX_BATCH_SIZE=1: one run per image

The work is interleaved so that load from anything else on the machine falls on all three alike: the batched
variant's runs define groups of images, and each group is done by (a), (b) and (c) back to back, in rotating
order. Prints seconds per image per group and in total for each variant with its ratio to (a), the fixed cost of
one Dagster run derived from them, the baseline's seconds per stage, and a check that every image got a model in
every variant (the object in S3 and, for (b)/(c), a `models_3d` materialization). Timings are only printed,
never asserted.

torch runs with 1 thread by default (`--torch-threads 0` for torch's default): on a small shared CPU two OpenMP
threads stall for seconds whenever another thread wants the CPU, which swamps the figure being measured (both
sides get the same setting).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # hy3d_pipeline_tests is not installed; run from a checkout
    sys.path.insert(0, str(ROOT))

BUCKET = "bench-images"
IMAGES_PREFIX = "images/"
TINY_MODEL = "tiny/Hunyuan3D-tiny"
TINY_SUBFOLDER = "hunyuan3d-dit-v2-0"
SHAPES = ("disc", "box", "triangle", "ring", "cross")


def image_bytes(i: int) -> bytes:
    """A distinct small RGBA PNG: size, aspect, shape and colour all vary with i."""
    from PIL import Image, ImageDraw

    w = 64 + (i * 13) % 72
    h = 64 + (i * 29) % 72
    color = (40 + (i * 53) % 200, 40 + (i * 97) % 200, 40 + (i * 31) % 200, 255)
    img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    shape = SHAPES[i % len(SHAPES)]
    box = (w * 0.15, h * 0.15, w * 0.85, h * 0.85)
    if shape == "disc":
        d.ellipse(box, fill=color)
    elif shape == "box":
        d.rectangle((w * 0.2, h * 0.3, w * 0.8, h * 0.7), fill=color)
    elif shape == "triangle":
        d.polygon([(w * 0.5, h * 0.1), (w * 0.9, h * 0.9), (w * 0.1, h * 0.9)], fill=color)
    elif shape == "ring":
        d.ellipse(box, fill=color)
        d.ellipse((w * 0.35, h * 0.35, w * 0.65, h * 0.65), fill=(0, 0, 0, 0))
    else:
        d.rectangle((w * 0.4, h * 0.1, w * 0.6, h * 0.9), fill=color)
        d.rectangle((w * 0.1, h * 0.4, w * 0.9, h * 0.6), fill=color)
    d.point((i % w, (i // w) % h), fill=(255, 255, 255, 255))  # distinct bytes even when the shape repeats
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def models_present(storage, keys: list[str], output_format: str) -> int:
    """How many of the images have a model object under the storage's models prefix."""
    from hy3d_pipeline.images.partitions import relative_key_for

    return sum(
        storage.head_or_none(storage.models_bucket_name, storage.model_key(relative_key_for(k), output_format))
        is not None
        for k in keys
    )


@dataclass
class Variant:
    """One side of the comparison: what it is, where its models go, and what it has cost so far."""

    key: str
    label: str
    prefix: str
    batch: int = 0
    seconds: float = 0.0  # everything timed for this variant: listing/tick + all processing
    setup: float = 0.0  # the listing (baseline) or the sensor tick (product)
    runs: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    defs: Any = None
    instance: Any = None
    requests: list = field(default_factory=list)  # product: (partitions covered, RunRequest)
    storage: Any = None
    infos: dict = field(default_factory=dict)  # baseline: partition -> ObjectInfo
    stages: dict[str, float] = field(default_factory=dict)


def _env(variant: Variant) -> None:
    os.environ["S3_MODELS_PREFIX"] = variant.prefix
    if variant.batch:
        os.environ["HY3D_BATCH_SIZE"] = str(variant.batch)
        # bursts are otherwise batched bigger (burst_batch_size): a run carries exactly --batch here
        os.environ["HY3D_MAX_BATCH_SIZE"] = str(variant.batch)


def covered(request, order: list[str]) -> list[str]:
    """The partitions one RunRequest covers: its partition key, or its partition range in the partition order."""
    if request.partition_key:
        return [request.partition_key]
    start = order.index(request.tags["dagster/asset_partition_range_start"])
    end = order.index(request.tags["dagster/asset_partition_range_end"])
    return order[start:end + 1]


def baseline_list(v: Variant) -> None:
    """The plain loop's first step: list the bucket with boto3's paginator (what anyone would write)."""
    from hy3d_pipeline.images.partitions import partition_key_for
    from hy3d_pipeline.storage.resources import ImageStorage, ObjectInfo

    _env(v)
    v.storage = storage = ImageStorage.from_env()
    start = time.perf_counter()
    pages = storage.client().get_paginator("list_objects_v2").paginate(
        Bucket=storage.images_bucket, Prefix=storage.images_prefix)
    for page in pages:
        for obj in page.get("Contents", ()):
            info = ObjectInfo(storage.images_bucket, obj["Key"], obj["ETag"].strip('"'), int(obj["Size"]),
                              obj.get("LastModified"))
            v.infos[partition_key_for(storage.relative_key(info.key))] = info
    v.setup = time.perf_counter() - start
    v.seconds += v.setup


def baseline_process(v: Variant, partitions: list[str], settings) -> None:
    from hy3d_pipeline.models.processing import process_object

    _env(v)
    for key in partitions:
        start = time.perf_counter()
        try:
            outcome = process_object(v.storage, v.infos[key], key, settings)
            for stage, secs in outcome.timings.items():
                v.stages[stage] = v.stages.get(stage, 0.0) + secs
        except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
            v.failures[key] = f"{type(exc).__name__}: {exc}"
        v.seconds += time.perf_counter() - start


def product_tick(v: Variant, tmp: Path, stack: contextlib.ExitStack) -> None:
    """Fresh instance; the sensor evaluated once and what it records applied, as the daemon does before it
    launches the tick's runs (timed)."""
    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.embedded.demo import execute_sensor_result, tick
    from hy3d_pipeline.fleet.instance import local_instance
    from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME

    _env(v)
    v.defs = build_defs()  # reads the environment now
    home = tmp / f"dagster-{v.key}"
    home.mkdir()
    v.instance = stack.enter_context(local_instance(home))
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the sensor's INFO line
        result = tick(v.defs, v.instance)
    # execute_sensor_result applies the tick's records (partitions, ...) and then runs its requests; the records
    # now, the requests one by one below, interleaved with the other variants
    records = SimpleNamespace(run_requests=[], dynamic_partitions_requests=result.dynamic_partitions_requests,
                              asset_events=getattr(result, "asset_events", None))
    execute_sensor_result(v.defs, v.instance, records, log_level="ERROR")
    v.setup = time.perf_counter() - start
    v.seconds += v.setup
    order = v.instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME)
    v.requests = [(covered(r, order), r) for r in result.run_requests or []]


def product_run(v: Variant, request) -> None:
    """One RunRequest, executed in-process by the product's own `execute_sensor_result`."""
    from hy3d_pipeline.embedded.demo import execute_sensor_result

    _env(v)
    one = SimpleNamespace(run_requests=[request], dynamic_partitions_requests=[], asset_events=[])
    start = time.perf_counter()
    runs, failures = execute_sensor_result(v.defs, v.instance, one, log_level="ERROR")
    v.seconds += time.perf_counter() - start
    v.runs += runs
    v.failures.update(failures)


def warm_dagster(tmp: Path, partition: str) -> float:
    """One throwaway in-process run (its model already exists, so it is recorded as skipped): Dagster's
    first-run costs in this process (imports, code paths) are paid here, not by whichever variant runs first."""
    from dagster import materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.fleet.instance import local_instance
    from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME
    from hy3d_pipeline.models.assets import image_to_model

    os.environ["S3_MODELS_PREFIX"] = "models-warmup/"
    defs = build_defs()
    home = tmp / "dagster-warmup"
    home.mkdir()
    with local_instance(home) as instance:
        start = time.perf_counter()
        instance.add_dynamic_partitions(IMAGES_PARTITIONS_NAME, [partition])
        materialize([image_to_model], instance=instance, resources=defs.resources, partition_key=partition,
                    run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="HY3D_BATCH_SIZE of the batched variant")
    parser.add_argument("--octree", type=int, default=64, help="HY3D_OCTREE_RESOLUTION")
    parser.add_argument("--steps", type=int, default=3, help="HY3D_STEPS")
    parser.add_argument("--generator", choices=("hunyuan3d", "extrude"), default="hunyuan3d")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads for both sides (0: torch's default). 1 by default: on a small "
                        "shared CPU, 2 OpenMP threads stall for seconds whenever anything else runs")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # dagster beta/preview notices

    from concurrent.futures import ThreadPoolExecutor

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3

    total_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hy3d-bench-")))
        server = stack.enter_context(SeaweedS3(data_dir=tmp / "s3"))
        os.environ.update(server.client_env())
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "S3_MODELS_BUCKET", "DAGSTER_HOME", "HY3D_FLASHVDM",
                    "HY3D_NUM_CHUNKS", "HY3D_MAX_FACES", "HY3D_SEED", "HY3D_GUIDANCE_SCALE"):
            os.environ.pop(var, None)
        os.environ.update({
            "S3_IMAGES_BUCKET": BUCKET,
            "S3_IMAGES_PREFIX": IMAGES_PREFIX,
            "S3_TEMP_DIR": str(tmp / "cache"),
            "S3_CLEANUP_TEMP_FILES": "true",
            "HY3D_GENERATOR": args.generator,
            "HY3D_OUTPUT_FORMAT": "glb",
            "HY3D_TEXTURE": "none",
            "HY3D_DEVICE": "cpu",
            "HY3D_OCTREE_RESOLUTION": str(args.octree),
            "HY3D_STEPS": str(args.steps),
        })
        server.create_buckets(BUCKET)
        threads = ""
        if args.generator == "hunyuan3d":
            import torch

            if args.torch_threads > 0:
                torch.set_num_threads(args.torch_threads)
            threads = f", torch threads {torch.get_num_threads()}"
        print(f"SeaweedFS at {server.endpoint_url}; {os.cpu_count()} CPU(s){threads}; generator {args.generator}",
              flush=True)

        if args.generator == "hunyuan3d":
            from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model, count_parameters

            models_root = tmp / "hy3dgen-models"
            os.environ.update({"HY3DGEN_MODELS": str(models_root), "HY3D_MODEL_PATH": TINY_MODEL,
                               "HY3D_MODEL_SUBFOLDER": TINY_SUBFOLDER})
            build_tiny_model(models_root, TINY_MODEL, TINY_SUBFOLDER)
            logging.getLogger("hy3dgen.shapgen").setLevel(logging.WARNING)  # hy3dgen sets INFO on import
            print(f"tiny Hunyuan3D model ({count_parameters(models_root, TINY_MODEL, TINY_SUBFOLDER):,} parameters) "
                  f"in {models_root}; octree {args.octree}, {args.steps} steps", flush=True)

        from hy3d_pipeline.images.partitions import partition_key_for
        from hy3d_pipeline.models.generators.base import load_count, load_generator
        from hy3d_pipeline.models.processing import process_object
        from hy3d_pipeline.models.resources import GeneratorResource
        from hy3d_pipeline.storage.resources import ImageStorage

        storage = ImageStorage.from_env()
        client = storage.client()
        n = args.images
        keys = [f"{IMAGES_PREFIX}img-{i:04d}.png" for i in range(n)]
        bodies = [image_bytes(i) for i in range(n)]
        assert len(set(bodies)) == len(bodies), "images must differ"
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kb: client.put_object(Bucket=BUCKET, Key=kb[0], Body=kb[1], ContentType="image/png"),
                          zip(keys, bodies)))
        partitions = [partition_key_for(k[len(IMAGES_PREFIX):]) for k in keys]
        print(f"uploaded {n} distinct RGBA PNGs ({min(map(len, bodies))}-{max(map(len, bodies))} bytes)", flush=True)

        # one warm model for every variant: the same settings the assets derive from the environment
        settings = GeneratorResource.from_env().settings()
        t = time.perf_counter()
        load_generator(settings)
        loaded = time.perf_counter() - t
        t = time.perf_counter()
        os.environ["S3_MODELS_PREFIX"] = "models-warmup/"
        warm_storage = ImageStorage.from_env()
        process_object(warm_storage, warm_storage.head(BUCKET, keys[0]), partitions[0], settings)
        warm = time.perf_counter() - t
        cold_run = warm_dagster(tmp, partitions[0])
        print(f"warm-up, not timed below: load_generator {loaded:.2f} s, one image through process_object "
              f"{warm:.2f} s, one (skipped-existing) Dagster run {cold_run:.2f} s; every variant reuses this warm "
              "generator", flush=True)
        loads_before = dict(load_count)

        a = Variant("a", "(a) baseline: plain loop over process_object", "models-baseline/")
        b = Variant("b", f"(b) product: sensor tick + runs of {args.batch} images", "models-batched/",
                    batch=args.batch)
        c = Variant("c", "(c) product: sensor tick + one run per image", "models-single/", batch=1)
        baseline_list(a)
        product_tick(b, tmp, stack)
        product_tick(c, tmp, stack)
        singles = {parts[0]: r for parts, r in c.requests}

        # the batched variant's runs define the groups; each group is done by all three variants back to back, in
        # rotating order, so load from anything else on the machine falls on all three alike
        print(f"{len(b.requests)} groups (the batched runs), each done by (a), (b) and (c) in turn:", flush=True)
        ratios = []
        for g, (parts, request) in enumerate(b.requests):
            before = {v.key: v.seconds for v in (a, b, c)}
            steps = {
                "a": lambda: baseline_process(a, parts, settings),
                "b": lambda: product_run(b, request),
                "c": lambda: [product_run(c, singles[k]) for k in parts if k in singles],
            }
            for key in "abc"[g % 3:] + "abc"[:g % 3]:
                steps[key]()
            spent = {v.key: (v.seconds - before[v.key]) / len(parts) for v in (a, b, c)}
            ratios.append(spent["b"] / spent["a"])
            print(f"  group {g + 1}: {len(parts)} images, s/image (a) {spent['a']:.3f}, (b) {spent['b']:.3f}, "
                  f"(c) {spent['c']:.3f}; b/a {spent['b'] / spent['a']:.2f}, c/a {spent['c'] / spent['a']:.2f}",
                  flush=True)
        leftovers = [k for k in partitions if k not in {p for parts, _ in b.requests for p in parts}]
        if leftovers:  # only if the batched tick did not request every image
            print(f"  {len(leftovers)} image(s) not requested by the batched tick; done by (a) and (c) alone")
            baseline_process(a, leftovers, settings)
            for k in leftovers:
                if k in singles:
                    product_run(c, singles[k])

        from dagster import AssetKey

        reloaded = {k: v - loads_before.get(k, 0) for k, v in load_count.items() if v != loads_before.get(k, 0)}
        complete = True
        rows = []
        for v in (a, b, c):
            _env(v)
            present = models_present(v.storage or v.defs.resources["storage"], partitions, "glb")
            note = f"models {present}/{n}, failed {len(v.failures)}"
            if v.instance is not None:
                done = set(v.instance.get_materialized_partitions(AssetKey("models_3d"))) & set(partitions)
                note += f", materialized {len(done)}/{n}, {v.runs} runs, tick {v.setup:.2f} s"
                complete &= len(done) == n
            else:
                note += f", listing {v.setup:.2f} s"
            complete &= present == n
            rows.append((v, note))
            for k, msg in list(v.failures.items())[:5]:
                print(f"    {v.key} failure: {k}: {msg}")

        per_stage = ", ".join(f"{k.removesuffix('_s')} {s / n:.3f}" for k, s in a.stages.items() if s / n >= 0.0005)
        print()
        print(f"baseline s/image by stage (process_object's Timer): {per_stage}")
        tiny = f" (tiny model, octree {args.octree}, {args.steps} steps, CPU)" if args.generator == "hunyuan3d" else ""
        print(f"{n} images, generator {args.generator}{tiny}")
        base = a.seconds / n
        print(f"{'variant':<50} {'s/image':>8} {'x base':>7}  notes")
        for v, note in rows:
            print(f"{v.label:<50} {v.seconds / n:>8.3f} {v.seconds / n / base:>7.2f}  {note}")
        per_c = (c.seconds - a.seconds) / max(c.runs, 1)
        per_b = (b.seconds - a.seconds) / max(b.runs, 1)
        print(f"fixed cost per Dagster run: (c - a) / {c.runs} runs = {per_c:.3f} s; "
              f"(b - a) / {b.runs} runs = {per_b:.3f} s")
        print(f"every image got a model in every variant: {'yes' if complete else 'NO'}; "
              f"generator reloads during the variants: {reloaded or 'none'}")
        ratio = b.seconds / a.seconds
        print(f"target: batched <= 1.3 x baseline: {ratio:.2f} x -> {'met' if ratio <= 1.3 else 'NOT met'} "
              f"(per group b/a: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f})")
        print(f"total bench time {time.perf_counter() - total_start:.1f} s")


if __name__ == "__main__":
    main()
