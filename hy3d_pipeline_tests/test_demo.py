"""`hy3d-pipeline demo` end to end, as a new user runs it: no S3 configured, embedded SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
    return env


def test_demo_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "hy3d_pipeline.cli", "demo"]
    first = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    lines = [line for line in first.stdout.splitlines() if " -> s3://" in line]
    assert len(lines) >= 4 and all("FAILED" not in line for line in lines)
    models = list((tmp_path / "hy3d-output").rglob("*.glb"))
    assert len(models) == len(lines)
    assert (tmp_path / ".hy3d" / "seaweedfs").is_dir()  # data survives restarts in a project-local folder
    # a second start reuses the data: nothing new to generate, every model still reported
    second = subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 run(s) executed" in second.stdout
    assert len([line for line in second.stdout.splitlines() if " -> s3://" in line]) == len(lines)
    # the embedded server was stopped with the command
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / ".hy3d" / "seaweedfs")], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
    # credentials never printed
    creds = (tmp_path / ".hy3d" / "embedded-credentials.json").read_text()
    import json

    secret = json.loads(creds)["secret_key"]
    assert secret not in first.stdout + first.stderr


def test_demo_killed_mid_run_then_run_again(tmp_path):
    """`kill -9` of a demo while its run generates: the run stays STARTED holding the only `gpu` slot. The next
    demo fails that run, frees the slot, requests its images again and ends with every model, exit 0."""
    import signal
    import time

    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    cmd = [sys.executable, "-m", "hy3d_pipeline.cli", "demo"]
    env = _env(tmp_path)
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    home = tmp_path / ".hy3d" / "dagster"
    db = home / "schedules" / "schedules.db"  # the last of Dagster's SQLite files the demo creates at start
    killed = None
    try:
        deadline = time.monotonic() + 120
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # its tables being made: a second process creating them at once could race it
        os.environ["DAGSTER_HOME"] = str(home)
        try:
            with DagsterInstance.get() as instance:
                while killed is None and time.monotonic() < deadline and first.poll() is None:
                    runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED]))
                    if runs:
                        first.send_signal(signal.SIGKILL)
                        killed = runs[0].run_id
                    time.sleep(0.02)
        finally:
            os.environ.pop("DAGSTER_HOME", None)
        first.wait(30)
        assert killed is not None, "the demo's run was never seen started"
        # SeaweedFS has its own session: the killed demo could not stop it, the next demo stops it (below)
        time.sleep(6)
        second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "stopping the embedded S3 left running by a command that was killed" in second.stdout
        assert f"run {killed}: the process running this run" in second.stdout
        lines = [line for line in second.stdout.splitlines() if " -> s3://" in line]
        assert len(lines) == 5 and not [line for line in second.stdout.splitlines() if "FAILED" in line]
    finally:
        if first.poll() is None:
            first.kill()
        subprocess.run(["pkill", "-f", str(tmp_path / ".hy3d" / "seaweedfs")])
