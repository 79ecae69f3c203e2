"""Dropping images into the embedded default: the lines `dev` prints put a file in with the AWS CLI itself
(`awscli` from PyPI), `hy3d-pipeline upload` run from dev's folder finds its S3 with nothing exported, the sensor
turns both into models, the endpoint survives a restart (a taken port falls back, announced), and the SeaweedFS
that dev starts runs without telemetry, on 127.0.0.1 only.

One real `hy3d-pipeline dev` serves the module; the configured-S3 and terminal tests use the session SeaweedFS."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import termios
from pathlib import Path

import psutil
import pytest

from hy3d_pipeline.cli import main
from hy3d_pipeline.embedded import setup
from hy3d_pipeline.embedded.seaweedfs import EmbeddedS3Error
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import ROOT, DevProcess, wait_for

BUCKET = setup.EMBEDDED_BUCKET


def jpeg_bytes(shape: str = "disc") -> bytes:
    """A product-shot JPEG: the drawn object on a white sheet."""
    from PIL import Image

    drawn = Image.open(io.BytesIO(png_bytes(shape=shape)))
    sheet = Image.new("RGB", drawn.size, (255, 255, 255))
    sheet.paste(drawn, mask=drawn.getchannel("A"))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def image_folder(root: Path) -> Path:
    """A folder as a person has it: images (one in a subfolder, an upper-case extension), a text file, and a
    hidden file."""
    folder = root / "shoots"
    (folder / "day2").mkdir(parents=True)
    (folder / "red.png").write_bytes(png_bytes())
    (folder / "day2" / "box.JPG").write_bytes(jpeg_bytes(shape="box"))
    (folder / "notes.txt").write_text("shot list: red, box\n")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return folder


def bare_env(**extra: str) -> dict[str, str]:
    """A shell of a user who exported nothing: no S3 or AWS settings, no AWS config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "HY3D", "DAGSTER_HOME"))}
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def upload_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hy3d_pipeline.cli", "upload", *args]


def printed(dev: DevProcess) -> dict[str, str]:
    """The endpoint and the drop-in lines dev printed, exactly as printed."""
    text = wait_for(lambda: (t := dev.log_path.read_text()) and "hy3d-pipeline upload" in t and t, 60,
                    "the drop-in lines")
    lines = [line.strip() for line in text.splitlines()]
    return {
        "endpoint": re.search(r"embedded S3 \(SeaweedFS\) at (\S+),", text).group(1),
        "export": next(line for line in lines if line.startswith("export AWS_ACCESS_KEY_ID=")),
        "aws": next(line for line in lines if line.startswith("aws s3 cp ")),
    }


def model_of(dev: DevProcess, key: str, timeout: float = 120) -> dict:
    s3 = dev.s3_client()
    return wait_for(lambda: s3.head_object(Bucket=BUCKET, Key=f"models/{key}.glb"), timeout, f"the model of {key}")


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    process = DevProcess(tmp_path_factory.mktemp("dropin"), sensor_interval=2)
    with process:
        yield process


def weed_process(folder: Path) -> psutil.Process:
    state = json.loads((folder / ".hy3d" / "embedded-s3.json").read_text())
    return psutil.Process(state["pid"])


def test_embedded_seaweedfs_reports_no_telemetry_and_stays_on_loopback(dev):
    weed = weed_process(dev.folder)
    cmdline = Path(f"/proc/{weed.pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1] == b"mini"
    assert b"-master.telemetry=false" in cmdline
    assert b"-ip.bind=127.0.0.1" in cmdline and b"-ip=127.0.0.1" in cmdline
    # what everything dev started has open right now: every socket is on loopback, at both ends
    tree = [psutil.Process(dev.proc.pid), *psutil.Process(dev.proc.pid).children(recursive=True)]
    assert weed in tree
    addresses = set()
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="inet"):
                addresses.update(a.ip for a in (conn.laddr, conn.raddr) if a)
    assert addresses and addresses <= {"127.0.0.1"}, addresses


def test_printed_lines_upload_with_the_aws_cli_and_the_sensor_makes_a_model(dev, tmp_path):
    aws = shutil.which("aws") or str(Path(sys.executable).with_name("aws"))
    assert Path(aws).exists(), "the AWS CLI is part of the test extra: pip install '.[test]'"
    lines = printed(dev)
    assert lines["aws"] == f"aws s3 cp photo.jpg s3://{BUCKET}/ --endpoint-url {lines['endpoint']}"
    (tmp_path / "photo.jpg").write_bytes(jpeg_bytes())
    env = bare_env(PATH=str(Path(aws).parent) + os.pathsep + os.environ["PATH"])
    done = subprocess.run(["bash", "-c", f"{lines['export']}\n{lines['aws']}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"upload: ./photo.jpg to s3://{BUCKET}/photo.jpg" in done.stdout
    model_of(dev, "photo.jpg")
    assert "photo.jpg" in dev.partitions()["models_3d"]


def test_upload_from_the_dev_folder_needs_nothing_exported(dev, tmp_path):
    folder = image_folder(tmp_path)
    done = subprocess.run(upload_cmd(str(folder), "--prefix", "/batch1/"), cwd=dev.folder, env=bare_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"skipped {folder / 'notes.txt'}: not a supported image: content looks like plain text" in out
    assert f"uploaded {folder / 'red.png'} -> s3://{BUCKET}/batch1/shoots/red.png" in out
    assert f"uploaded {folder / 'day2' / 'box.JPG'} -> s3://{BUCKET}/batch1/shoots/day2/box.JPG" in out
    assert "2 image(s) uploaded" in out and "1 skipped" in out and ".DS_Store" not in out
    assert printed(dev)["endpoint"] in out  # it says where the images went
    for key in ("batch1/shoots/red.png", "batch1/shoots/day2/box.JPG"):
        model_of(dev, key)
    s3 = dev.s3_client()
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="batch1/")["Contents"]}
    assert keys == {"batch1/shoots/red.png", "batch1/shoots/day2/box.JPG"}
    assert s3.head_object(Bucket=BUCKET, Key="batch1/shoots/day2/box.JPG")["ContentType"] == "image/jpeg"


def test_report_from_the_dev_folder_reads_the_running_dev_s3(dev, tmp_path):
    weed = weed_process(dev.folder)
    done = subprocess.run([sys.executable, "-m", "hy3d_pipeline.cli", "report", "--out", str(tmp_path / "gallery")],
                          cwd=dev.folder, env=bare_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"report of \d+ image\(s\) \(0 failed\)", done.stdout), done.stdout
    assert len(list((tmp_path / "gallery" / "thumbs").glob("*.png"))) >= 5  # the samples' pictures, from dev's S3
    # a server of its own would have found dev's port taken and said so (or been refused on dev's data)
    assert "is taken" not in done.stdout and "already running" not in done.stderr
    assert weed.is_running() and weed_process(dev.folder).pid == weed.pid


def test_endpoint_is_the_same_after_a_restart_and_upload_knows_when_dev_is_gone(dev, tmp_path):
    before = printed(dev)
    assert dev.stop() is not None
    (tmp_path / "late.png").write_bytes(png_bytes())
    done = subprocess.run(upload_cmd(str(tmp_path / "late.png")), cwd=dev.folder, env=bare_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "no `hy3d-pipeline dev` is running with its embedded S3 in" in done.stdout
    assert str(dev.folder / ".hy3d") in done.stdout
    with DevProcess(dev.folder, sensor_interval=2) as again:
        assert printed(again) == before  # endpoint, keys, and the aws line: a saved script still works


def test_upload_without_a_running_dev_or_configured_s3_says_what_to_do(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    done = subprocess.run(upload_cmd("a.png"), cwd=tmp_path, env=bare_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "upload failed: no S3 is configured (S3_IMAGES_BUCKET / S3_ENDPOINT_URL)" in done.stdout
    assert "start `hy3d-pipeline dev` in this folder" in done.stdout


@pytest.fixture
def restored_environ():
    """The embedded default points this process's environment at its server; put it back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_a_taken_port_falls_back_to_a_free_one_announced(tmp_path, monkeypatch, restored_environ):
    for name in [n for n in os.environ if n.startswith(("S3_", "AWS_", "DAGSTER_HOME"))]:
        monkeypatch.delenv(name)
    home = tmp_path / ".hy3d"
    monkeypatch.setenv("HY3D_HOME", str(home))

    def start(lines: list[str]) -> str:
        for name in ("S3_ENDPOINT_URL", "S3_IMAGES_BUCKET"):  # set by the previous start: S3 is not configured
            os.environ.pop(name, None)
        with contextlib.ExitStack() as stack:
            setup.enter_embedded_default(stack, lines.append, drop_in=True)
            endpoint = os.environ["S3_ENDPOINT_URL"]
            # while it runs, a second server on the same data folder is refused
            with pytest.raises(EmbeddedS3Error, match="already running"):
                setup.start_embedded_s3(home)
        return endpoint

    first: list[str] = []
    usual = start(first)
    port = int(usual.rpartition(":")[2])
    assert not any("is taken" in line for line in first)
    with socket.socket() as squatter:  # another program listens on the remembered port
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the last server's TIME_WAIT
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        second: list[str] = []
        fallback = start(second)
    assert fallback != usual
    new_port = fallback.rpartition(":")[2]
    announced = next(line for line in second if "is taken" in line)
    assert f"port {port} of the embedded S3" in announced and f"using port {new_port} this time" in announced
    assert any(line.strip().startswith("aws s3 cp") and line.endswith(f"--endpoint-url {fallback}") for line in second)
    third: list[str] = []
    assert start(third) == usual  # the port is free again: the usual endpoint is back
    assert not any("is taken" in line for line in third)


def test_upload_to_configured_s3_under_the_images_prefix(s3_env, storage, s3, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("S3_IMAGES_PREFIX", "incoming/")
    folder = image_folder(tmp_path)
    (tmp_path / "single.webp").write_bytes(_webp())
    (tmp_path / "IMG_0001").write_bytes(jpeg_bytes())  # an image the sensor would never pick up by its name
    (tmp_path / "cut.png").write_bytes(png_bytes()[:150])
    code = main(["upload", str(folder), str(tmp_path / "single.webp"), str(tmp_path / "IMG_0001"),
                 str(tmp_path / "cut.png"), str(tmp_path / "missing.png"), "--prefix", "p"])
    out = capsys.readouterr().out
    assert code == 0, out
    bucket = s3_env["bucket"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert keys == {"incoming/p/shoots/red.png", "incoming/p/shoots/day2/box.JPG", "incoming/p/single.webp"}
    assert s3.head_object(Bucket=bucket, Key="incoming/p/single.webp")["ContentType"] == "image/webp"
    assert f"skipped {tmp_path / 'missing.png'}: no such file or folder" in out
    assert f"skipped {tmp_path / 'IMG_0001'}: a JPEG image, but the sensor only picks up names ending in" in out
    assert f"skipped {tmp_path / 'cut.png'}: truncated or corrupt PNG image" in out
    assert f"3 image(s) uploaded to s3://{bucket}/incoming/p/ on {storage.endpoint_url}; 4 skipped" in out


def test_upload_of_nothing_but_non_images_fails(s3_env, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["upload", str(tmp_path / "notes.txt")]) == 1
    assert "0 image(s) uploaded" in capsys.readouterr().out


def _webp() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(png_bytes())).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def run_on_terminal(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run `cmd` with stdout and stderr on a pseudo-terminal, as from a person's shell; returns everything it
    drew there."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(60), b"".join(chunks).decode("utf-8", "replace")


def test_upload_draws_a_progress_bar_on_a_terminal_and_plain_lines_elsewhere(s3_env, tmp_path):
    folder = image_folder(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code, drawn = run_on_terminal(upload_cmd(str(folder), "--prefix", "tty"), tmp_path, env)
    assert code == 0, drawn
    assert "uploading:" in drawn and "3/3" in drawn and "%|" in drawn  # the bar, with the skip message above it
    assert "skipped" in drawn and "notes.txt" in drawn
    assert f"uploaded {folder}" not in drawn  # per-file lines are left to the bar
    plain = subprocess.run(upload_cmd(str(folder), "--prefix", "plain"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0
    assert "%|" not in plain.stdout + plain.stderr and "\r" not in plain.stdout + plain.stderr
    assert plain.stdout.count(f"uploaded {folder}") == 2
