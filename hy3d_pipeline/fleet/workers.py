"""Long-lived generation workers: the Celery app that `WorkerRunLauncher` sends runs to and that
`hy3d-pipeline worker` serves.

A run executes inside a worker's pool process (dagster-celery's `execute_job` task), so the generator that
process loaded stays warm for every later run: generator loads equal worker processes, whatever the number of
runs. The broker is HY3D_BROKER_URL (Redis on a fleet); without one, a folder on this machine (kombu's
filesystem transport), so a laptop runs the same code path with no server to install.

Settings a GPU worker needs, and why:
- `worker_prefetch_multiplier=1` and `task_acks_late`: a busy worker reserves no second run, so with several
  workers the next run goes to whichever is free, never behind a busy one;
- a killed pool process fails its task (Celery's default for `task_reject_on_worker_lost=False`): the run it held
  is marked failed by run monitoring and retried as a new run; the message is not redelivered, since a run that
  was already started cannot be started again;
- results are kept, so the launcher can tell queued, running, finished and dead tasks apart;
- each pool process loads its generator as soon as it starts (after the fork, in a thread of its own, so
  Celery's start-up timeout never waits on a model): the first run finds the model warm instead of loading it
  (10-30 s with real weights). A run that arrives during the load waits for it; a load that fails is logged and
  tried again, with the error in the run, by the first run.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any


def app_args(broker: str | None, backend: str | None, queue: str, local_folder: str | None) -> dict[str, Any]:
    """Arguments for dagster-celery's `make_app`, the same in the launcher and in every worker."""
    from dagster_celery.config import DEFAULT_CONFIG

    options: dict[str, Any] = dict(DEFAULT_CONFIG)
    options.update(
        worker_prefetch_multiplier=1,
        task_acks_late=True,
        task_track_started=True,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # run logs keep their own format, not Celery's WARNING prefix
        worker_send_task_events=False,
    )
    if not broker:
        folder = Path(local_folder or Path(".hy3d") / "workers").absolute()
        for sub in ("queue", "control", "results"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        broker = "filesystem://"
        backend = backend or f"file://{folder / 'results'}"
        # one folder in and out: producers and consumers are processes on this machine
        options["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"), "polling_interval": 0.2,
        }
    elif backend is None and broker.startswith(("redis://", "rediss://")):
        backend = broker
    return {"broker": broker, "backend": backend or "rpc://", "include": [], "config_source": options,
            "task_default_queue": queue}


def make_worker_app(args: dict[str, Any]):
    """The Celery app with dagster-celery's run tasks registered (what `celery -A dagster_celery.app` would
    load, but configured like the launcher rather than from dagster-celery's defaults)."""
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_execute_job_task, create_resume_job_task

    from celery.signals import worker_process_init

    app = make_app(app_args=args)
    route_queue(app, args["task_default_queue"])
    worker_process_init.connect(_warm_up, weak=False)
    create_execute_job_task(app)
    create_resume_job_task(app)
    return app


def _warm_up(**_signal) -> None:
    threading.Thread(target=warm_generator, name="hy3d-warm-up", daemon=True).start()


def warm_generator(out=print) -> bool:
    """Load this process's generator and import what a run's step uses; says how it went in the worker's log."""
    import importlib
    import time

    start = time.perf_counter()
    try:
        for module in ("hy3d_pipeline.definitions", "hy3d_pipeline.models.processing"):  # what every run imports
            importlib.import_module(module)
        from hy3d_pipeline.models.generators.base import load_generator
        from hy3d_pipeline.models.resources import GeneratorResource

        generator = load_generator(GeneratorResource.from_env().settings())
    except Exception as exc:  # noqa: BLE001 - the first run loads it again and reports the error there
        out(f"pool process {os.getpid()}: generator not loaded at start (the first run will try again): "
            f"{type(exc).__name__}: {exc}", flush=True)
        return False
    out(f"pool process {os.getpid()}: generator {generator.name!r} loaded in {time.perf_counter() - start:.1f} s",
        flush=True)
    return True


def route_queue(app, queue: str) -> None:
    """dagster-celery publishes to queue Q with routing key `Q.execute_job`; declaring Q on a topic exchange
    bound to `Q.#` is what delivers those messages on every transport (a direct binding drops them)."""
    from kombu import Exchange, Queue

    app.conf.task_queues = [Queue(queue, Exchange(queue, type="topic"), routing_key=f"{queue}.#")]
    app.conf.task_default_queue = queue


def launcher_args() -> dict[str, Any]:
    """The app arguments of this Dagster home's launcher: a worker serves exactly the queue runs are sent to."""
    from dagster import DagsterInstance

    from hy3d_pipeline.fleet.launcher import WorkerRunLauncher

    with DagsterInstance.get() as instance:
        launcher = instance.run_launcher
        if not isinstance(launcher, WorkerRunLauncher):
            raise SystemExit(
                f"the Dagster instance at {instance.root_directory} launches runs with "
                f"{type(launcher).__name__}, not hy3d-pipeline's workers: no run would reach this worker. "
                "Unset HY3D_RUN_LAUNCHER (or set it to 'workers'), or point DAGSTER_HOME at the fleet's home")
        return launcher.app_args()


def run_worker(concurrency: int = 1, loglevel: str = "INFO", out=print) -> int:
    """`hy3d-pipeline worker`: serve HY3D_WORKER_QUEUE with `concurrency` pool processes (each holds one warm
    generator). Before serving, runs that died on this machine are failed and their temporary files swept."""
    import socket

    from dagster import DagsterInstance

    from hy3d_pipeline.fleet.instance import prepare_dagster_home
    from hy3d_pipeline.fleet.liveness import fail_dead_runs

    home = prepare_dagster_home()
    with DagsterInstance.get() as instance:  # closed before the pool forks: no connection crosses a fork
        fail_dead_runs(instance, log=out)
    _sweep_temp(out)
    args = launcher_args()
    app = make_worker_app(args)
    queue = args["task_default_queue"]
    node = f"hy3d-{os.getpid()}@{socket.gethostname()}"
    out(f"worker {node}: {concurrency} process(es) on queue {queue!r}, Dagster home {home}")
    app.worker_main(["worker", "--queues", queue, "--concurrency", str(concurrency), "--prefetch-multiplier", "1",
                     "--hostname", node, "--loglevel", loglevel, "--pool", "prefork",
                     "--without-gossip", "--without-mingle"])
    return 0


def _sweep_temp(out) -> None:
    from hy3d_pipeline.storage.resources import ImageStorage

    try:
        removed = ImageStorage.from_env().sweep_temp()
    except Exception as exc:  # noqa: BLE001 - a sweep must never keep a worker from serving
        out(f"temporary files not swept: {type(exc).__name__}: {exc}")
        return
    if removed:
        out(f"removed {len(removed)} temporary file(s) left by dead runs")
