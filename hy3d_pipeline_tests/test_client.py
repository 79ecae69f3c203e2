"""`hy3d_pipeline.client` against a real `hy3d-pipeline dev` (webserver, daemon with the sensor every second, dev's
warm worker, embedded S3), over HTTP exactly as a web app uses it; and the sensor's side of submissions with the
real sensor code on a Dagster instance. One dev process serves the whole module."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from hy3d_pipeline import client
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import ROOT, DevProcess, wait_for

BUCKET = "hy3d-images"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    process = DevProcess(tmp_path_factory.mktemp("client-dev"), sensor_interval=1)
    with process:
        # the samples dev uploads at start are the sensor's: let that run end, so each test's runs are its own
        wait_for(lambda: len(process.partitions().get("models_3d", [])) >= 5
                 and all(r["status"] in ("SUCCESS", "FAILURE") for r in process.runs()), 180, "the samples' run")
        yield process
    leftovers = subprocess.run(["pgrep", "-f", str(process.folder)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], process.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def dev_s3(dev):
    import boto3
    from botocore.config import Config

    env = dev.s3_env()
    return boto3.client("s3", endpoint_url=env["S3_ENDPOINT_URL"], region_name="us-east-1",
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def upload(s3, key: str, shape: str = "disc") -> None:
    s3.put_object(Bucket=BUCKET, Key=key, Body=png_bytes(shape=shape), ContentType="image/png")


def fresh(name: str) -> str:
    return f"web/{uuid.uuid4().hex[:8]}/{name}"


def follow(run_id: str, url: str, timeout: float = 180) -> list[dict]:
    """Every result() seen until the run ends (the last one included)."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(client.result(run_id, url=url))
        if seen[-1]["status"] in ("success", "error"):
            return seen
        time.sleep(0.3)
    raise TimeoutError(f"run {run_id} did not end: {seen[-1]}")


def run_details(dev, run_id: str) -> dict:
    data = dev.graphql("query($id: ID!) { runOrError(runId: $id) { ... on Run { jobName runConfigYaml "
                       "tags { key value } } } logsForRun(runId: $id) { ... on EventConnection { events { "
                       "... on MessageEvent { message } } } } }", {"id": run_id})
    return {**data["runOrError"], "messages": [e.get("message", "") for e in data["logsForRun"]["events"]]}


def runs_covering(dev, key: str) -> list[dict]:
    """Every run whose partitions include `key` (by its partition or range tags)."""
    order = dev.partitions()["models_3d"]
    found = []
    for run in dev.runs():
        tags = run["tags"]
        if tags.get("dagster/partition") == key:
            found.append(run)
        elif "dagster/asset_partition_range_start" in tags and key in order:
            a = order.index(tags["dagster/asset_partition_range_start"])
            b = order.index(tags["dagster/asset_partition_range_end"])
            if a <= order.index(key) <= b:
                found.append(run)
    return found


def glb_at(download_url: str) -> bytes:
    assert download_url.startswith("http://127.0.0.1:")  # the embedded S3, plain http
    with urllib.request.urlopen(download_url, timeout=30) as resp:
        return resp.read()


def test_import_needs_no_dagster():
    code = ("import sys, hy3d_pipeline.client; "
            "print(sorted(m for m in ('dagster', 'boto3', 'botocore', 'PIL', 'numpy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"


def test_submit_by_key_through_to_a_downloadable_model(dev, dev_s3):
    key = fresh("mug.png")
    upload(dev_s3, key)
    with dev_sensor_paused(dev):  # the sensor's own runs would interleave with this run's progress otherwise
        run_id = client.submit(key, url=dev.url)
    seen = follow(run_id, dev.url)
    final = seen[-1]
    assert final["status"] == "success", final
    assert final["model_url"] == f"s3://{BUCKET}/models/{key}.glb"
    assert glb_at(final["download_url"])[:4] == b"glTF"
    # progress: in every answer, 0-100, never going back, and 100 at the end
    values = [r["progress"] for r in seen]
    assert all(0 <= v <= 100 for v in values) and values == sorted(values) and values[-1] == 100
    assert final["current"] == {"index": 1, "count": 1, "image": key, "stage": "done"}
    # the named job, and the progress a person reads in the run's logs
    details = run_details(dev, run_id)
    assert details["jobName"] == "image_to_model_job"
    lines = [m for m in details["messages"] if m.startswith("progress: ")]
    assert lines == [f"progress: image 1 of 1 (0%), downloading: {key}",
                     f"progress: image 1 of 1 (10%), generating: {key}",
                     f"progress: image 1 of 1 (100%), done: {key}"]
    assert {t["key"]: t["value"] for t in details["tags"]}["dagster/partition"] == key


def test_submit_by_s3_url_and_presigned_urls(dev, dev_s3):
    by_url, by_presigned, by_aws_form = fresh("teapot.png"), fresh("vase.png"), fresh("star.png")
    for key in (by_url, by_presigned, by_aws_form):
        upload(dev_s3, key, shape="box")
    presigned = dev_s3.generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": by_presigned},
                                              ExpiresIn=600)
    signature = re.search(r"X-Amz-Signature=([0-9a-f]+)", presigned).group(1)
    # the AWS form of a presigned URL names the same bucket: the pipeline reads it from its own store
    aws_form = f"https://{BUCKET}.s3.amazonaws.com/{by_aws_form}?X-Amz-Signature={signature}&X-Amz-Expires=600"
    run_ids = [client.submit(f"s3://{BUCKET}/{by_url}", url=dev.url), client.submit(presigned, url=dev.url),
               client.submit(aws_form, url=dev.url)]
    for run_id, key in zip(run_ids, (by_url, by_presigned, by_aws_form)):
        final = follow(run_id, dev.url)[-1]
        assert final["status"] == "success", final
        assert final["model_url"] == f"s3://{BUCKET}/models/{key}.glb"
        details = run_details(dev, run_id)
        # the signature went nowhere: not into tags, run config or the run's logs
        assert signature not in json.dumps(details)
    assert signature not in dev.log_path.read_text()  # nor the webserver's, daemon's and worker's output
    assert signature not in (dev.folder / ".hy3d" / "worker.log").read_text()


def test_unknown_key_is_refused_at_once_and_nothing_is_launched(dev, dev_s3):
    before = {r["id"] for r in dev.runs()}
    missing = "web/no/such/folder/photo of me.png"
    with pytest.raises(client.ImageRefused) as refused:
        client.submit(missing, url=dev.url)
    assert f"s3://{BUCKET}/{missing}" in str(refused.value)
    elsewhere = "s3://another-bucket/photos/a.png"
    with pytest.raises(client.ImageRefused, match=re.escape(elsewhere)):
        client.submit(elsewhere, url=dev.url)
    good = fresh("good.png")
    upload(dev_s3, good)
    with pytest.raises(client.ImageRefused, match=re.escape(f"s3://{BUCKET}/{missing}")):
        client.submit_many([good, missing], url=dev.url)  # one refused image refuses the call
    with pytest.raises(client.ImageRefused, match="output format"):
        client.submit(good, output_format="fbx", url=dev.url)
    assert {r["id"] for r in dev.runs()} - before <= {r["id"] for r in runs_covering(dev, good)}  # the sensor's
    assert missing not in dev.partitions()["models_3d"]
    unknown = client.result("00000000-0000-0000-0000-000000000000", url=dev.url)
    assert unknown["status"] == "error" and "no run" in unknown["message"] and unknown["progress"] == 0


def test_submit_many_batches_and_reports_each_image(dev, dev_s3):
    keys = [fresh(f"batch-{i}.png") for i in range(3)]
    with dev_sensor_paused(dev):  # the client alone decides how these new images are batched
        for key in keys:
            upload(dev_s3, key)
        run_ids = client.submit_many([keys[0], f"s3://{BUCKET}/{keys[1]}", keys[2]], url=dev.url)
    assert len(run_ids) == 3 and len(set(run_ids)) == 1  # three new, contiguous partitions: one run
    seen = follow(run_ids[0], dev.url)
    final = seen[-1]
    assert final["status"] == "success", final
    assert set(final["images"]) == set(keys)
    for key in keys:
        entry = final["images"][key]
        assert entry["status"] == "success" and entry["model_url"] == f"s3://{BUCKET}/models/{key}.glb"
        assert glb_at(entry["download_url"])[:4] == b"glTF"
    values = [r["progress"] for r in seen]
    assert values == sorted(values) and values[-1] == 100
    # n of N and the current image while it ran
    stages = {(r["current"]["index"], r["current"]["image"]) for r in seen if r["current"]}
    assert stages <= {(n, key) for n, key in enumerate(keys, 1)}
    lines = [m for m in run_details(dev, run_ids[0])["messages"] if m.startswith("progress: ")]
    assert lines[-1] == f"progress: image 3 of 3 (100%), done: {keys[2]}"
    assert [line for line in lines if "generating" in line] == [
        f"progress: image {n} of 3 ({int(100 * (n - 0.9) / 3)}%), generating: {key}" for n, key in enumerate(keys, 1)]


def test_failed_image_reports_its_message(dev, dev_s3):
    good, bad = fresh("fine.png"), fresh("broken.png")
    with dev_sensor_paused(dev):
        upload(dev_s3, good)
        dev_s3.put_object(Bucket=BUCKET, Key=bad, Body=b"these bytes are no picture", ContentType="image/png")
        run_ids = client.submit_many([good, bad], url=dev.url)
    assert len(set(run_ids)) == 1
    final = follow(run_ids[0], dev.url)[-1]
    assert final["status"] == "error" and final["run_status"] == "FAILURE" and final["progress"] == 100
    assert final["images"][good]["status"] == "success" and final["images"][good]["download_url"]
    failed = final["images"][bad]
    assert failed["status"] == "error" and failed["model_url"] is None
    assert f"s3://{BUCKET}/{bad}" in failed["message"] and "image" in failed["message"]
    assert final["message"] == f"{bad}: {failed['message']}"


def test_sensor_launches_no_second_run(dev, dev_s3):
    # submitted while the sensor could not see it; the sensor then lists it, and leaves it to the client's run
    first = fresh("first.png")
    with dev_sensor_paused(dev) as resumed:
        upload(dev_s3, first)
        run_id = client.submit(first, url=dev.url)
    wait_for(lambda: dev.ticks_since(resumed[0]) >= 1, 60, "a tick after the sensor resumed")
    assert follow(run_id, dev.url)[-1]["status"] == "success"
    assert [r["id"] for r in runs_covering(dev, first)] == [run_id]
    # uploaded and submitted at once, the sensor ticking every second: whoever comes first, one run per image
    submitted = {}
    for n in range(3):
        key = fresh(f"race-{n}.png")
        upload(dev_s3, key)
        submitted[key] = client.submit(key, url=dev.url)
    for key, run_id in submitted.items():
        assert follow(run_id, dev.url)[-1]["status"] == "success"
    start = time.time()
    wait_for(lambda: dev.ticks_since(start) >= 1, 60, "a tick that lists them all")
    for key, run_id in submitted.items():
        assert [r["id"] for r in runs_covering(dev, key)] == [run_id], dev.runs()[:6]


def test_submit_takes_the_run_the_sensor_launched_already(dev, dev_s3):
    key = fresh("seen.png")
    upload(dev_s3, key)
    sensor_run = wait_for(lambda: runs_covering(dev, key), 60, "the sensor's run")[0]
    assert sensor_run["tags"]["hy3d/sensor"] == "new_images_sensor"
    assert client.submit(key, url=dev.url) == sensor_run["id"]
    assert follow(sensor_run["id"], dev.url)[-1]["model_url"] == f"s3://{BUCKET}/models/{key}.glb"
    assert [r["id"] for r in runs_covering(dev, key)] == [sensor_run["id"]]


class dev_sensor_paused:
    """The new-images sensor stopped inside the block; on exit it is started again, and `resumed[0]` is when."""

    def __init__(self, dev) -> None:
        self.dev, self.resumed = dev, [0.0]

    def __enter__(self):
        self.dev.stop_sensor()
        return self.resumed

    def __exit__(self, *exc) -> None:
        self.resumed[0] = self.dev.start_sensor()


def test_readme_fastapi_endpoint_works_as_written(dev, dev_s3, monkeypatch):
    from fastapi.testclient import TestClient

    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- fastapi-example:begin -->\n```python\n(.*?)```\n<!-- fastapi-example:end -->", text,
                     re.S).group(1)
    monkeypatch.setenv("HY3D_DAGSTER_URL", dev.url)  # the example's own configuration: the webserver's address
    namespace: dict = {}
    exec(compile(code, "README.md (FastAPI example)", "exec"), namespace)
    web = TestClient(namespace["app"])
    key = fresh("chair.png")
    upload(dev_s3, key)
    answer = web.post("/generate-3d", params={"s3_image_url": f"s3://{BUCKET}/{key}"})
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["task_id"]
    final = wait_for(lambda: (r := web.get(f"/generate-3d/{task_id}").json())["status"] in ("success", "error") and r,
                     180, "the web app's task")
    assert final["status"] == "success" and glb_at(final["download_url"])[:4] == b"glTF"
    refused = web.post("/generate-3d", params={"s3_image_url": f"s3://{BUCKET}/web/nope.png"})
    assert refused.status_code == 400 and f"s3://{BUCKET}/web/nope.png" in refused.json()["detail"]


# ---- the sensor's side, with the real sensor code on a Dagster instance (no webserver needed) ----------------

def _resolve(instance, storage, images, **request):
    from dagster import build_sensor_context

    from hy3d_pipeline.client_api import resolve
    from hy3d_pipeline.models.resources import GeneratorResource

    return resolve(build_sensor_context(instance=instance), storage, GeneratorResource.from_env(),
                   {"images": images, **request})


def test_tick_leaves_an_image_being_submitted_to_the_client(ticker, storage, s3, monkeypatch):
    from dagster._core.test_utils import create_run_for_test

    from hy3d_pipeline.images import submitted
    from hy3d_pipeline.images.catalog import RequestedImages

    s3.put_object(Bucket=storage.images_bucket, Key="a.png", Body=png_bytes())
    answer = _resolve(ticker.instance, storage, ["a.png"])  # the submission has begun, its run not launched yet
    (image,) = answer["images"]
    assert image["run_id"] is None and not image["exists"]
    data = ticker()
    assert ticker.requested(data) == []
    assert RequestedImages(ticker.instance).get(["a.png"])["a.png"].client
    assert ticker.requested(ticker()) == []  # looked at again, still left to the submission
    ticker.instance.add_dynamic_partitions("images", ["a.png"])
    create_run_for_test(ticker.instance, job_name="image_to_model_job",
                        tags={"dagster/partition": "a.png", **submitted.run_tags({"a.png": image["etag"]})})
    assert ticker.requested(ticker()) == []  # the client's run is seen: requested already, for good
    monkeypatch.setattr(submitted, "INTENT_TTL_S", 0.0)
    assert ticker.requested(ticker()) == []
    # a submission that never launched leaves its image to the sensor once it is too old to launch
    s3.put_object(Bucket=storage.images_bucket, Key="b.png", Body=png_bytes(shape="box"))
    monkeypatch.setattr(submitted, "INTENT_TTL_S", 120.0)
    _resolve(ticker.instance, storage, ["b.png"])
    assert ticker.requested(ticker()) == []
    monkeypatch.setattr(submitted, "INTENT_TTL_S", 0.0)
    assert ticker.requested(ticker()) == ["b.png"]
    # overwritten since the client's run: the new version is the sensor's
    s3.put_object(Bucket=storage.images_bucket, Key="a.png", Body=png_bytes(shape="box"))
    assert ticker.requested(ticker()) == ["a.png"]


def test_submission_takes_the_run_the_sensor_already_requested(ticker, storage, s3, monkeypatch):
    from dagster import DagsterRunStatus
    from dagster._core.test_utils import create_run_for_test

    from hy3d_pipeline import client_api

    s3.put_object(Bucket=storage.images_bucket, Key="c.png", Body=png_bytes())
    data = ticker()
    (request,) = data.run_requests
    assert request.partition_key == "c.png"
    run = create_run_for_test(ticker.instance, job_name="__ASSET_JOB", status=DagsterRunStatus.NOT_STARTED,
                              tags={**request.tags, "dagster/partition": "c.png"})
    (image,) = _resolve(ticker.instance, storage, ["c.png"])["images"]
    assert image["run_id"] == run.run_id  # not started yet: taken, no second run
    (image,) = _resolve(ticker.instance, storage, ["c.png"], output_format="obj")["images"]
    assert image["run_id"] is None  # other options: another product, a run of its own
    ticker.instance.report_run_failed(run)
    (image,) = _resolve(ticker.instance, storage, ["c.png"])["images"]
    assert image["run_id"] is None  # failed: a submission is a new attempt
    # the tick's run not created yet (the latest tick may still be submitting): waited for, then given up on
    s3.put_object(Bucket=storage.images_bucket, Key="d.png", Body=png_bytes(shape="box"))
    assert ticker.requested(ticker()) == ["d.png"]
    monkeypatch.setattr(client_api, "TICK_WAIT_S", 0.5)
    (image,) = _resolve(ticker.instance, storage, ["d.png"])["images"]
    assert image["run_id"] is None
