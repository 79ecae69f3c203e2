"""`hy3d-pipeline demo`: one pass of exactly what the daemon does, in this process.

The sensor's own evaluation decides what is new; its partition additions are applied and its run requests are
executed in-process with the same job, tags and resources the daemon would use. Then every image's model is
reported, including those made by earlier runs.
"""

from __future__ import annotations

import contextlib
import os
import time

from dagster import DagsterInstance, build_sensor_context, materialize

from hy3d_pipeline.embedded import setup


def apply_sensor_records(instance, result) -> None:
    """What the daemon records from a tick before launching its runs: partitions added or deleted, and the
    tick's asset events (deletion marks)."""
    from dagster import AddDynamicPartitionsRequest

    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    for event in result.asset_events or []:
        instance.report_runless_asset_event(event)


def execute_sensor_result(defs, instance, result, log_level: str = "WARNING") -> tuple[int, dict[str, str]]:
    """Apply a sensor's result like the daemon: partitions first, then each run request, in-process.
    Returns (runs executed, failure message per partition key)."""
    from hy3d_pipeline.fleet.liveness import in_process_tags
    from hy3d_pipeline.images.partitions import RANGE_START_TAG
    from hy3d_pipeline.models.assets import image_to_model, step_failures

    apply_sensor_records(instance, result)
    failures: dict[str, str] = {}
    for request in result.run_requests or []:
        outcome = materialize(
            [image_to_model], instance=instance, resources=defs.resources, selection=request.asset_selection,
            partition_key=request.partition_key, tags={**request.tags, **in_process_tags()}, raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        )
        for event in outcome.get_step_failure_events():
            failed = step_failures(event.step_failure_data.user_failure_data)
            if failed is not None:
                failures.update(failed)
            else:
                failures[request.partition_key or request.tags.get(RANGE_START_TAG, "?")] = str(
                    event.step_failure_data.error.message if event.step_failure_data.error else "run failed")
    return len(result.run_requests or []), failures


def download_model(storage, model_key: str):
    """A local copy of a model under HY3D_OUTPUT_DIR, so a laptop user can open it straight away."""
    from hy3d_pipeline.core import output_dir

    path = output_dir().absolute() / model_key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(storage.read(storage.models_bucket_name, model_key) or b"")
    return path


def recover_dead_runs(instance, out=print) -> list[str]:
    """A demo killed earlier (kill -9) left its run STARTED, holding the only `gpu` slot: fail it and free the
    slot. No daemon retries it here, so it is marked as not to be retried: the sensor requests its images again."""
    from hy3d_pipeline.dagster_private import WILL_RETRY_TAG
    from hy3d_pipeline.fleet.liveness import fail_dead_runs

    failed = fail_dead_runs(instance, log=out)
    for run_id in failed:
        instance.add_run_tags(run_id, {WILL_RETRY_TAG: "false"})
    return failed


def tick(defs, instance, cursor: str | None = None):
    """The sensor's tick, evaluated as the daemon evaluates it."""
    from hy3d_pipeline.dagster_private import evaluate_sensor

    sensor_def = defs.resolve_sensor_def("new_images_sensor")
    context = build_sensor_context(instance=instance, resources=defs.resources, definitions=defs, cursor=cursor,
                                   instance_ref=instance.get_ref())
    return evaluate_sensor(sensor_def, context)


def run_demo(out=print) -> int:
    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.images.sensors import list_images
    from hy3d_pipeline.images.partitions import relative_key_for
    from hy3d_pipeline.models.resources import GeneratorResource
    from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        setup.enter_embedded_default(stack, out)
        defs = build_defs()
        storage: ImageStorage = defs.resources["storage"]
        if not storage.images_bucket:  # S3_ENDPOINT_URL alone: configured, but no bucket to guess
            out(f"demo failed: {NO_BUCKET}")
            return 1
        instance = stack.enter_context(DagsterInstance.get())
        # one tick and done: images of an unfinished run are requested again now, not after a backoff that
        # only a later tick would honour
        os.environ.setdefault("HY3D_RETRY_BACKOFF_SECONDS", "0")
        recover_dead_runs(instance, out)
        data = tick(defs, instance)
        runs, failures = execute_sensor_result(defs, instance, data)
        out(f"{runs} run(s) executed for new or changed images; {len(failures)} image(s) failed")
        settings = GeneratorResource.from_env().settings()
        failed = 0
        for key in list_images(storage):
            model_key = storage.model_key(relative_key_for(key), settings.output_format)
            head = storage.head_or_none(storage.models_bucket_name, model_key)
            if head:
                local = download_model(storage, model_key)
                out(f"  {key} -> s3://{storage.models_bucket_name}/{model_key} ({head.size} bytes), "
                    f"copy at {local}")
            else:
                failed += 1
                out(f"  {key} -> FAILED: {failures.get(key, 'no model yet; see the Dagster run logs')}")
        if storage.endpoint_url:
            out(f"models are served by {storage.endpoint_url}; Dagster history is in {instance.root_directory}")
        out(f"demo finished in {time.perf_counter() - start:.1f} s")
        return 1 if failed else 0

