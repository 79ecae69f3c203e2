"""Is the process that runs a run still there? A run whose process was SIGKILLed (or OOM-killed) stays STARTED
for ever, holding its `gpu` slot, unless something notices.

Where the launcher can check its workers (WorkerRunLauncher), Dagster's run monitoring asks it. Where it cannot
(Dagster's DefaultRunLauncher, and runs executed in-process by `hy3d-pipeline demo`), `fail_dead_runs` does the
equivalent with public APIs: it finds the run's process (the `hy3d/worker` tag the step sets, or the pid Dagster
records when it starts a run process on this machine), and if that process is gone it reports the run failed
(`instance.report_run_failed`) and frees its pool slots, so run retries and the sensor can take it from there.
A process is only judged on the machine it ran on: elsewhere nothing can be said, and nothing is done.
"""

from __future__ import annotations

import socket

WORKER_TAG = "hy3d/worker"  # HOST:PID of the process executing the run's step
WORKER_RUN_TAG = "hy3d/worker_run"  # the run that set WORKER_TAG: a retried run inherits its parent's tags
IN_PROCESS = "in-process"  # WORKER_RUN_TAG of a run created by the process that executes it (`demo`)


def this_host() -> str:
    return socket.gethostname()


def worker_id(pid: int | None = None) -> str:
    import os

    return f"{this_host()}:{pid or os.getpid()}"


def process_alive(pid: int, started_before: float | None = None) -> bool:
    """True when `pid` is a live process that already existed at `started_before` (a recycled pid is a new
    process, created later)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started_before is None or proc.create_time() <= started_before + 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def _engine_pid(instance, run_id: str) -> int | None:
    """The pid in Dagster's "Started process for run (pid: N)" event, which the run process itself writes."""
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20).records
    for record in records:
        event = record.event_log_entry.dagster_event
        data = event.engine_event_data if event is not None else None
        pid = data.metadata.get("pid") if data is not None else None
        if pid is not None and "Started process for run" in (record.event_log_entry.user_message or ""):
            try:
                return int(pid.value if hasattr(pid, "value") else pid)
            except (TypeError, ValueError):
                return None
    return None


def run_process(instance, run) -> tuple[str, int] | None:
    """(host, pid) of the process running `run`, when known."""
    owner = run.tags.get(WORKER_RUN_TAG)
    own = owner == run.run_id or (owner == IN_PROCESS and "dagster/parent_run_id" not in run.tags)
    tag = run.tags.get(WORKER_TAG, "") if own else ""
    host, _, pid = tag.rpartition(":")
    if host and pid.isdigit():
        return host, int(pid)
    from dagster import DefaultRunLauncher

    if isinstance(instance.run_launcher, DefaultRunLauncher):  # it starts run processes on its own machine
        pid = _engine_pid(instance, run.run_id)
        if pid is not None:
            return this_host(), pid
    return None


def run_alive(instance, run, started_at: float | None) -> bool | None:
    """True/False when the run's process is on this machine and known; None when nothing can be said here."""
    found = run_process(instance, run)
    if found is None or found[0] != this_host():
        return None
    return process_alive(found[1], started_at)


def in_process_tags() -> dict[str, str]:
    """Tags for a run executed by the process that creates it: known to be this process's before its step
    starts, so a kill at any moment is seen."""
    return {WORKER_TAG: worker_id(), WORKER_RUN_TAG: IN_PROCESS}


def mark_run_process(context) -> None:
    """Called by the step: which process runs this run, for `fail_dead_runs` and the launcher's health check."""
    run_id = context.run.run_id
    context.instance.add_run_tags(run_id, {WORKER_TAG: worker_id(), WORKER_RUN_TAG: run_id})


def fail_dead_runs(instance, log=None) -> list[str]:
    """Report failed every in-progress run whose process on this machine is gone; free its pool slots.
    Returns the run ids it failed."""
    from dagster import DagsterRunStatus, RunsFilter

    from hy3d_pipeline.dagster_private import free_pool_slots_for_run

    failed = []
    records = instance.get_run_records(RunsFilter(statuses=[DagsterRunStatus.STARTED, DagsterRunStatus.STARTING,
                                                            DagsterRunStatus.CANCELING]))
    for record in records:
        run = record.dagster_run
        started = record.start_time or (record.create_timestamp.timestamp() if record.create_timestamp else None)
        if run_alive(instance, run, started) is not False:
            continue
        host, pid = run_process(instance, run)
        message = (f"the process running this run ({host}, pid {pid}) is gone: killed or crashed. Its images are "
                   "requested again; models already made are kept")
        instance.report_run_failed(run, message)
        free_pool_slots_for_run(instance, run.run_id)
        failed.append(run.run_id)
        if log is not None:
            log(f"run {run.run_id}: {message}")
    return failed
