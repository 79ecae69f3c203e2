"""Event mode against moto's server on loopback: S3 notifications to SQS, read by the sensor.

moto provides both the bucket that emits the events and the queue (SeaweedFS has no SQS); everything goes
through the real AWS APIs over HTTP.
"""

from __future__ import annotations

import json
import time
import uuid

import boto3
import pytest

from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline_tests.conftest import Ticker


@pytest.fixture
def events_env(moto_server, monkeypatch, instance, tmp_path):
    return make_events_env(moto_server, monkeypatch, instance, tmp_path)


def make_events_env(moto_server, monkeypatch, instance, tmp_path) -> dict:
    """A moto bucket that notifies a moto queue, the environment of a deployment in event mode on it, and a
    Ticker on `instance`."""
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "S3_REGION": "us-east-1",
                        "S3_ENDPOINT_URL": moto_server, "HY3D_SQS_VISIBILITY_SECONDS": "2",
                        "S3_TEMP_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    for name in ("S3_IMAGES_PREFIX", "S3_MODELS_BUCKET", "S3_MODELS_PREFIX", "AWS_PROFILE", "HY3D_RECONCILE_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    bucket = f"ev-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=bucket)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [
        {"QueueArn": arn, "Events": ["s3:ObjectCreated:*", "s3:ObjectRemoved:*"]}]})
    monkeypatch.setenv("S3_IMAGES_BUCKET", bucket)
    monkeypatch.setenv("S3_EVENTS_QUEUE_URL", queue)
    ticker = Ticker(instance)
    ticker.defs = build_defs()
    return {"s3": s3, "sqs": sqs, "queue": queue, "bucket": bucket, "ticker": ticker}


def queue_depth(env) -> int:
    attrs = env["sqs"].get_queue_attributes(QueueUrl=env["queue"], AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])


def test_events_drive_requests(events_env):
    s3, b, ticker = events_env["s3"], events_env["bucket"], events_env["ticker"]
    s3.put_object(Bucket=b, Key="before.png", Body=b"0")
    assert ticker.requested(ticker()) == ["before.png"]  # first tick: a listing pass (nothing to trust yet)
    s3.put_object(Bucket=b, Key="a b+c ünï.png", Body=b"1")  # arrives URL-encoded in the event
    s3.put_object(Bucket=b, Key="notes.txt", Body=b"2")
    s3.put_object(Bucket=b, Key="models/x.png.glb", Body=b"3")
    upload = s3.create_multipart_upload(Bucket=b, Key="big.png")  # two created events for one object
    part = s3.upload_part(Bucket=b, Key="big.png", UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 6_000_000)
    s3.complete_multipart_upload(Bucket=b, Key="big.png", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    s3.copy_object(Bucket=b, Key="big-copy.png", CopySource={"Bucket": b, "Key": "big.png"})
    data = ticker()
    assert sorted(ticker.requested(data)) == ["a b+c ünï.png", "big-copy.png", "big.png"]
    assert queue_depth(events_env) > 0  # not deleted until this tick is committed
    assert ticker().run_requests == []
    assert queue_depth(events_env) == 0  # the next tick deleted what the committed one read
    s3.put_object(Bucket=b, Key="before.png", Body=b"overwritten")
    s3.put_object(Bucket=b, Key="after.png", Body=b"new")
    assert sorted(ticker.requested(ticker())) == ["after.png", "before.png"]


def test_deletion_event_marks_partition(events_env):
    s3, b, ticker = events_env["s3"], events_env["bucket"], events_env["ticker"]
    s3.put_object(Bucket=b, Key="a.png", Body=b"0")
    ticker()
    s3.delete_object(Bucket=b, Key="a.png")
    data = ticker()
    assert data.run_requests == [] and len(data.asset_events) == 1
    assert data.asset_events[0].metadata["deleted"].value is True


def test_sensor_killed_between_ticks_loses_nothing(events_env):
    s3, b, ticker = events_env["s3"], events_env["bucket"], events_env["ticker"]
    ticker()
    s3.put_object(Bucket=b, Key="x.png", Body=b"1")
    lost = ticker(commit=False)  # the daemon dies: runs and cursor never stored, messages not deleted
    assert ticker.requested(lost) == ["x.png"]
    time.sleep(2.5)  # the messages come back after their visibility timeout
    again = ticker()
    assert ticker.requested(again) == ["x.png"]
    assert again.run_requests[0].run_key == lost.run_requests[0].run_key  # a repeat Dagster would drop


def test_reconcile_listing_catches_what_the_queue_missed(events_env, monkeypatch):
    s3, sqs, b, ticker = events_env["s3"], events_env["sqs"], events_env["bucket"], events_env["ticker"]
    ticker()
    s3.put_object(Bucket=b, Key="missed.png", Body=b"1")
    sqs.purge_queue(QueueUrl=events_env["queue"])  # the notification is lost
    assert ticker().run_requests == []
    monkeypatch.setenv("HY3D_RECONCILE_SECONDS", "0")
    assert ticker.requested(ticker()) == ["missed.png"]


def test_test_event_ignored_and_garbage_left_to_the_redrive_policy(events_env, capfd):
    """Unreadable messages are not deleted: with a redrive policy they end in the dead-letter queue."""
    sqs, ticker = events_env["sqs"], events_env["ticker"]
    dlq = sqs.create_queue(QueueName=events_env["bucket"] + "-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sqs.set_queue_attributes(QueueUrl=events_env["queue"], Attributes={"RedrivePolicy": json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"})})
    ticker()
    sqs.send_message(QueueUrl=events_env["queue"], MessageBody=json.dumps({"Event": "s3:TestEvent", "Bucket": "x"}))
    garbage = sqs.send_message(QueueUrl=events_env["queue"], MessageBody="not json")["MessageId"]
    assert ticker().run_requests == []
    log = capfd.readouterr().err
    assert "1 unreadable queue message(s)" in log and garbage in log and "not json" not in log
    ticker()
    assert queue_depth(events_env) == 1  # the test event deleted, the garbage left
    time.sleep(2.5)  # visible again; received once already: the queue moves it to the dead-letter queue
    ticker()
    assert queue_depth(events_env) == 0
    moved = sqs.receive_message(QueueUrl=dlq, MaxNumberOfMessages=10)["Messages"]
    assert [m["MessageId"] for m in moved] == [garbage]


def test_messages_read_before_a_reconcile_tick_are_deleted(events_env, monkeypatch):
    s3, b, ticker = events_env["s3"], events_env["bucket"], events_env["ticker"]
    ticker()
    s3.put_object(Bucket=b, Key="x.png", Body=b"1")
    assert ticker.requested(ticker()) == ["x.png"]  # read from the queue: deleted by the next tick
    monkeypatch.setenv("HY3D_RECONCILE_SECONDS", "0")  # the next tick is a full listing
    assert ticker().run_requests == []
    assert queue_depth(events_env) == 0


def test_refused_deletes_are_retried_then_kept_for_the_next_tick(events_env, capfd):
    from hy3d_pipeline.images import events
    from hy3d_pipeline.images.planner import Cursor

    sqs, ticker = events_env["sqs"], events_env["ticker"]
    ticker()
    sqs.send_message(QueueUrl=events_env["queue"], MessageBody=json.dumps({"Event": "s3:TestEvent", "Bucket": "x"}))
    ticker()  # reads the message; its handle waits for the next tick
    cursor = Cursor.load(ticker.cursor)
    [seq] = cursor.pending
    pending = events.PendingDeletes(ticker.instance)
    handles, _tries = pending.load(seq)
    pending.save(seq, handles + ["not-a-receipt-handle"])  # one the queue will refuse
    ticker()
    assert queue_depth(events_env) == 0  # the good handle deleted
    assert seq in Cursor.load(ticker.cursor).pending  # the refused one kept for the next tick
    assert "refused to delete 1 message(s)" in capfd.readouterr().err  # the sensor's log
    for _ in range(3):
        ticker()
    assert seq not in Cursor.load(ticker.cursor).pending  # not for ever


def test_stale_created_event_does_not_rewind_to_an_old_version(events_env):
    s3, sqs, b, ticker = events_env["s3"], events_env["sqs"], events_env["bucket"], events_env["ticker"]
    ticker()
    old = s3.put_object(Bucket=b, Key="x.png", Body=b"v1")["ETag"].strip('"')
    ticker()
    s3.put_object(Bucket=b, Key="x.png", Body=b"v2")
    assert ticker.requested(ticker()) == ["x.png"]
    # the v1 event delivered again, late (SQS keeps no order; a redelivery looks just like this)
    sqs.send_message(QueueUrl=events_env["queue"], MessageBody=json.dumps({"Records": [{
        "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": b}, "object": {
            "key": "x.png", "eTag": old, "sequencer": "0"}}}]}))
    assert ticker().run_requests == []
    assert ticker().run_requests == []  # and the catalog still holds v2: nothing requested later either
