"""`hy3d-pipeline report`: a static HTML gallery of what the pipeline made, for a person to read.

The Dagster UI answers "what happened to this partition"; after a backfill of a thousand images the question is
"show me the models, and which ones are wrong". The gallery answers that in one page that opens from disk with
no network (no external CSS, scripts or fonts): every image with its model's picture, key figures, check
verdicts and links, grouped so that failures and check errors come first.

Where the data comes from:
- the Dagster instance (DAGSTER_HOME) for what happened: the partitions, the latest `models_3d` materialization
  of each (figures, model URL, input preview), the latest evaluation of each asset check on it, and the
  per-image messages of failed steps (the `failed_partitions` metadata of the step's `Failure`). A failure
  counts when it is newer than the partition's latest model.
- S3 for the pictures: each model's `<model key>.thumb.png`, copied into `thumbs/` next to `index.html` (kept
  out of the HTML so that a thousand-image page stays light). When S3 has none, the small preview recorded in
  the materialization metadata is used instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import quote

STATUS_ORDER = ("failed", "error", "warning", "pending", "ok")
STATUS_TITLES = {
    "failed": "Failed",
    "error": "Check errors",
    "warning": "Check warnings",
    "pending": "Not processed yet",
    "ok": "OK",
}
_INLINE_IMAGE = re.compile(r"data:image/(webp|png|jpeg);base64,[A-Za-z0-9+/=]+")
_FAILURE_PAGE = 500


@dataclass
class Entry:
    partition: str
    image_key: str
    status: str = "pending"
    model_url: str = ""
    http_url: str = ""
    thumbnail_url: str = ""
    thumbnail_file: str = ""  # relative to the report folder
    thumbnail_inline: str = ""  # a data: URI, when S3 had no picture
    input_inline: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    failure: str = ""
    when: float | None = None
    run_id: str = ""


def partitions_for(instance, prefix: str = "", backfill_id: str | None = None) -> list[str]:
    """The partition keys to report on: a backfill's targets, else every image under `prefix` (relative to
    S3_IMAGES_PREFIX)."""
    from hy3d_pipeline.images.partitions import IMAGES_PARTITIONS_NAME, relative_key_for

    if backfill_id:
        keys = _backfill_partitions(instance, backfill_id)
    else:
        keys = list(instance.get_dynamic_partitions(IMAGES_PARTITIONS_NAME))
    return sorted(k for k in keys if relative_key_for(k).startswith(prefix))


def _backfill_partitions(instance, backfill_id: str) -> list[str]:
    from hy3d_pipeline.dagster_private import backfill_partition_keys
    from hy3d_pipeline.definitions import build_defs

    # whichever of the three assets it selected: they share the `images` partitions
    keys = backfill_partition_keys(instance, backfill_id, build_defs().resolve_asset_graph())
    if keys is None:
        raise ValueError(f"no backfill {backfill_id!r} in the Dagster instance at {instance.root_directory}")
    return keys


def collect(instance, storage, partitions: Iterable[str], progress: Callable[[int], None] | None = None) -> list[Entry]:
    """What the instance knows about each partition, with the model pictures read from S3. `progress(1)` is
    called after each partition."""
    from dagster import AssetCheckKey, AssetRecordsFilter

    from hy3d_pipeline.dagster_private import latest_check_executions
    from hy3d_pipeline.images.partitions import relative_key_for
    from hy3d_pipeline.images.partitions import LOCAL, MODELS
    from hy3d_pipeline.models.checks import CHECKS

    partitions = list(partitions)
    failures = failed_partitions(instance, set(partitions))
    check_keys = [AssetCheckKey(MODELS, name) for name in CHECKS]
    entries = []
    for partition in partitions:
        entry = Entry(partition=partition, image_key=storage.image_key(relative_key_for(partition)))
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=MODELS, asset_partitions=[partition]), limit=1).records
        model = records[0] if records else None
        if model is not None:
            meta = {k: v.value for k, v in model.asset_materialization.metadata.items()}
            entry.model_url = str(meta.get("model_url", ""))
            entry.http_url = _http_url(storage, entry.model_url)
            entry.thumbnail_url = str(meta.get("thumbnail_url", ""))
            entry.thumbnail_inline = _inline_source(meta.get("thumbnail"))
            entry.input_inline = _inline_source(meta.get("input"))
            entry.figures = {k: meta[k] for k in ("backend", "faces", "vertices", "silhouette_iou", "watertight",
                                                  "file_size", "generate_s", "skipped_existing") if k in meta}
            entry.when, entry.run_id, entry.status = model.timestamp, model.run_id, "ok"
            latest = latest_check_executions(instance, check_keys, partition)
            for key in check_keys:
                record = latest.get(key)
                evaluation = record.evaluation if record is not None else None
                if evaluation is None:
                    continue
                if evaluation.target_materialization_data is not None and \
                        evaluation.target_materialization_data.storage_id != model.storage_id:
                    continue  # a verdict on an older model
                severity = evaluation.severity.value
                entry.checks.append({"name": key.name, "passed": evaluation.passed, "severity": severity,
                                     "description": evaluation.description or ""})
                if not evaluation.passed:
                    entry.status = "error" if severity == "ERROR" or entry.status == "error" else "warning"
        failure = failures.get(partition)
        # by time, not storage id: on SQLite each run has its own event database, and their ids do not compare
        if failure is not None and (model is None or failure[2] > model.timestamp):
            _, entry.failure, entry.when, entry.run_id = failure
            entry.status = "failed"
        if not entry.input_inline:
            local = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=LOCAL, asset_partitions=[partition]), limit=1).records
            if local:
                entry.input_inline = _inline_source(local[0].asset_materialization.metadata.get("thumbnail"))
        entries.append(entry)
        if progress is not None:
            progress(1)
    return entries


def failed_partitions(instance, wanted: set[str]) -> dict[str, tuple[int, str, float, str]]:
    """{partition: (storage id, message, timestamp, run id)} of each partition's newest failure, read from the
    `failed_partitions` metadata that the asset's `Failure` carries, in failed runs, newest run first."""
    from dagster import DagsterEventType, DagsterRunStatus, RunsFilter

    from hy3d_pipeline.models.assets import step_failures

    found: dict[str, tuple[int, str, float, str]] = {}
    cursor = None
    while len(found) < len(wanted):
        runs = instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]), cursor=cursor, limit=_FAILURE_PAGE)
        for run in runs:
            records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.STEP_FAILURE).records
            for record in reversed(records):  # a run's last attempt speaks for it
                event = record.event_log_entry.dagster_event
                data = event.step_failure_data if event is not None else None
                failed = step_failures(data.user_failure_data) if data is not None else None
                for partition, message in (failed or {}).items():
                    if partition in wanted and partition not in found:
                        found[partition] = (record.storage_id, str(message), record.timestamp, run.run_id)
        if len(runs) < _FAILURE_PAGE:
            break
        cursor = runs[-1].run_id
    return found


def has_picture_to_fetch(entry: Entry) -> bool:
    return bool(entry.thumbnail_url) and entry.status != "failed"


def fetch_thumbnails(storage, entries: list[Entry], folder: Path, progress: Callable[[int], None] | None = None) -> None:
    """Copy each model's picture from S3 into `folder`; entries without one keep their inline preview.
    `progress(1)` is called after each picture fetched (or found missing)."""
    from hy3d_pipeline.storage.base import StorageError
    from hy3d_pipeline.s3.urls import S3UrlError, parse_s3_url

    folder.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        if not has_picture_to_fetch(entry):
            continue
        try:
            where = parse_s3_url(entry.thumbnail_url)
            body = storage.read(where.bucket, where.key)
        except (StorageError, S3UrlError):
            body = None
        if progress is not None:
            progress(1)
        if body and body.startswith(b"\x89PNG\r\n\x1a\n"):
            name = hashlib.sha256(entry.partition.encode()).hexdigest()[:20] + ".png"
            (folder / name).write_bytes(body)
            entry.thumbnail_file = f"{folder.name}/{name}"


def write_report(entries: list[Entry], out_dir: Path, *, title: str, source: str) -> Path:
    """Write `out_dir/index.html` (thumbnails already under `out_dir`); returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = {status: [e for e in entries if e.status == status] for status in STATUS_ORDER}
    counts = " · ".join(f"{len(groups[s])} {STATUS_TITLES[s].lower()}" for s in STATUS_ORDER if groups[s])
    parts = [_HEAD.format(title=html.escape(title)),
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=summary>{len(entries)} image(s): {html.escape(counts or 'nothing to show')}</p>",
             f"<p class=source>{html.escape(source)}</p>"]
    for status in STATUS_ORDER:
        if not groups[status]:
            continue
        parts.append(f"<h2 id={status}>{STATUS_TITLES[status]} ({len(groups[status])})</h2><div class=grid>")
        parts.extend(_card(e) for e in groups[status])
        parts.append("</div>")
    parts.append("</body></html>\n")
    path = out_dir / "index.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run_report(out_dir: str, prefix: str = "", backfill_id: str | None = None, out=print) -> int:
    """The command: the embedded default's S3 and Dagster home unless configured, then collect and write."""
    import contextlib

    from dagster import DagsterInstance

    from hy3d_pipeline.embedded import setup
    from hy3d_pipeline.progress import REPORT_DELAY_S, Bar
    from hy3d_pipeline.storage.resources import NO_BUCKET, ImageStorage

    with contextlib.ExitStack() as stack:
        # a dev running from this folder already serves the embedded S3: use it, never a second server on its data
        if not setup.s3_configured() and setup.use_running_s3() is None:
            server = setup.start_embedded_s3(out=out)
            stack.callback(server.stop)
        setup.prepare_dagster_home()
        # the embedded default set S3_IMAGES_BUCKET above; a configured S3 without one gets no guessed bucket
        storage = ImageStorage.from_env()
        if not storage.images_bucket:
            out(f"report failed: {NO_BUCKET}")
            return 1
        instance = stack.enter_context(DagsterInstance.get())
        try:
            partitions = partitions_for(instance, prefix, backfill_id)
        except ValueError as exc:
            out(f"report failed: {exc}")
            return 1
        # bars on stderr, on a terminal only, and only once the work has lasted REPORT_DELAY_S
        with Bar(len(partitions), "reading the Dagster history", unit="image", delay=REPORT_DELAY_S) as bar:
            entries = collect(instance, storage, partitions, progress=bar.advance)
        folder = Path(out_dir).absolute()
        with Bar(sum(map(has_picture_to_fetch, entries)), "fetching model pictures", unit="picture",
                 delay=REPORT_DELAY_S) as bar:
            fetch_thumbnails(storage, entries, folder / "thumbs", progress=bar.advance)
        scope = f"backfill {backfill_id}" if backfill_id else (f"prefix {prefix!r}" if prefix else "all images")
        source = (f"{scope} of s3://{storage.images_bucket}/{storage.images_prefix}; history from the Dagster "
                  f"instance at {instance.root_directory}; written "
                  f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
        path = write_report(entries, folder, title="hy3d-pipeline report", source=source)
        failed = sum(e.status == "failed" for e in entries)
        out(f"report of {len(entries)} image(s) ({failed} failed) written to {path}")
        return 0


def _http_url(storage, model_url: str) -> str:
    """A browser link to the model, when an endpoint is configured (path-style, as the client uses it)."""
    if not model_url.startswith("s3://"):
        return ""
    bucket, _, key = model_url[len("s3://"):].partition("/")
    return storage.http_url(bucket, key) or ""


def _inline_source(markdown: Any) -> str:
    """The data: URI inside one of our inline-markdown previews, only if it is exactly that."""
    if markdown is None:
        return ""
    match = _INLINE_IMAGE.search(str(markdown))
    return match.group(0) if match else ""


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _card(entry: Entry) -> str:
    esc = html.escape
    picture = entry.thumbnail_file and quote(entry.thumbnail_file) or entry.thumbnail_inline
    pictures = []
    if picture:
        pictures.append(f'<img class=model src="{esc(picture)}" alt="model of {esc(entry.image_key)}">')
    else:
        pictures.append('<div class="model none">no model</div>')
    if entry.input_inline:
        pictures.append(f'<img class=input src="{esc(entry.input_inline)}" alt="input {esc(entry.image_key)}">')
    rows = []
    figures = entry.figures
    if "faces" in figures:
        rows.append(f"{figures['faces']} faces, {figures.get('vertices', '?')} vertices")
    if "silhouette_iou" in figures:
        rows.append(f"silhouette IoU {float(figures['silhouette_iou']):.3f}")
    if "backend" in figures:
        extra = f", generated in {float(figures['generate_s']):.2f} s" if "generate_s" in figures else ""
        rows.append(f"{figures['backend']}{extra}" + (" (existing model)" if figures.get("skipped_existing") else ""))
    if entry.model_url and not entry.checks and entry.status != "failed":
        rows.append("no check results recorded for this model")
    checks = "".join(
        f'<li class="{"pass" if c["passed"] else c["severity"].lower()}">'
        f'{"✓" if c["passed"] else ("✗" if c["severity"] == "ERROR" else "!")} {esc(c["name"])}'
        f'{"" if c["passed"] else ": " + esc(c["description"])}</li>'
        for c in entry.checks)
    links = []
    if entry.model_url:
        links.append(f'<code>{esc(entry.model_url)}</code>')
    if entry.http_url:
        links.append(f'<a href="{esc(entry.http_url)}">download</a>')
    failure = f'<p class=failure>{esc(entry.failure)}</p>' if entry.failure else ""
    meta = " · ".join(x for x in (_when(entry.when), f"run {entry.run_id[:8]}" if entry.run_id else "") if x)
    return (f'<div class="card {entry.status}"><div class=pics>{"".join(pictures)}</div>'
            f'<h3 title="{esc(entry.partition)}">{esc(entry.image_key)}</h3>{failure}'
            + "".join(f"<p>{esc(r)}</p>" for r in rows)
            + (f"<ul>{checks}</ul>" if checks else "")
            + (f'<p class=links>{" ".join(links)}</p>' if links else "")
            + (f"<p class=when>{esc(meta)}</p>" if meta else "")
            + "</div>")


_HEAD = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>{title}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1f2328; background: #fff; }}
h1 {{ margin: 0 0 4px; font-size: 22px; }} h2 {{ margin: 28px 0 10px; font-size: 17px; }}
.summary {{ font-size: 15px; margin: 0; }} .source {{ color: #59636e; margin: 2px 0 0; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 14px; }}
.card {{ border: 1px solid #d1d9e0; border-left-width: 5px; border-radius: 6px; padding: 10px; overflow: hidden; }}
.card.ok {{ border-left-color: #1a7f37; }} .card.warning {{ border-left-color: #bf8700; }}
.card.error, .card.failed {{ border-left-color: #cf222e; }} .card.pending {{ border-left-color: #8c959f; }}
.pics {{ display: flex; gap: 8px; align-items: flex-end; }}
.model {{ width: 192px; height: 192px; background: #f3f4f6; border-radius: 4px; object-fit: contain; }}
.model.none {{ display: flex; align-items: center; justify-content: center; color: #8c959f; }}
.input {{ width: 80px; height: 80px; object-fit: contain; background: #f3f4f6; border-radius: 4px; }}
h3 {{ font-size: 14px; margin: 8px 0 4px; word-break: break-all; }}
.card p {{ margin: 2px 0; }} .failure {{ color: #cf222e; white-space: pre-wrap; word-break: break-word; }}
ul {{ margin: 4px 0; padding-left: 0; list-style: none; }} li.pass {{ color: #1a7f37; }}
li.warn {{ color: #9a6700; }} li.error {{ color: #cf222e; }}
.links code {{ font-size: 12px; word-break: break-all; }} .when {{ color: #59636e; font-size: 12px; }}
</style></head><body>"""
