"""Nothing leaked in S3_TEMP_DIR: what a killed process left is swept when a run starts, and a step that raises
after prefetching deletes the copies it never used (real SeaweedFS, real subprocesses, real Dagster runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dagster import materialize

from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline_tests.conftest import png_bytes

# writes like ImageStorage.download (a dot-named .part in the temp dir), says so, then waits to be killed
WRITER = """
import sys, time
out = open(sys.argv[1], "wb")
out.write(b"x" * 4096)
out.flush()
print("writing", flush=True)
time.sleep(600)
"""


def _writer(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    return proc


def _run(instance, storage, keys, **kwargs):
    from hy3d_pipeline.models.assets import image_to_model

    instance.add_dynamic_partitions("images", keys)
    tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
    return materialize([image_to_model], instance=instance, resources=build_defs().resources, tags=tags,
                       raise_on_error=False, **kwargs)


def test_run_start_sweeps_what_a_killed_download_left(instance, storage, s3):
    folder = storage.local_dir()
    dead_part, live_part = folder / ".abc-dead.png.1234abcd.part", folder / ".abc-live.png.5678abcd.part"
    dead = _writer(dead_part)
    dead.send_signal(signal.SIGKILL)  # mid-write: no finally, no cleanup
    dead.wait()
    live = _writer(live_part)
    try:
        stale_copy = folder / "0123456789abcdef0123-old.png"
        stale_copy.write_bytes(png_bytes())
        # older than 2 x S3_DOWNLOAD_TIMEOUT, the age after which no live download can still own them
        old = time.time() - 3 * storage.download_timeout
        for path in (dead_part, stale_copy):
            os.utime(path, (old, old))
        s3.put_object(Bucket=storage.images_bucket, Key="a.png", Body=png_bytes())
        assert _run(instance, storage, ["a.png"]).success
        assert not dead_part.exists() and not stale_copy.exists()
        assert live_part.exists()  # a live writer's file is never swept
    finally:
        live.kill()
        live.wait()
        live.stdout.close()
        dead.stdout.close()
        live_part.unlink(missing_ok=True)
    assert list(folder.iterdir()) == []


def test_sweep_temp_keeps_copies_when_cleanup_is_off(storage, tmp_path):
    from hy3d_pipeline.storage.resources import ImageStorage

    keeping = ImageStorage.from_env(cleanup_temp_files=False, temp_dir=str(tmp_path / "keep"))
    folder = keeping.local_dir()
    part, copy = folder / ".x.part", folder / "0123-x.png"
    for path in (part, copy):
        path.write_bytes(b"x")
        os.utime(path, (0, 0))
    assert keeping.sweep_temp() == [part]
    assert copy.exists()
    copy.unlink()


class Killed(BaseException):
    """Stands for the run being terminated: not an Exception, so nothing in the step catches it."""


def test_step_that_raises_after_prefetching_leaves_no_copy(instance, storage, s3, monkeypatch):
    from hy3d_pipeline.models import processing

    keys = [f"p/{i}.png" for i in range(4)]
    for i, key in enumerate(keys):
        s3.put_object(Bucket=storage.images_bucket, Key=key, Body=png_bytes((64 + 8 * i, 64)))
    folder = storage.local_dir()

    def dies_once_the_next_copies_are_in(storage_, info, key, settings, timer=None, local_path=None, copies=None):
        # the prefetch threads have the next images on disk when the step dies (waiting for them to land makes
        # the test deterministic; it asserts nothing about time)
        deadline = time.monotonic() + 30
        while len([p for p in folder.iterdir() if not p.name.endswith(".part")]) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        raise Killed()

    monkeypatch.setattr(processing, "make_model", dies_once_the_next_copies_are_in)
    result = _run(instance, storage, keys)
    assert not result.success
    assert list(folder.iterdir()) == []
