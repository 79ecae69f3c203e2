"""Event mode: S3 event notifications read from SQS instead of listing the bucket.

Work per tick grows with the number of new events, not with the bucket. Messages are deleted from the queue
only once the tick that read them is committed (its cursor stored, so its partitions and runs are recorded):
their receipt handles wait in the instance's key-value table under the tick's number and are deleted at the
start of the next tick, whatever kind of tick that is (a reconcile listing too). Deletes the queue refuses are
retried once, then kept for the next tick (up to _KEEP_TICKS ticks). Unreadable messages are never deleted: they
are counted and logged by id, and left to the queue's redrive policy (a dead-letter queue keeps them for a
person to look at). A tick that never commits leaves its messages to reappear after the visibility timeout.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import unquote_plus, urlsplit
from hy3d_pipeline.settings import current

from hy3d_pipeline.dagster_private import kv_get, kv_set

_KEEP_TICKS = 3  # a handle the queue keeps refusing is stale (its message came back): stop trying
_RING = 64  # slots for pending receipt handles; a slot is reused 64 ticks later, long after it was deleted
_ROW_BYTES = 60_000  # of handles per key-value row: under the 65,535 bytes of MySQL TEXT, with room for the rest


def sqs_client(url: str, region: str):
    import boto3

    endpoint = current().sqs_endpoint_url or None
    host = urlsplit(url).hostname or ""
    if endpoint is None and not host.endswith(("amazonaws.com", "amazonaws.com.cn")):
        endpoint = f"{urlsplit(url).scheme}://{urlsplit(url).netloc}"  # S3-compatible setups: the queue's own host
    return boto3.client("sqs", region_name=region, endpoint_url=endpoint)


@dataclass
class EventBatch:
    created: dict[str, tuple[str, str]] = field(default_factory=dict)  # object key -> (etag, sequencer)
    deleted: dict[str, str] = field(default_factory=dict)  # object key -> sequencer
    handles: list[str] = field(default_factory=list)
    messages: int = 0
    ignored: int = 0
    unreadable: list[str] = field(default_factory=list)  # message ids (never their bodies: they may hold anything)


def _records(body: str) -> list[dict] | None:
    """The S3 records of one message body (plain, or wrapped by SNS); [] for test events; None if unreadable."""
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("Type") == "Notification" and "Message" in data:
            data = json.loads(data["Message"])
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("Event") == "s3:TestEvent":
        return []
    return data.get("Records") if isinstance(data.get("Records"), list) else None


def settle_deletions(batch: EventBatch, exists) -> None:
    """For keys with a deletion in the batch, ask S3 what is there now (`exists(key) -> etag or None`): event
    order is only as good as the sequencers, which S3-compatible servers do not always fill in."""
    for key in list(batch.deleted):
        etag = exists(key)
        if etag is None:
            batch.created.pop(key, None)
        else:
            batch.created[key] = (etag, batch.deleted.pop(key))


def _newer(sequencer: str, than: str) -> bool:
    # S3 sequencers are hex strings to compare after left-padding to the same length
    width = max(len(sequencer), len(than))
    return sequencer.rjust(width, "0") >= than.rjust(width, "0")


def add_record(batch: EventBatch, record: dict, bucket: str) -> None:
    s3 = record.get("s3") or {}
    if (s3.get("bucket") or {}).get("name") != bucket:
        batch.ignored += 1
        return
    obj = s3.get("object") or {}
    key = unquote_plus(obj.get("key", ""))
    sequencer = str(obj.get("sequencer", ""))
    name = str(record.get("eventName", ""))
    if name.startswith("ObjectCreated:"):
        prior = batch.created.get(key)
        if prior is None or _newer(sequencer, prior[1]):
            batch.created[key] = (str(obj.get("eTag", "")).strip('"'), sequencer)
    elif name.startswith("ObjectRemoved:"):
        if key not in batch.deleted or _newer(sequencer, batch.deleted[key]):
            batch.deleted[key] = sequencer
    else:
        batch.ignored += 1


def receive(client, url: str, bucket: str, max_messages: int, visibility: int, budget_s: float,
            readers: int = 4) -> EventBatch:
    """Drain up to `max_messages` messages within `budget_s`, with a few concurrent readers: each receive is a
    network round trip, and SQS serves concurrent receivers."""
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + budget_s
    lock = threading.Lock()
    received: list[dict] = []

    def reader() -> None:
        while time.monotonic() < deadline:
            with lock:
                room = max_messages - len(received)
            if room <= 0:
                return
            answer = client.receive_message(QueueUrl=url, MaxNumberOfMessages=min(10, room), WaitTimeSeconds=0,
                                            VisibilityTimeout=visibility)
            messages = answer.get("Messages", [])
            if not messages:
                return
            with lock:
                received.extend(messages)

    with ThreadPoolExecutor(readers) as pool:
        for future in [pool.submit(reader) for _ in range(readers)]:
            future.result()
    batch = EventBatch()
    for message in received:
        batch.messages += 1
        records = _records(message.get("Body", ""))
        if records is None:
            batch.unreadable.append(str(message.get("MessageId", "?")))
            continue
        batch.handles.append(message["ReceiptHandle"])
        for record in records:
            add_record(batch, record, bucket)
    return batch


class PendingDeletes:
    """Receipt handles of a tick's messages, kept until that tick is committed.

    A tick of 5,000 messages holds up to 5 MB of handles (SQS allows 1,024 characters each), more than one row of
    the key-value table holds on every instance storage (MySQL TEXT: 65,535 bytes). So a tick's handles are split
    over rows of at most _ROW_BYTES: the head (`hy3d/sqs/pending/<slot>`) says how many rows there are, the others
    are `<head>/<n>`, and every row carries the tick number, so what a reused slot left behind is never read. The
    head is written last: a tick that dies part way leaves the slot's previous head, which names another tick.
    A head of the first format (every handle in it, no row count) reads the same."""

    def __init__(self, instance) -> None:
        self._instance = instance

    @staticmethod
    def _slot(seq: int) -> str:
        return f"hy3d/sqs/pending/{seq % _RING}"

    def _write(self, seq: int, handles: list[str], tries: int = 0) -> None:
        parts: list[list[str]] = [[]]
        size = 0
        for handle in handles:
            cost = len(json.dumps(handle)) + 2
            if parts[-1] and size + cost > _ROW_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(handle)
            size += cost
        head = self._slot(seq)
        kv_set(self._instance, {f"{head}/{n}": json.dumps({"seq": seq, "handles": part})
                                for n, part in enumerate(parts[1:], 1)})
        kv_set(self._instance, {head: json.dumps({"seq": seq, "handles": parts[0], "rows": len(parts),
                                                  **({"tries": tries} if tries else {})})})

    def save(self, seq: int, handles: list[str]) -> None:
        self._write(seq, handles)

    def load(self, seq: int) -> tuple[list[str], int] | None:
        """(handles, ticks that already tried to delete them) saved for tick `seq`; None when there are none."""
        head = self._slot(seq)
        raw = kv_get(self._instance, [head]).get(head)
        data = json.loads(raw) if raw else {}
        if data.get("seq") != seq:
            return None
        handles = list(data.get("handles", []))
        names = [f"{head}/{n}" for n in range(1, int(data.get("rows", 1)))]
        rows = kv_get(self._instance, names) if names else {}
        for name in names:
            part = json.loads(rows.get(name) or "{}")
            # overwritten by a later tick of this slot that died before its head: those messages come back after
            # their visibility timeout, and their images are already requested
            if part.get("seq") == seq:
                handles += part.get("handles", [])
        return handles, int(data.get("tries", 0))

    def flush(self, client, url: str, seqs: list[int], log=None) -> list[int]:
        """Delete from the queue the messages of these committed ticks; returns the ticks whose handles the
        queue refused twice, kept for the next tick."""
        kept: list[int] = []
        for seq in seqs:
            saved = self.load(seq)
            if saved is None:
                continue
            handles, tries = saved
            failed: list[str] = []
            failures: list[str] = []
            for i in range(0, len(handles), 10):
                chunk = handles[i:i + 10]
                for attempt in range(2):
                    entries = [{"Id": str(n), "ReceiptHandle": h} for n, h in enumerate(chunk)]
                    answer = client.delete_message_batch(QueueUrl=url, Entries=entries)
                    refused = answer.get("Failed") or []
                    chunk = [chunk[int(f["Id"])] for f in refused]
                    if not chunk:
                        break
                    if attempt == 1:
                        failed += chunk
                        failures += [f"{f.get('Code', '?')}: {f.get('Message', '')}" for f in refused]
            tries += 1
            if failed and tries < _KEEP_TICKS:
                kept.append(seq)
                self._write(seq, failed, tries)
            else:
                self._write(seq, [])
            if failed and log is not None:
                log(f"the queue refused to delete {len(failed)} message(s) of tick {seq} twice "
                    f"({'; '.join(sorted(set(failures)))[:300]}): "
                    + ("kept for the next tick" if seq in kept else f"given up after {tries} ticks; if they come "
                       "back, their images are already requested and nothing is requested twice"))
        return kept
