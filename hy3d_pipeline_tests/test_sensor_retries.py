"""Images whose run ended without a model are requested again, boundedly, then given up on visibly.

Runs are real: executed in-process with `materialize` against the real bucket (SeaweedFS, or moto for event
mode), failing for real because the objects are not images; a killed run is a real run record that the
instance is told has failed, as run monitoring would.
"""

from __future__ import annotations

import uuid

from dagster import AssetKey, AssetRecordsFilter, DagsterRun, DagsterRunStatus, materialize

from hy3d_pipeline_tests.conftest import png_bytes, put
from hy3d_pipeline_tests.test_sensor_events import events_env  # noqa: F401 - the fixture, shared


def execute(ticker, data) -> list[DagsterRunStatus]:
    """Run the tick's requests in-process as the daemon would launch them (the ticker recorded the partitions)."""
    from hy3d_pipeline.models.assets import image_to_model

    statuses = []
    for request in data.run_requests:
        outcome = materialize([image_to_model], instance=ticker.instance, resources=ticker.defs.resources,
                              selection=request.asset_selection, partition_key=request.partition_key,
                              tags=request.tags, raise_on_error=False)
        statuses.append(ticker.instance.get_run_by_id(outcome.run_id).status)
    return statuses


def gave_up(instance, key):
    records = instance.fetch_observations(
        AssetRecordsFilter(asset_key=AssetKey("source_images"), asset_partitions=[key]), limit=100).records
    return [m for r in records if "gave_up" in (m := r.event_log_entry.asset_observation.metadata)]


def test_failed_runs_are_requested_again_then_given_up(ticker, s3, storage, monkeypatch):
    b = storage.images_bucket
    put(s3, b, "bad-a.png")  # not images: every run fails for them
    put(s3, b, "bad-b.png")
    first = ticker()
    assert sorted(ticker.requested(first)) == ["bad-a.png", "bad-b.png"]
    assert execute(ticker, first) == [DagsterRunStatus.FAILURE]
    assert ticker().run_requests == []  # backoff: the first retry waits 2 × 15 s
    monkeypatch.setenv("HY3D_RETRY_BACKOFF_SECONDS", "0")
    keys = {r.run_key for r in first.run_requests}
    for _attempt in (2, 3):
        again = ticker()
        assert sorted(ticker.requested(again)) == ["bad-a.png", "bad-b.png"]
        assert not keys & {r.run_key for r in again.run_requests}  # new run keys, or Dagster would drop them
        keys |= {r.run_key for r in again.run_requests}
        assert set(execute(ticker, again)) == {DagsterRunStatus.FAILURE}
    final = ticker()
    assert final.run_requests == []
    [record] = gave_up(ticker.instance, "bad-a.png")
    assert record["gave_up"].value is True and record["attempts"].value == 3 and record["last_run_id"].value
    assert ticker().run_requests == [] and len(gave_up(ticker.instance, "bad-a.png")) == 1  # recorded once
    put(s3, b, "bad-a.png", png_bytes())  # fixed: new content, a fresh start
    fixed = ticker()
    assert ticker.requested(fixed) == ["bad-a.png"]
    assert execute(ticker, fixed) == [DagsterRunStatus.SUCCESS]
    assert ticker().run_requests == []


def test_partly_failed_batch_retries_only_the_failed_images(ticker, s3, storage, monkeypatch):
    monkeypatch.setenv("HY3D_RETRY_BACKOFF_SECONDS", "0")
    b = storage.images_bucket
    put(s3, b, "a-good.png", png_bytes())
    put(s3, b, "b-bad.png")
    first = ticker()
    assert len(first.run_requests) == 1  # one batch of two
    assert execute(ticker, first) == [DagsterRunStatus.FAILURE]
    assert ticker.requested(ticker()) == ["b-bad.png"]


def test_run_reported_failed_is_requested_again(ticker, s3, storage, monkeypatch):
    """A killed run (its worker SIGKILLed) that run monitoring reports failed, and a cancelled run; a run
    Dagster will retry is left to Dagster."""
    monkeypatch.setenv("HY3D_RETRY_BACKOFF_SECONDS", "0")
    b = storage.images_bucket
    put(s3, b, "killed.png", png_bytes())
    put(s3, b, "retried.png", png_bytes(shape="box"))
    put(s3, b, "cancelled.png", png_bytes(color=(20, 200, 40, 255)))
    data = ticker()
    for request in data.run_requests:
        assert request.partition_key is None  # one batch: give each key a run of its own below
    base = data.run_requests[0].tags
    tags = {k: v for k, v in base.items() if not k.startswith(("dagster/asset_partition_range", "hy3d/batch"))}
    for key, extra in (("killed.png", {}), ("retried.png", {"dagster/will_retry": "true"}), ("cancelled.png", {})):
        run = DagsterRun(job_name="__ASSET_JOB", run_id=str(uuid.uuid4()), status=DagsterRunStatus.STARTED,
                         tags={**tags, "dagster/partition": key, **extra})
        ticker.instance.add_run(run)
        if key == "cancelled.png":
            ticker.instance.report_run_canceled(run)
        else:
            ticker.instance.report_run_failed(run)
    assert sorted(ticker.requested(ticker())) == ["cancelled.png", "killed.png"]


def test_event_mode_requests_failed_images_again(events_env, monkeypatch):
    monkeypatch.setenv("HY3D_RETRY_BACKOFF_SECONDS", "0")
    monkeypatch.setenv("HY3D_MAX_ATTEMPTS", "2")
    s3, b, ticker = events_env["s3"], events_env["bucket"], events_env["ticker"]
    ticker()  # the first tick lists
    s3.put_object(Bucket=b, Key="bad.png", Body=b"not an image")
    first = ticker()
    assert ticker.requested(first) == ["bad.png"]
    assert execute(ticker, first) == [DagsterRunStatus.FAILURE]
    again = ticker()
    assert ticker.requested(again) == ["bad.png"]
    assert execute(ticker, again) == [DagsterRunStatus.FAILURE]
    assert ticker().run_requests == []
    assert [m["attempts"].value for m in gave_up(ticker.instance, "bad.png")] == [2]


def test_rows_from_before_retries_are_read_as_one_attempt(ticker, s3, storage, monkeypatch):
    """Catalog rows of the first format, written before retries were counted (`etag|tick`), still take part in
    retries."""
    from hy3d_pipeline.images.catalog import RequestedImages
    from hy3d_pipeline_tests.conftest import write_first_format_rows

    monkeypatch.setenv("HY3D_RETRY_BACKOFF_SECONDS", "0")
    monkeypatch.setenv("HY3D_MAX_ATTEMPTS", "2")
    put(s3, storage.images_bucket, "old.png")
    with monkeypatch.context() as old_version:
        old_version.setattr(RequestedImages, "set", lambda self, etags, seq, **_: write_first_format_rows(
            ticker.instance, {k: f"{v}|{seq}" for k, v in etags.items()}, seq))
        first = ticker()
    assert execute(ticker, first) == [DagsterRunStatus.FAILURE]
    again = ticker()
    assert ticker.requested(again) == ["old.png"]
    assert execute(ticker, again) == [DagsterRunStatus.FAILURE]
    assert ticker().run_requests == []
    assert [m["attempts"].value for m in gave_up(ticker.instance, "old.png")] == [2]
