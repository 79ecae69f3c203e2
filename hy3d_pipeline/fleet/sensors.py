"""`dead_runs_sensor`: the daemon's look, every 15 s, for runs whose process on this machine is gone.

Run monitoring covers launchers that can check their workers; this covers the one that cannot (Dagster's
DefaultRunLauncher starts run processes on the daemon's machine and never looks at them again) and runs executed
in-process. Where the launcher has a health check and monitoring is on, it leaves the work to them.
"""

from __future__ import annotations

from dagster import DefaultSensorStatus, SensorEvaluationContext, SkipReason, sensor

INTERVAL_S = 15


@sensor(name="dead_runs_sensor", minimum_interval_seconds=INTERVAL_S, default_status=DefaultSensorStatus.RUNNING,
        description="Reports failed the runs whose process on this machine is gone (killed, OOM), freeing their "
        "`gpu` slots, so run retries and new_images_sensor can take their images again.")
def dead_runs_sensor(context: SensorEvaluationContext):
    from hy3d_pipeline.fleet.liveness import fail_dead_runs

    instance = context.instance
    if instance.run_launcher.supports_check_run_worker_health and instance.run_monitoring_enabled:
        return SkipReason(f"run monitoring checks {type(instance.run_launcher).__name__}'s workers")
    failed = fail_dead_runs(instance, log=context.log.warning)
    return SkipReason(f"{len(failed)} dead run(s) reported failed" if failed else "no dead runs")
