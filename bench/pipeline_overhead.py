"""Seconds per image through the Dagster assets, against a plain loop doing the same work in one process.

    python3 bench/pipeline_overhead.py                       # 32 images, batches of 8, tiny Hunyuan3D model, CPU
    python3 bench/pipeline_overhead.py --images 16 --batch 4 --octree 64 --steps 3
    python3 bench/pipeline_overhead.py --generator extrude   # no model at all
    python3 bench/pipeline_overhead.py --rounds 1            # quicker, noisier

Target (product spec): seconds per image through the assets, batched runs, tiny Hunyuan model on CPU, at most
1.3 x the baseline. The baseline is a plain loop in one process: list the bucket, then for each object
`process_object` (check existing, download, prepare, generate, export, upload) with the same warm generator.

Starts its own SeaweedFS on 127.0.0.1 in a temp dir, writes the tiny Hunyuan3D checkpoint
(`hy3d_pipeline_tests.tiny_hunyuan`) in a temp `HY3DGEN_MODELS`, uploads `--images` distinct small RGBA PNGs
(sizes, shapes and colours vary), loads the generator once (`load_generator`) and runs one warm-up image, so
every variant below uses the same warm model in this process. Then, each with its own models prefix so nothing
is skipped as already existing:

  (a) baseline  plain loop over `process_object`
  (b) batched   fresh Dagster instance; one sensor tick with HY3D_BATCH_SIZE=--batch; its partitions applied and
                each RunRequest executed in-process as the daemon's runs are (`execute_sensor_result`, which is
                what `hy3d-pipeline demo` does); the tick is included in the time
  (c) per-image the same with HY3D_BATCH_SIZE=1: one run per image

The three variants run interleaved for `--rounds` rounds (default 3; fresh prefixes and instances each round) and
the median round is reported: seconds per image for each variant and its ratio to (a), the fixed cost of one
Dagster run derived from them, and a check that every image got a model in every variant and round (the object
in S3 and, for (b)/(c), a `models_3d` materialization). Timings are only printed, never asserted.

Before anything is timed: the generator is loaded once, one image goes through `process_object` and one
(skipped-existing) Dagster run executes, so neither side pays first-call costs. torch runs with 1 thread by
default (`--torch-threads 0` for torch's default): on a small shared CPU two OpenMP threads stall for seconds
whenever another thread wants the CPU, which swamps the figure being measured (both sides get the same setting).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

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
    import io

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
    """How many of the images have a model object under the storage's current models prefix."""
    from hy3d_pipeline.images.partitions import relative_key_for

    return sum(
        storage.head_or_none(storage.models_bucket_name, storage.model_key(relative_key_for(k), output_format))
        is not None
        for k in keys
    )


def run_baseline(settings, prefix: str) -> tuple[float, int, list[str]]:
    """(seconds, images done, errors): list the bucket, then process_object per object, in one loop."""
    from hy3d_pipeline.images.partitions import partition_key_for
    from hy3d_pipeline.models.processing import process_object
    from hy3d_pipeline.s3.resources import ImageStorage

    os.environ["S3_MODELS_PREFIX"] = prefix
    storage = ImageStorage.from_env()
    errors: list[str] = []
    done = 0
    start = time.perf_counter()
    for page in storage.list_objects(storage.images_bucket, storage.images_prefix):
        for info in page:
            try:
                outcome = process_object(storage, info, partition_key_for(storage.relative_key(info.key)), settings)
                done += not outcome.skipped
            except Exception as exc:  # noqa: BLE001 - reported, the bench goes on
                errors.append(f"{info.key}: {type(exc).__name__}: {exc}")
    return time.perf_counter() - start, done, errors


def run_product(tmp: Path, name: str, prefix: str, batch: int):
    """(seconds total, seconds in the tick, runs, failures, storage, materialized model partitions)."""
    from dagster import AssetKey, DagsterInstance

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.embedded.demo import execute_sensor_result, tick

    os.environ["S3_MODELS_PREFIX"] = prefix
    os.environ["HY3D_BATCH_SIZE"] = str(batch)
    defs = build_defs()  # reads the environment now
    home = tmp / f"dagster-{name}"
    home.mkdir()
    with DagsterInstance.local_temp(tempdir=str(home)) as instance:
        start = time.perf_counter()
        result = tick(defs, instance)
        ticked = time.perf_counter() - start
        runs, failures = execute_sensor_result(defs, instance, result, log_level="ERROR")
        elapsed = time.perf_counter() - start
        materialized = set(instance.get_materialized_partitions(AssetKey("models_3d")))
    return elapsed, ticked, runs, failures, defs.resources["storage"], materialized


def warm_dagster(tmp: Path, partition: str) -> float:
    """One throwaway in-process run (its model already exists, so it is recorded as skipped): Dagster's
    first-run costs in this process (imports, code paths) are paid here, not by whichever variant runs first."""
    from dagster import DagsterInstance, materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME
    from hy3d_pipeline.models.assets import image_to_model

    os.environ["S3_MODELS_PREFIX"] = "models-warmup/"
    defs = build_defs()
    home = tmp / "dagster-warmup"
    home.mkdir()
    with DagsterInstance.local_temp(tempdir=str(home)) as instance:
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
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of (a), (b), (c); the median round is reported")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads for both sides (0: torch's default). 1 by default: on a small "
                        "shared CPU, 2 OpenMP threads stall for seconds whenever anything else runs")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # dagster beta/preview notices
    logging.getLogger("hy3dgen.shapgen").setLevel(logging.WARNING)

    from concurrent.futures import ThreadPoolExecutor

    from hy3d_pipeline.embedded.seaweedfs import SeaweedS3

    total_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hy3d-bench-") as tmp_name, \
            SeaweedS3(data_dir=Path(tmp_name) / "s3") as server:
        tmp = Path(tmp_name)
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
            print(f"tiny Hunyuan3D model ({count_parameters(models_root, TINY_MODEL, TINY_SUBFOLDER):,} parameters) "
                  f"in {models_root}; octree {args.octree}, {args.steps} steps", flush=True)

        from hy3d_pipeline.images.partitions import partition_key_for
        from hy3d_pipeline.models.generators.base import load_count, load_generator
        from hy3d_pipeline.models.processing import process_object
        from hy3d_pipeline.models.resources import GeneratorResource
        from hy3d_pipeline.s3.resources import ImageStorage

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
        print(f"warm-up, not timed below: load_generator {loaded:.2f} s, one image through process_object {warm:.2f} s, "
              f"one (skipped-existing) Dagster run {cold_run:.2f} s; every variant reuses this warm generator",
              flush=True)
        loads_before = dict(load_count)

        labels = {
            "a": "(a) baseline: plain loop over process_object",
            "b": f"(b) product: sensor tick + runs of {args.batch} images",
            "c": "(c) product: sensor tick + one run per image",
        }
        seconds: dict[str, list[float]] = {k: [] for k in labels}
        notes: dict[str, list[str]] = {k: [] for k in labels}
        complete = True
        for r in range(1, args.rounds + 1):
            line = []
            prefix = f"models-r{r}-baseline/"
            secs, done, errors = run_baseline(settings, prefix)
            os.environ["S3_MODELS_PREFIX"] = prefix
            present = models_present(ImageStorage.from_env(), partitions, "glb")
            complete &= present == n
            seconds["a"].append(secs)
            notes["a"].append(f"models {present}/{n}, errors {len(errors)}")
            for e in errors[:5]:
                print(f"    baseline error: {e}")
            line.append(f"(a) {secs / n:.3f}")
            for v, name, batch in (("b", "batched", args.batch), ("c", "single", 1)):
                prefix = f"models-r{r}-{name}/"
                secs, ticked, runs, failures, st, materialized = run_product(tmp, f"r{r}-{name}", prefix, batch)
                present = models_present(st, partitions, "glb")
                done = len(materialized & set(partitions))
                complete &= present == n and done == n
                seconds[v].append(secs)
                notes[v].append(f"models {present}/{n}, materialized {done}/{n}, {runs} runs, "
                                f"tick {ticked:.2f} s, failed {len(failures)}")
                for k, msg in list(failures.items())[:5]:
                    print(f"    {name} failure: {k}: {msg}")
                line.append(f"({v}) {secs / n:.3f}")
            print(f"round {r}: s/image " + ", ".join(line)
                  + f"; ratios b/a {seconds['b'][-1] / seconds['a'][-1]:.2f}, c/a {seconds['c'][-1] / seconds['a'][-1]:.2f}",
                  flush=True)

        reloaded = {k: v - loads_before.get(k, 0) for k, v in load_count.items() if v != loads_before.get(k, 0)}
        med = {v: statistics.median(s) / n for v, s in seconds.items()}
        print()
        print(f"median of {args.rounds} round(s), {n} images, generator {args.generator}"
              + (f" (tiny model, octree {args.octree}, {args.steps} steps, CPU)" if args.generator == "hunyuan3d" else ""))
        print(f"{'variant':<50} {'s/image':>8} {'x base':>7}  last round")
        for v, label in labels.items():
            print(f"{label:<50} {med[v]:>8.3f} {med[v] / med['a']:>7.2f}  {notes[v][-1]}")
        runs_b = -(-n // args.batch)
        print(f"fixed cost per Dagster run, from the medians: (c - a) / {n} runs = "
              f"{(med['c'] - med['a']):.3f} s; (b - a) / {runs_b} runs = {(med['b'] - med['a']) * n / runs_b:.3f} s")
        print(f"every image got a model in every variant and round: {'yes' if complete else 'NO'}; "
              f"generator reloads during the variants: {reloaded or 'none'}")
        ratio = med["b"] / med["a"]
        print(f"target: batched <= 1.3 x baseline: {ratio:.2f} x -> {'met' if ratio <= 1.3 else 'NOT met'}")
        print(f"total bench time {time.perf_counter() - total_start:.1f} s")


if __name__ == "__main__":
    main()
