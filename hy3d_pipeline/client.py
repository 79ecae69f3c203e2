"""A client for web apps: submit images to a running hy3d-pipeline and read their results.

    from hy3d_pipeline import client

    run_id = client.submit("s3://my-images/uploads/photo.png")   # or a presigned URL, or "uploads/photo.png"
    client.result(run_id)   # {"status": "running", "progress": 10.0, "model_url": None, ...}

It talks only to the Dagster webserver (`url`, default HY3D_DAGSTER_URL or http://127.0.0.1:3000) over its GraphQL
API, the one the UI uses: no S3 settings or credentials, no dagster import (standard library only), so a web app
pays for neither. What must be judged with the pipeline's own configuration (does the object exist, which
partition is it, presigning a download) is asked of the code location through the webserver (client_api.py).

A submission: the image is resolved and checked (a missing object is refused at once, naming its whole key, and
nothing is launched), its partition is registered, and one run of `image_to_model_job` is launched. The sensor
and the submission settle between them that an image version gets one run (images/submitted.py): a submission
that finds the sensor's run for it returns that run's id instead. A presigned URL's query (its signature) is
dropped before anything leaves this process.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from typing import Any

from hy3d_pipeline.images.submitted import etags_of
from hy3d_pipeline.models import progress as _progress
from hy3d_pipeline.s3.urls import without_query
from hy3d_pipeline.settings import current

__all__ = ["ClientError", "ImageRefused", "default_url", "result", "submit", "submit_many"]

SENSOR = "client_requests"  # the code location's sensor that answers (client_api.py)
MODELS = ["models_3d"]
_HTTP_TIMEOUT_S = 60.0
_POLL_S = 1.0
_ADD_CHUNK = 100
_PENDING = {"QUEUED", "NOT_STARTED", "STARTING", "MANAGED"}
_RUNNING = {"STARTED", "CANCELING", "SUSPENDED"}
_ENDED = {"SUCCESS": "success", "FAILURE": "error", "CANCELED": "error"}


class ClientError(RuntimeError):
    """The webserver could not be reached, or did not do what was asked; the message says which and why."""


class ImageRefused(ValueError):
    """An image was refused before anything was launched: missing, outside the pipeline's images, or bad options."""


def default_url() -> str:
    """The webserver: HY3D_DAGSTER_URL, else the address `hy3d-pipeline dev` and `dagster dev` serve."""
    return current().dagster_url


class _Server:
    _selectors: dict[str, tuple[str, str]] = {}  # url -> (location, repository) holding the client sensor

    def __init__(self, url: str | None) -> None:
        self.url = (url or default_url()).rstrip("/")

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=_HTTP_TIMEOUT_S) as resp:
                answer = json.load(resp)
        except urllib.error.HTTPError as exc:
            raise ClientError(f"the Dagster webserver at {self.url} answered HTTP {exc.code}: "
                              f"{exc.read()[:500].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the Dagster webserver at {self.url} ({reason}): start it "
                              "(`hy3d-pipeline dev`, `dagster dev`) or pass url= / set HY3D_DAGSTER_URL") from None
        if answer.get("errors"):
            raise ClientError(f"the Dagster webserver at {self.url} refused a request: "
                              + "; ".join(e.get("message", "") for e in answer["errors"]))
        return answer["data"]

    def selector(self, fresh: bool = False) -> tuple[str, str]:
        if fresh or self.url not in self._selectors:
            data = self.graphql("{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name "
                                "location { name } sensors { name } } } ... on Error { message } } }")
            nodes = data["repositoriesOrError"].get("nodes") or []
            found = [(n["location"]["name"], n["name"]) for n in nodes if SENSOR in {s["name"] for s in n["sensors"]}]
            if not found:
                raise ClientError(f"no code location at {self.url} is hy3d-pipeline (none has the sensor {SENSOR!r}): "
                                  "load hy3d_pipeline there (workspace.yaml), or wait until it has loaded")
            self._selectors[self.url] = found[0]
        return self._selectors[self.url]

    def ask(self, op: str, **request: Any) -> dict[str, Any]:
        """The code location's answer to a request (client_api.client_requests, through a sensor dry run)."""
        query = ("mutation($s: SensorSelector!, $c: String) { sensorDryRun(selectorData: $s, cursor: $c) { "
                 "__typename ... on DryRunInstigationTick { evaluationResult { cursor error { message } } } "
                 "... on Error { message } } }")
        for attempt in range(2):
            location, repository = self.selector(fresh=attempt > 0)
            data = self.graphql(query, {"s": {"repositoryLocationName": location, "repositoryName": repository,
                                              "sensorName": SENSOR}, "c": json.dumps({"op": op, **request})})
            tick = data["sensorDryRun"]
            if tick["__typename"] == "DryRunInstigationTick":
                break
            if tick["__typename"] not in ("SensorNotFoundError", "RepositoryLocationNotFound") or attempt:
                raise ClientError(f"{self.url}: the {op} request failed: {tick.get('message', tick['__typename'])}")
        evaluation = tick["evaluationResult"] or {}
        if evaluation.get("error"):
            raise ClientError(f"{self.url}: the code location failed to answer a {op} request: "
                              f"{evaluation['error']['message']}")
        return json.loads(evaluation.get("cursor") or "{}")

    def add_partitions(self, partitions_def: str, keys: Sequence[str]) -> None:
        location, repository = self.selector()
        for i in range(0, len(keys), _ADD_CHUNK):
            chunk = keys[i:i + _ADD_CHUNK]
            fields = " ".join(
                f"p{n}: addDynamicPartition(repositorySelector: $r, partitionsDefName: $d, partitionKey: $k{n}) "
                "{ __typename ... on Error { message } }" for n in range(len(chunk)))
            params = " ".join(f"$k{n}: String!" for n in range(len(chunk)))
            data = self.graphql(f"mutation($r: RepositorySelector!, $d: String!, {params}) {{ {fields} }}",
                                {"r": {"repositoryLocationName": location, "repositoryName": repository},
                                 "d": partitions_def, **{f"k{n}": k for n, k in enumerate(chunk)}})
            problems = [f"{chunk[n]!r}: {value.get('message', value['__typename'])}"
                        for n, value in enumerate(data[f"p{n}"] for n in range(len(chunk)))
                        if value["__typename"] not in ("AddDynamicPartitionSuccess", "DuplicateDynamicPartitionError")]
            if problems:
                raise ClientError(f"{self.url}: could not register partition(s) of {partitions_def!r}: "
                                  + "; ".join(problems))

    def launch(self, job: str, runs: list[dict[str, Any]]) -> list[str]:
        location, repository = self.selector()
        params = [{"selector": {"repositoryLocationName": location, "repositoryName": repository, "jobName": job},
                   "runConfigData": run["run_config"],
                   "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in run["tags"].items()]}}
                  for run in runs]
        data = self.graphql(
            "mutation($p: [ExecutionParams!]!) { launchMultipleRuns(executionParamsList: $p) { __typename "
            "... on LaunchMultipleRunsResult { launchMultipleRunsResult { __typename "
            "... on LaunchRunSuccess { run { runId } } ... on RunConfigValidationInvalid { errors { message } } "
            "... on Error { message } } } ... on Error { message } } }", {"p": params})
        outcome = data["launchMultipleRuns"]
        if outcome["__typename"] != "LaunchMultipleRunsResult":
            raise ClientError(f"{self.url}: no run launched: {outcome.get('message', outcome['__typename'])}")
        ids, problems = [], []
        for run, launched in zip(runs, outcome["launchMultipleRunsResult"]):
            if launched["__typename"] == "LaunchRunSuccess":
                ids.append(launched["run"]["runId"])
            else:
                why = launched.get("message") or "; ".join(e["message"] for e in launched.get("errors", []))
                names = ", ".join(map(repr, run["partitions"]))
                problems.append(f"the run for {names}: {why or launched['__typename']}")
        if problems:
            raise ClientError(f"{self.url}: {len(problems)} of {len(runs)} run(s) not launched"
                              + (f" (launched: {', '.join(ids)})" if ids else "") + ": " + "; ".join(problems))
        return ids


def submit(image: str, *, output_format: str | None = None, texture: str | None = None,
           url: str | None = None) -> str:
    """Launch one run for `image` (an S3 URL, a presigned URL, or a key relative to S3_IMAGES_PREFIX) and return
    its run id. Raises ImageRefused (nothing launched) for an image that does not exist or is not among the
    pipeline's images, or for unsupported options; ClientError when the webserver cannot be used."""
    return _submit([image], output_format, texture, url, batches=False)[0]


def submit_many(images: Iterable[str], *, output_format: str | None = None, texture: str | None = None,
                url: str | None = None) -> list[str]:
    """Like `submit` for many images, batched: images that are contiguous partitions share a run (up to the
    sensor's batch size). Returns one run id per image, in order; images of one batch have the same id. Every
    image is checked before anything is launched: one refused image refuses the call."""
    return _submit(list(images), output_format, texture, url, batches=True)


def _submit(images: list[Any], output_format: str | None, texture: str | None, url: str | None,
            batches: bool) -> list[str]:
    if not images:
        return []
    server = _Server(url)
    options = {"output_format": output_format, "texture": texture}
    # a presigned URL's signature is a credential, and the object it names is all the pipeline needs (it reads with
    # its own credentials): the query never leaves this process
    answer = server.ask("resolve", images=[without_query(i.strip()) if isinstance(i, str) else i for i in images],
                        batches=batches, **options)
    if answer.get("refused"):
        raise ImageRefused("; ".join(answer["refused"]))
    resolved = answer["images"]
    # an image the sensor requested moments ago has its run already: that one is taken, not a second launched
    by_key = {r["partition"]: r["run_id"] for r in resolved if r.get("run_id")}
    etags = {r["partition"]: r["etag"] for r in resolved if r["partition"] not in by_key}
    if etags:
        exists = {r["partition"]: r["exists"] for r in resolved}
        server.add_partitions(answer["partitions_def"], [k for k in etags if not exists[k]])
        planned = server.ask("plan", partitions=list(etags), etags=etags, **options)
        if planned.get("refused"):
            raise ClientError(f"{server.url}: nothing launched: " + "; ".join(planned["refused"]))
        run_ids = server.launch(planned["job"], planned["runs"])
        by_key.update({key: run_id for run, run_id in zip(planned["runs"], run_ids) for key in run["partitions"]})
    return [by_key[r["partition"]] for r in resolved]


_RUN_QUERY = """query($id: ID!, $after: String) {
  runOrError(runId: $id) { __typename ... on Run { status tags { key value } } ... on Error { message } }
  logsForRun(runId: $id, afterCursor: $after) { __typename
    ... on EventConnection { cursor hasMore events { __typename
      ... on MessageEvent { message }
      ... on MaterializationEvent { assetKey { path } partition metadataEntries { label
        ... on TextMetadataEntry { text } } }
      ... on ObservationEvent { assetKey { path } partition metadataEntries { label
        ... on TextMetadataEntry { text } } }
      ... on ExecutionStepFailureEvent { error { message } failureMetadata { metadataEntries { label
        ... on JsonMetadataEntry { jsonString } } } }
      ... on RunFailureEvent { error { message } } } }
    ... on Error { message } } }"""


def _texts(entries: list[dict[str, Any]]) -> dict[str, str]:
    return {e["label"]: e["text"] for e in entries if "text" in e}


def _read(server: _Server, run_id: str) -> dict[str, Any]:
    """The run's state, from its status and its event log."""
    data = server.graphql(_RUN_QUERY, {"id": run_id, "after": None})
    run = data["runOrError"]
    if run["__typename"] != "Run":
        why = f"no run {run_id!r} at {server.url}: {run.get('message', '')}".rstrip(": ")
        return {"status": "error", "run_id": run_id, "run_status": None, "progress": 0.0, "model_url": None,
                "download_url": None, "message": why, "current": None, "images": {}}
    events = []
    logs = data["logsForRun"]
    while logs["__typename"] == "EventConnection":
        events += logs["events"]
        if not logs["hasMore"]:
            break
        logs = server.graphql(_RUN_QUERY, {"id": run_id, "after": logs["cursor"]})["logsForRun"]

    tags = {t["key"]: t["value"] for t in run["tags"]}
    keys = list(etags_of(tags))
    if not keys and tags.get("dagster/partition"):
        keys = [tags["dagster/partition"]]
    models: dict[str, str] = {}
    superseded: dict[str, str] = {}
    failed: dict[str, str] = {}
    failure = ""
    current: _progress.Progress | None = None
    best = 0.0
    reached: set[str] = set()
    for event in events:
        kind = event["__typename"]
        if kind == "MaterializationEvent" and event.get("assetKey", {}).get("path") == MODELS and event["partition"]:
            models[event["partition"]] = _texts(event["metadataEntries"]).get("model_url", "")
            superseded.pop(event["partition"], None)
        elif kind == "ObservationEvent" and event.get("assetKey", {}).get("path") == MODELS and event["partition"]:
            meta = _texts(event["metadataEntries"])
            if "superseded" in {e["label"] for e in event["metadataEntries"]}:
                superseded[event["partition"]] = meta.get("message") or "superseded by a newer version of the image"
        elif kind == "ExecutionStepFailureEvent":
            failure = (event.get("error") or {}).get("message") or event.get("message") or failure
            for entry in (event.get("failureMetadata") or {}).get("metadataEntries", []):
                if entry["label"] == "failed_partitions" and entry.get("jsonString"):
                    failed = json.loads(entry["jsonString"])
        elif kind == "RunFailureEvent":
            failure = failure or (event.get("error") or {}).get("message") or event.get("message", "")
        elif "message" in event:
            seen = _progress.parse(event["message"])
            if seen is not None:
                current, best = seen, max(best, seen.percent)
                reached.add(seen.image)
        key = event.get("partition")
        if key and key not in keys and kind in ("MaterializationEvent", "ObservationEvent"):
            keys.append(key)  # a run the client did not launch names its images only as it goes
    keys += sorted(reached.difference(keys))

    raw = run["status"]
    status = "pending" if raw in _PENDING else "running" if raw in _RUNNING else _ENDED.get(raw, "error")
    images: dict[str, dict[str, Any]] = {}
    for key in keys:
        entry: dict[str, Any] = {"status": "pending", "model_url": models.get(key) or None, "download_url": None,
                                 "message": ""}
        if key in models:
            entry["status"] = "success"
        elif key in superseded:
            entry.update(status="error", message=superseded[key])
        elif status in ("success", "error"):
            entry.update(status="error", message=failed.get(key) or failure.strip()
                         or ("canceled" if raw == "CANCELED" else "the run ended without a model for this image"))
        elif status == "running" and key in reached:
            entry["status"] = "running"
        images[key] = entry
    if status == "success" and any(e["status"] == "error" for e in images.values()):
        status = "error"
    if status == "success" and not images:
        status = "error"

    done = 100.0 if status in ("success", "error") else best if status == "running" else 0.0
    out: dict[str, Any] = {"status": status, "run_id": run_id, "run_status": raw, "progress": done,
                           "model_url": None, "download_url": None, "message": "", "current": None, "images": images}
    if current is not None:
        out["current"] = {"index": current.index, "count": current.count, "image": current.image,
                          "stage": current.stage}
    if len(images) == 1:
        out["model_url"] = next(iter(images.values()))["model_url"]
    if status == "pending":
        out["message"] = f"waiting to start (run {raw})"
    elif status == "running":
        out["message"] = current.line() if current is not None else "started"
    elif status == "success":
        out["message"] = f"{len(images)} model(s) made"
    else:
        out["message"] = "; ".join(f"{k}: {e['message']}" for k, e in images.items() if e["status"] == "error") \
            or failure or f"run {raw}"
    return out


def _add_download_urls(server: _Server, out: dict[str, Any]) -> None:
    wanted = [e["model_url"] for e in out["images"].values() if e["model_url"]]
    if not wanted:
        return
    urls = server.ask("download", models=wanted).get("urls", {})
    for entry in out["images"].values():
        entry["download_url"] = urls.get(entry["model_url"]) if entry["model_url"] else None
    if len(out["images"]) == 1:
        out["download_url"] = next(iter(out["images"].values()))["download_url"]


def result(run_id: str, *, wait: bool = False, timeout: float | None = None, url: str | None = None) -> dict[str, Any]:
    """The seed's result dict for a run: `status` (pending, running, success, error), `progress` (0-100),
    `message`, `model_url` (s3://) and `download_url` (plain http(s), presigned, for as long as the code location's
    HY3D_DOWNLOAD_URL_SECONDS) of its image, `current` (index, count, image, stage of the image being worked on) and
    `images` (per partition key: status, model_url, download_url, message; for batches). `wait`: poll until the run
    ends, or `timeout` seconds pass (then the dict says where it is). An unknown run id is an error dict."""
    server = _Server(url)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        out = _read(server, run_id)
        finished = out["status"] in ("success", "error")
        if finished or not wait or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(_POLL_S if deadline is None else max(0.0, min(_POLL_S, deadline - time.monotonic())))
    if finished:
        _add_download_urls(server, out)
    return out
