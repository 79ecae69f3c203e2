"""`hy3d-pipeline dev` end to end: the UI and daemon on 127.0.0.1, the sensor picking up a dropped image, and a
Ctrl-C that stops dagster and SeaweedFS with it."""

from __future__ import annotations

import subprocess

from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import DevProcess, wait_for


def test_dev_ui_sensor_and_shutdown(tmp_path):
    dev = DevProcess(tmp_path, sensor_interval=2)
    with dev:
        # the samples uploaded at start become partitions and models without anyone asking
        parts = wait_for(lambda: (p := dev.partitions()) and len(p.get("models_3d", [])) >= 5 and p, 120,
                         "sample partitions")
        assert set(parts) == {"source_images", "local_images", "models_3d"}
        s3 = dev.s3_client()
        s3.put_object(Bucket="hy3d-images", Key="dropped/new.png", Body=png_bytes())
        wait_for(lambda: s3.head_object(Bucket="hy3d-images", Key="models/dropped/new.png.glb"), 90,
                 "the dropped image's model")
        assert "dropped/new.png" in dev.partitions()["models_3d"]
    assert dev.proc.returncode is not None
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], dev.log_path.read_text()[-3000:]
