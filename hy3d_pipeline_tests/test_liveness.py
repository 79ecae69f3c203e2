"""A run whose process is SIGKILLed, under a launcher that cannot check its workers (Dagster's DefaultRunLauncher,
and the in-process runs of `demo`): `dead_runs_sensor` reports it failed and frees its `gpu` slot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter, build_sensor_context

from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import ROOT, wait_for

CHILD = textwrap.dedent("""
    import sys
    from dagster import DagsterInstance, materialize
    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.models.assets import image_to_model
    keys = sys.argv[1:]
    defs = build_defs()
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("images", keys)
        materialize([image_to_model], instance=instance, resources=defs.resources, raise_on_error=False,
                    tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]})
""")


def test_sigkilled_run_is_failed_and_frees_its_slot(s3_env, s3, monkeypatch, tmp_path):
    from hy3d_pipeline.fleet.instance import prepare_dagster_home
    from hy3d_pipeline.fleet.sensors import dead_runs_sensor

    monkeypatch.setenv("HY3D_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HY3D_RUN_LAUNCHER", "default")
    prepare_dagster_home()
    keys = [f"k/{i:02d}.png" for i in range(40)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=s3_env["bucket"], Key=key, Body=png_bytes((48 + i, 64)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, *keys], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        with DagsterInstance.get() as instance:
            def running():
                runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
                return runs and runs[0].tags.get("hy3d/worker_run") == runs[0].run_id and runs[0]

            run = wait_for(running, 120, "the child's run to start generating", every=0.1)
            wait_for(lambda: instance.get_materialized_partitions(__import__("dagster").AssetKey("models_3d")),
                     60, "a first model", every=0.1)
            assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 1
            context = build_sensor_context(instance=instance)
            assert "no dead runs" in dead_runs_sensor(context).skip_message  # alive: left alone
            os.kill(child.pid, signal.SIGKILL)
            child.wait(10)
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.STARTED  # nobody else notices
            result = dead_runs_sensor(build_sensor_context(instance=instance))
            assert "1 dead run(s) reported failed" in result.skip_message
            assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
            assert instance.event_log_storage.get_concurrency_info("gpu").active_slot_count == 0
    finally:
        if child.poll() is None:
            child.kill()
