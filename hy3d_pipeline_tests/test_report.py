"""`hy3d-pipeline report`: the static gallery lists good models, check failures and failed images with their
messages, from a real batch run through the assets, and needs no network to view."""

from __future__ import annotations

import re
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterInstance

from hy3d_pipeline import report
from hy3d_pipeline.cli import main
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.test_pipeline import run_sensor_once


class Page(HTMLParser):
    """Cards by image key, with their section, and every resource the page would load."""

    def __init__(self) -> None:
        super().__init__()
        self.section = ""
        self.cards: dict[str, dict] = {}
        self.resources: list[str] = []
        self._card: dict | None = None
        self._in = ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._in = "h2"
        elif tag == "div" and "card" in (attrs.get("class") or "").split():
            self._card = {"section": self.section, "text": "", "images": []}
        elif tag == "h3" and self._card is not None:
            self._in = "h3"
        elif tag in ("img", "script", "link", "iframe", "source", "video", "audio"):
            url = attrs.get("src") or attrs.get("href") or ""
            self.resources.append(url)
            if self._card is not None and tag == "img":
                self._card["images"].append(url)

    def handle_data(self, data):
        if self._in == "h2":
            self.section = data.split(" (")[0]
        elif self._in == "h3" and self._card is not None:
            self.cards[data] = self._card
        elif self._card is not None:
            self._card["text"] += data

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self._in = ""


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture
def batch(s3, storage, monkeypatch):
    b = storage.images_bucket
    s3.put_object(Bucket=b, Key="good/box.png", Body=png_bytes(shape="box"))  # 12 faces
    s3.put_object(Bucket=b, Key="good/disc.png", Body=png_bytes())  # hundreds of faces
    s3.put_object(Bucket=b, Key="bad/notes.png", Body=b"<b>this</b> is not an image at all")
    s3.put_object(Bucket=b, Key="bad/truncated.png", Body=png_bytes()[:200])
    monkeypatch.setenv("HY3D_BATCH_SIZE", "10")
    monkeypatch.setenv("HY3D_MAX_FACES", "100")  # the disc's model is over budget: a check error, not a failure
    return b


def write(instance, storage, out: Path, **scope) -> Page:
    entries = report.collect(instance, storage, report.partitions_for(instance, **scope))
    report.fetch_thumbnails(storage, entries, out / "thumbs")
    return parse(report.write_report(entries, out, title="t", source="test"))


def test_report_lists_successes_check_failures_and_failures(instance, storage, s3, batch, tmp_path):
    runs, failures = run_sensor_once(instance)
    assert set(failures) == {"bad/notes.png", "bad/truncated.png"}
    page = write(instance, storage, tmp_path / "r")

    assert set(page.cards) == {"good/box.png", "good/disc.png", "bad/notes.png", "bad/truncated.png"}
    assert page.cards["good/box.png"]["section"] == "OK"
    assert page.cards["good/disc.png"]["section"] == "Check errors"
    assert "face_budget" in page.cards["good/disc.png"]["text"] and "exceed the budget of 100" in page.cards["good/disc.png"]["text"]
    for key in ("bad/notes.png", "bad/truncated.png"):
        assert page.cards[key]["section"] == "Failed"
        assert failures[key] in page.cards[key]["text"]  # the message, as the run recorded it
    assert "<b>" not in (tmp_path / "r" / "index.html").read_text()  # keys and messages are escaped

    box = page.cards["good/box.png"]
    assert f"s3://{batch}/models/good/box.png.glb" in box["text"]
    assert "12 faces" in box["text"] and "silhouette IoU" in box["text"]
    model_picture, input_picture = box["images"]
    assert (tmp_path / "r" / model_picture).read_bytes().startswith(b"\x89PNG")
    assert input_picture.startswith("data:image/webp;base64,")

    # viewable with no network: every resource is a file beside the page or inline
    assert page.resources and all(not re.match(r"[a-z]+://", url) for url in page.resources)
    assert "<script" not in (tmp_path / "r" / "index.html").read_text()


def test_a_later_success_supersedes_a_failure(instance, storage, s3, batch, tmp_path):
    run_sensor_once(instance)
    s3.put_object(Bucket=batch, Key="bad/notes.png", Body=png_bytes((80, 80), shape="box"))  # fixed by its owner
    runs, failures = run_sensor_once(instance)
    assert runs == 1 and failures == {}
    page = write(instance, storage, tmp_path / "r", prefix="bad/")
    assert set(page.cards) == {"bad/notes.png", "bad/truncated.png"}  # the prefix scopes the report
    assert page.cards["bad/notes.png"]["section"] == "OK"
    assert page.cards["bad/truncated.png"]["section"] == "Failed"


def test_backfill_scope(instance, storage, s3, batch):
    from dagster._core.execution.backfill import PartitionBackfill

    from hy3d_pipeline.definitions import build_defs

    instance.add_dynamic_partitions("images", ["good/box.png", "good/disc.png", "bad/notes.png"])
    backfill = PartitionBackfill.from_asset_partitions(
        backfill_id="bf1", asset_graph=build_defs().resolve_asset_graph(), partition_names=["good/box.png", "bad/notes.png"],
        asset_selection=[AssetKey("models_3d")], backfill_timestamp=time.time(), tags={},
        dynamic_partitions_store=instance, all_partitions=False, title=None, description=None, run_config=None)
    instance.add_backfill(backfill)
    assert report.partitions_for(instance, backfill_id="bf1") == ["bad/notes.png", "good/box.png"]
    with pytest.raises(ValueError, match="no backfill"):
        report.partitions_for(instance, backfill_id="nope")


def test_report_command(storage, s3, batch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with DagsterInstance.get() as instance:
        run_sensor_once(instance)
    out = tmp_path / "gallery"
    assert main(["report", "--out", str(out), "--prefix", "good/"]) == 0
    assert "report of 2 image(s) (0 failed)" in capsys.readouterr().out
    page = parse(out / "index.html")
    assert set(page.cards) == {"good/box.png", "good/disc.png"}
    assert len(list((out / "thumbs").glob("*.png"))) == 2
    text = (out / "index.html").read_text()
    # an endpoint is configured (the test S3): each model also gets a plain http link
    assert f'href="{storage.endpoint_url}/{batch}/models/good/box.png.glb"' in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and storage.client()._request_signer._credentials.secret_key not in text


def test_report_command_draws_progress_bars_on_a_terminal_only(storage, s3, batch, tmp_path, monkeypatch, capsys):
    import os
    import pty
    import sys

    from hy3d_pipeline import progress

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with DagsterInstance.get() as instance:
        run_sensor_once(instance)
    monkeypatch.setattr(progress, "REPORT_DELAY_S", 0)  # draw at once: this report is short
    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        with monkeypatch.context() as m:
            m.setattr(sys, "stderr", terminal)
            assert main(["report", "--out", str(tmp_path / "tty")]) == 0
        terminal.flush()
        os.set_blocking(master, False)
        drawn = os.read(master, 1 << 20).decode("utf-8", "replace")
    finally:
        terminal.close()
        os.close(master)
    assert "reading the Dagster history:" in drawn and "0/4" in drawn
    assert "fetching model pictures:" in drawn and "/2" in drawn  # the two models; failed images have none
    assert main(["report", "--out", str(tmp_path / "plain")]) == 0
    captured = capsys.readouterr()
    assert "reading the Dagster history" not in captured.err + captured.out and "%|" not in captured.err
    assert "report of 4 image(s) (2 failed)" in captured.out
