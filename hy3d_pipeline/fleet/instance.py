"""The Dagster home that `demo`, `dev` and `worker` prepare: one dagster.yaml for the laptop and the fleet.

It refers to the environment (`{env: DAGSTER_PG_URL}`, `{env: HY3D_BROKER_URL}`) rather than copying values,
so it loads in any process that has the same environment variables and never holds a password. What it sets
up, and why:
- storage: SQLite in the home folder (Dagster's own files and layout, engines kept; see sqlite.py), or Postgres
  when DAGSTER_PG_URL is set (any URL form, pooled; see postgres.py);
- runs go to long-lived generation workers (launcher.py) that keep the model warm across runs;
- the `gpu` pool limits steps, not runs (`granularity: op`), and lets as many runs as there are slots wait
  launched (`op_granularity_run_buffer`), so the next batch's launch overlaps the current batch's work instead
  of starting only once it ends; the queue is looked at every second rather than every five;
- run monitoring notices a run whose worker died, marks it failed and frees its pool slot; run retries then
  launch it again (only for crashed workers: failed images are retried inside the step, per image).
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from hy3d_pipeline.settings import current

HEADER = "# written by hy3d-pipeline; delete this line to keep your own edits"

# dagster-postgres's own classes, with the URL normalised and a connection pool (see postgres.py)
_STORAGE_POSTGRES = """\
run_storage:
  module: hy3d_pipeline.fleet.postgres
  class: RunStorage
  config:
    postgres_url: {env: DAGSTER_PG_URL}
event_log_storage:
  module: hy3d_pipeline.fleet.postgres
  class: EventLogStorage
  config:
    postgres_url: {env: DAGSTER_PG_URL}
schedule_storage:
  module: hy3d_pipeline.fleet.postgres
  class: ScheduleStorage
  config:
    postgres_url: {env: DAGSTER_PG_URL}
"""

def sqlite_storage(home: Path | str) -> dict:
    """The storage sections of a SQLite home: the files of Dagster's default layout (`InstanceRef.from_dir`),
    through sqlite.py's classes, which keep their database engines."""
    folders = {"run_storage": ("RunStorage", ("history", "")),
               "event_log_storage": ("EventLogStorage", ("history", "runs", "")),
               "schedule_storage": ("ScheduleStorage", ("schedules",))}
    return {section: {"module": "hy3d_pipeline.fleet.sqlite", "class": cls,
                      "config": {"base_dir": os.path.join(home, *sub)}} for section, (cls, sub) in folders.items()}


def local_instance(folder: Path):
    """A Dagster instance in `folder` on the SQLite storage `demo` and `dev` keep (and nothing else of this
    module's yaml): for in-process runs outside a prepared home, such as the benches'. A context manager."""
    from dagster import DagsterInstance

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**sqlite_storage(folder.absolute()), "telemetry": {"enabled": False}}
    (folder / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return DagsterInstance.from_config(str(folder))


_LAUNCHER_WORKERS = """\
run_launcher:
  module: hy3d_pipeline.fleet.launcher
  class: WorkerRunLauncher
  config:
{broker}    default_queue: {queue}
    local_folder: {local_folder}
"""

_COMMON = """\
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
concurrency:
  pools:
    default_limit: {gpu_slots}
    granularity: op
    op_granularity_run_buffer: {gpu_slots}
  runs:
    max_concurrent_runs: {max_runs}
run_monitoring:
  enabled: true
  poll_interval_seconds: 5
  start_timeout_seconds: {start_timeout}
  free_slots_after_run_end_seconds: 1
run_retries:
  enabled: true
  max_retries: {run_retries}
  retry_on_asset_or_op_failure: false
"""


def instance_yaml(home: Path, launcher: str | None = None) -> str:
    """dagster.yaml for a Dagster home at `home`, from the current environment's choices (not its values)."""
    settings = current()
    launcher = launcher or settings.run_launcher
    parts = [HEADER + "\n"]
    if settings.pg_url:
        parts.append(_STORAGE_POSTGRES)
    else:  # Dagster's own SQLite layout in the home folder, where an existing home keeps its history
        parts.append(yaml.safe_dump(sqlite_storage(home), sort_keys=False))
    if launcher == "workers":
        broker = "    broker: {env: HY3D_BROKER_URL}\n" if settings.broker_url else ""
        parts.append(_LAUNCHER_WORKERS.format(broker=broker, queue=settings.worker_queue,
                                              local_folder=home.parent / "workers"))
    parts.append(_COMMON.format(
        gpu_slots=settings.gpu_slots,
        max_runs=settings.run_limit,
        # a launched run waits in the workers' queue behind at most the runs the pool buffer lets through
        start_timeout=settings.run_start_timeout,
        run_retries=settings.run_retries,
    ))
    return "".join(parts)


def prepare_dagster_home(home: Path | None = None, launcher: str | None = None) -> Path:
    """DAGSTER_HOME (`$HY3D_HOME/dagster` unless DAGSTER_HOME is set), its dagster.yaml written or brought up
    to date unless the user took it over (removed our header line); sets DAGSTER_HOME for this process."""
    settings = current()
    path = Path(settings.dagster_home) if settings.dagster_home else (home or settings.home_folder) / "dagster"
    path = path.absolute()
    path.mkdir(parents=True, exist_ok=True)
    config = path / "dagster.yaml"
    wanted = instance_yaml(path, launcher)
    existing = config.read_text() if config.exists() else None
    if existing is None or (existing.startswith(HEADER) and existing != wanted):
        tmp = config.with_name(f".dagster.yaml.{os.getpid()}")
        tmp.write_text(wanted)
        os.replace(tmp, config)
    os.environ["DAGSTER_HOME"] = str(path)
    # create the storage's tables here, once: the webserver, daemon, code server and worker all start at the same
    # moment next, and SQLite tables created by several of them at once end with two alembic heads
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        _create_gpu_pool(instance, settings.gpu_slots)
    return path


def _create_gpu_pool(instance, slots: int) -> None:
    """The `gpu` pool's row, made here rather than by whichever run or daemon first needs it: when two create it
    at once on Postgres, the loser's transaction is left aborted (Dagster 1.13 retries the insert as an update in
    the same transaction) and its run fails. A changed HY3D_GPU_SLOTS is applied the same way."""
    from hy3d_pipeline.dagster_private import init_pool_to_default, pool_limits, set_pool_slots

    pools = pool_limits(instance)
    if pools is None:
        return
    current = pools.get("gpu")
    if current is None:
        init_pool_to_default(instance, "gpu")
    elif current.from_default and current.limit != slots:
        set_pool_slots(instance, "gpu", slots)
