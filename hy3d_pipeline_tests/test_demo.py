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
