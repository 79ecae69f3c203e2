"""`WorkerRunLauncher`: dagster-celery's `CeleryRunLauncher`, configured for long-lived generation workers.

Runs go to the Celery queue HY3D_WORKER_QUEUE on HY3D_BROKER_URL (or this machine's folder broker), where
`hy3d-pipeline worker` processes execute them with a warm generator. Run monitoring asks `check_run_worker_health`
about every started run. Celery answers for a pool process that died (its task fails); it cannot answer for a
worker killed whole (master and pool, SIGKILL, a lost node): the task then stays STARTED in the result backend
for ever. So a started task is also checked against its worker: the pool process on this machine, or a ping to
the worker elsewhere; no answer means the run is failed, frees its slot and is retried on a live worker.
"""

from __future__ import annotations

from dagster import Field, Noneable, StringSource
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_TASK_ID_TAG

from hy3d_pipeline.dagster_private import CheckRunHealthResult, WorkerStatus, launcher_instance
from hy3d_pipeline.fleet import liveness
from hy3d_pipeline.fleet.workers import app_args, route_queue

_PING_TIMEOUT_S = 2.0


class WorkerRunLauncher(CeleryRunLauncher):
    def __init__(self, default_queue: str = "gpu", broker: str | None = None, backend: str | None = None,
                 local_folder: str | None = None, inst_data=None) -> None:
        args = app_args(broker, backend, default_queue, local_folder)
        super().__init__(default_queue=default_queue, broker=args["broker"], backend=args["backend"],
                         config_source=args["config_source"], inst_data=inst_data)
        route_queue(self.celery, default_queue)

    @classmethod
    def config_type(cls):
        return {
            "broker": Field(Noneable(StringSource), is_required=False,
                            description="Celery broker URL (HY3D_BROKER_URL); unset: a folder on this machine."),
            "backend": Field(Noneable(StringSource), is_required=False,
                             description="Celery result backend; default: the Redis broker, or a folder."),
            "default_queue": Field(StringSource, is_required=False, default_value="gpu"),
            "local_folder": Field(Noneable(str), is_required=False,
                                  description="Folder of the broker-less setup (queue, control, results)."),
        }

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)

    def check_run_worker_health(self, run) -> CheckRunHealthResult:
        if DAGSTER_CELERY_TASK_ID_TAG not in run.tags:  # not launched here (in-process, `demo`): its own process
            alive = liveness.run_alive(launcher_instance(self), run, None)
            if alive is False:
                return CheckRunHealthResult(WorkerStatus.FAILED, "the process running this run is gone")
            # unknown (another machine's process) is not dead: monitoring fails every run not reported running
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        result = super().check_run_worker_health(run)
        if result.status != WorkerStatus.RUNNING:
            return result
        gone = self._gone_worker(run)
        return CheckRunHealthResult(WorkerStatus.FAILED, gone) if gone else result

    def _gone_worker(self, run) -> str | None:
        info = self.celery.AsyncResult(run.tags[DAGSTER_CELERY_TASK_ID_TAG]).info
        if not isinstance(info, dict):
            return None
        node, pid = str(info.get("hostname") or ""), info.get("pid")
        host = node.partition("@")[2] or node
        if host == liveness.this_host() and isinstance(pid, int):
            if liveness.process_alive(pid):
                return None
            return f"worker {node} (pool process {pid}) is gone"
        if not node:
            return None
        for _ in range(2):  # one missed ping is not a death
            if self.celery.control.ping(destination=[node], timeout=_PING_TIMEOUT_S):
                return None
        return f"worker {node} does not answer: killed or lost"

