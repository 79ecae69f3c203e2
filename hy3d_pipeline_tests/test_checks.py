"""Asset checks on generated models: the pure measurements and verdicts, then the same checks recorded per
partition by the Dagster assets (in the generating run, for skipped models, and for checks run alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
from dagster import AssetCheckKey, AssetKey, AssetSelection, materialize
from PIL import Image, ImageDraw

from hy3d_pipeline.definitions import build_defs
from hy3d_pipeline.models import checks
from hy3d_pipeline.models.checks import CHECKS, evaluate, measure
from hy3d_pipeline.models.generators.base import GenerationSettings, PreparedImage
from hy3d_pipeline.models.generators.extrude import build
from hy3d_pipeline.models.processing import META_STATS
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.test_pipeline import latest_metadata, run_sensor_once

MODELS = AssetKey("models_3d")


@pytest.fixture(scope="module")
def extrude():
    return build(GenerationSettings(generator="extrude"))


def drawn(shape: str, size=(160, 160)) -> PreparedImage:
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    w, h = size
    if shape == "disc":
        draw.ellipse((w * 0.1, h * 0.1, w * 0.9, h * 0.9), fill=(200, 60, 40, 255))
    elif shape == "star":
        points = []
        for i in range(10):
            radius = (0.45 if i % 2 == 0 else 0.18) * min(w, h)
            angle = np.pi / 2 + i * np.pi / 5
            points.append((w / 2 + radius * np.cos(angle), h / 2 - radius * np.sin(angle)))
        draw.polygon(points, fill=(230, 190, 30, 255))
    elif shape == "wide":
        draw.rectangle((w * 0.05, h * 0.4, w * 0.95, h * 0.6), fill=(40, 90, 200, 255))
    elif shape == "tall":
        draw.rectangle((w * 0.4, h * 0.05, w * 0.6, h * 0.95), fill=(40, 90, 200, 255))
    elif shape == "square":
        draw.rectangle((w * 0.2, h * 0.2, w * 0.8, h * 0.8), fill=(40, 90, 200, 255))
    elif shape == "rect2to1":
        draw.rectangle((w * 0.1, h * 0.3, w * 0.9, h * 0.7), fill=(40, 90, 200, 255))
    mask = np.asarray(image)[..., 3] > 127
    return PreparedImage(name=f"drawn-{shape}", rgba=image, mask=mask, foreground_method="alpha")


def failed(outcomes) -> dict[str, str]:
    return {o.name: o.severity for o in outcomes if not o.passed}


# --- pure checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["disc", "star", "wide"])
def test_a_correct_model_passes_every_check(extrude, shape):
    image = drawn(shape)
    figures = measure(extrude.generate(image, seed=0), image.mask)
    outcomes = evaluate(figures, max_faces=40000)
    assert [o.name for o in outcomes] == list(CHECKS)
    assert failed(outcomes) == {}
    assert figures["silhouette_iou"] >= 0.9
    silhouette = next(o for o in outcomes if o.name == "silhouette_matches_input")
    assert silhouette.metadata["iou"] == figures["silhouette_iou"]


def test_empty_mesh_fails_not_empty():
    figures = measure(trimesh.Trimesh(), drawn("disc").mask)
    outcomes = failed(evaluate(figures, max_faces=40000))
    assert outcomes["mesh_not_empty"] == "ERROR"
    assert "face_budget" not in outcomes  # nothing is over budget; what is wrong is named by the right check


def test_over_budget_fails_face_budget_only(extrude):
    image = drawn("disc")
    figures = measure(extrude.generate(image, seed=0), image.mask)
    outcomes = evaluate(figures, max_faces=figures["faces"] - 1)
    assert failed(outcomes) == {"face_budget": "ERROR"}
    budget = next(o for o in outcomes if o.name == "face_budget")
    assert budget.metadata["faces"] == figures["faces"] and budget.metadata["max_faces"] == figures["faces"] - 1
    assert failed(evaluate(figures, max_faces=figures["faces"])) == {}  # the budget itself is allowed


def test_wrong_silhouette_warns_or_errors_by_how_wrong(extrude):
    # a model of a wide bar for a picture of a tall bar: nothing alike -> error
    wide = extrude.generate(drawn("wide"), seed=0)
    assert failed(evaluate(measure(wide, drawn("tall").mask), 40000)) == {"silhouette_matches_input": "ERROR"}
    # a 2:1 slab for a square picture: the same kind of thing, the wrong proportions -> warning
    slab = extrude.generate(drawn("rect2to1"), seed=0)
    figures = measure(slab, drawn("square").mask)
    assert checks.IOU_ERROR <= figures["silhouette_iou"] < checks.IOU_WARN
    assert failed(evaluate(figures, 40000)) == {"silhouette_matches_input": "WARN"}


def test_a_blob_for_a_star_fails_the_silhouette():
    """What the tiny Hunyuan model makes of any picture: a round blob."""
    blob = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
    figures = measure(blob, drawn("star").mask)
    assert figures["silhouette_iou"] < checks.IOU_WARN
    assert set(failed(evaluate(figures, 40000))) == {"silhouette_matches_input"}


@pytest.mark.parametrize("how", ["huge", "nan", "inf", "collapsed", "off-centre"])
def test_bad_bounds_fail_bounds_normalised(extrude, how):
    image = drawn("disc")
    mesh = extrude.generate(image, seed=0).copy()
    vertices = np.array(mesh.vertices)
    if how == "huge":
        vertices *= 50.0
    elif how == "nan":
        vertices[0] = np.nan
    elif how == "inf":
        vertices[3, 1] = np.inf
    elif how == "collapsed":
        vertices *= 1e-4
    else:
        vertices[:, 0] += 0.9
    mesh = trimesh.Trimesh(vertices, mesh.faces, process=False)
    figures = measure(mesh, image.mask)
    outcomes = evaluate(figures, 40000)
    assert failed(outcomes).get("bounds_normalised") == "ERROR"
    if how in ("huge", "collapsed", "off-centre"):
        # the silhouette is compared at the mask's scale and position: only the bounds are wrong
        assert failed(outcomes) == {"bounds_normalised": "ERROR"}
    bounds = next(o for o in outcomes if o.name == "bounds_normalised")
    json.dumps(bounds.metadata, allow_nan=False)  # the UI gets valid JSON, whatever the coordinates


def test_open_surface_only_warns(extrude):
    image = drawn("disc")
    mesh = extrude.generate(image, seed=0)
    holed = trimesh.Trimesh(mesh.vertices, mesh.faces[1:], process=False)
    assert failed(evaluate(measure(holed, image.mask), 40000)) == {"watertight": "WARN"}


def test_thresholds():
    assert checks.check_silhouette({"silhouette_iou": 0.8}).passed
    warn = checks.check_silhouette({"silhouette_iou": 0.79})
    error = checks.check_silhouette({"silhouette_iou": 0.49})
    assert (warn.passed, warn.severity, error.passed, error.severity) == (False, "WARN", False, "ERROR")
    assert checks.check_bounds({"bounds": [[-1.05, -1, -1], [1.05, 1, 1]]}).passed
    assert not checks.check_bounds({"bounds": [[-1.06, -1, -1], [1, 1, 1]]}).passed


def test_figures_survive_the_trip_through_s3_metadata(extrude):
    image = drawn("star")
    mesh = trimesh.Trimesh(np.vstack([extrude.generate(image, seed=0).vertices[:-1], [[np.nan, 0, 0]]]),
                           extrude.generate(image, seed=0).faces, process=False)
    figures = measure(mesh, image.mask)
    stored = json.loads(json.dumps(figures, allow_nan=False))  # S3 metadata is JSON text
    assert checks.has_figures(stored)
    assert evaluate(stored, 40000) == evaluate(figures, 40000)
    assert not checks.has_figures({"vertices": 1, "faces": 1, "watertight": True})  # a model from before checks


# --- through the assets -----------------------------------------------------------------------------------------


def latest_checks(instance, partition: str) -> dict:
    keys = [AssetCheckKey(MODELS, name) for name in CHECKS]
    from hy3d_pipeline.dagster_private import latest_check_executions

    return {key.name: record for key, record in latest_check_executions(instance, keys, partition).items()}


@pytest.fixture
def two_images(s3, storage):
    b = storage.images_bucket
    s3.put_object(Bucket=b, Key="c/disc.png", Body=png_bytes((120, 120)))
    s3.put_object(Bucket=b, Key="c/box.png", Body=png_bytes((100, 100), shape="box"))
    return ["c/box.png", "c/disc.png"]


def test_checks_run_per_partition_in_the_generating_run(instance, storage, s3, two_images):
    runs, failures = run_sensor_once(instance)
    assert (runs, failures) == (1, {})
    for key in two_images:
        records = latest_checks(instance, key)
        assert set(records) == set(CHECKS)
        model = instance.fetch_materializations(MODELS, limit=10).records
        materialization = next(r for r in model if r.partition_key == key)
        for name, record in records.items():
            evaluation = record.evaluation
            assert record.partition == key and evaluation.partition == key
            assert record.run_id == materialization.run_id  # same run as the generation
            assert evaluation.passed, (key, name, evaluation.description)
            assert evaluation.target_materialization_data.storage_id == materialization.storage_id
            assert evaluation.metadata["measured"].value == "now"
        iou = records["silhouette_matches_input"].evaluation.metadata["iou"].value
        assert iou >= 0.9 and latest_metadata(instance, "models_3d", key)["silhouette_iou"] == iou


def test_over_budget_models_fail_face_budget_in_dagster(instance, storage, s3, two_images, monkeypatch):
    monkeypatch.setenv("HY3D_MAX_FACES", "100")  # the box has 12 faces, the disc several hundred
    runs, failures = run_sensor_once(instance)
    assert failures == {}  # a failed check flags the model; it does not fail the run
    disc = latest_checks(instance, "c/disc.png")
    assert not disc["face_budget"].evaluation.passed
    assert disc["face_budget"].evaluation.severity.value == "ERROR"
    assert disc["face_budget"].evaluation.metadata["max_faces"].value == 100
    assert all(disc[name].evaluation.passed for name in CHECKS if name != "face_budget")
    assert all(r.evaluation.passed for r in latest_checks(instance, "c/box.png").values())


def test_skipped_model_is_judged_from_its_stored_figures(instance, storage, s3, two_images):
    run_sensor_once(instance)
    first = latest_checks(instance, "c/disc.png")["silhouette_matches_input"].evaluation.metadata["iou"].value
    defs = build_defs()
    from hy3d_pipeline.models.assets import image_to_model

    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="c/disc.png").success
    meta = latest_metadata(instance, "models_3d", "c/disc.png")
    assert meta["skipped_existing"] is True
    records = latest_checks(instance, "c/disc.png")
    assert all(r.evaluation.passed for r in records.values())
    assert records["silhouette_matches_input"].evaluation.metadata["measured"].value == "at generation"
    assert records["silhouette_matches_input"].evaluation.metadata["iou"].value == first
    assert meta["thumbnail"].startswith("![thumbnail](data:image/webp;base64,")  # read back from S3


def test_model_from_before_checks_is_measured_again(instance, storage, s3, two_images):
    run_sensor_once(instance)
    key = "models/c/disc.png.glb"
    head = s3.head_object(Bucket=storage.images_bucket, Key=key)
    stats = json.loads(head["Metadata"][META_STATS])
    stats["mesh"] = {k: stats["mesh"][k] for k in ("vertices", "faces", "watertight")}  # what older versions wrote
    s3.copy_object(Bucket=storage.images_bucket, Key=key, CopySource={"Bucket": storage.images_bucket, "Key": key},
                   Metadata={**head["Metadata"], META_STATS: json.dumps(stats)}, MetadataDirective="REPLACE")
    s3.delete_object(Bucket=storage.images_bucket, Key=key + ".thumb.png")
    defs = build_defs()
    from hy3d_pipeline.models.assets import image_to_model

    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="c/disc.png").success
    records = latest_checks(instance, "c/disc.png")
    assert records["silhouette_matches_input"].evaluation.metadata["measured"].value == "now"
    assert all(r.evaluation.passed for r in records.values())
    assert s3.get_object(Bucket=storage.images_bucket, Key=key + ".thumb.png")["Body"].read()[:4] == b"\x89PNG"


def test_checks_alone_judge_the_existing_model_and_make_none(instance, storage, s3, two_images, monkeypatch):
    run_sensor_once(instance)
    before = s3.head_object(Bucket=storage.images_bucket, Key="models/c/box.png.glb")["LastModified"]
    monkeypatch.setenv("HY3D_OUTPUT_FORMAT", "obj")  # no model in this format exists
    defs = build_defs()
    from hy3d_pipeline.models.assets import image_to_model

    # as the UI launches "Execute" on a check of one partition: checks selected, the partition as a run tag
    # (materialize's partition_key wants a selected asset to take the partitioning from)
    only_checks = dict(selection=AssetSelection.checks_for_assets(MODELS), tags={"dagster/partition": "c/box.png"})
    result = materialize([image_to_model], instance=instance, resources=defs.resources, raise_on_error=False,
                         **only_checks)
    # and checks alone never make one
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.user_failure_data
    assert "materialize models_3d first" in failure.metadata["failed_partitions"].value["c/box.png"]
    monkeypatch.delenv("HY3D_OUTPUT_FORMAT")
    # extrude makes no use of the face budget (the fingerprint leaves it out): the model that exists is judged
    # against the stricter budget
    monkeypatch.setenv("HY3D_MAX_FACES", "5")
    result = materialize([image_to_model], instance=instance, resources=build_defs().resources, **only_checks)
    assert result.success and result.get_asset_materialization_events() == []
    assert not latest_checks(instance, "c/box.png")["face_budget"].evaluation.passed
    monkeypatch.delenv("HY3D_MAX_FACES")
    defs = build_defs()
    result = materialize([image_to_model], instance=instance, resources=defs.resources, **only_checks)
    assert result.success
    assert result.get_asset_materialization_events() == []
    assert s3.head_object(Bucket=storage.images_bucket, Key="models/c/box.png.glb")["LastModified"] == before
    records = latest_checks(instance, "c/box.png")
    assert {r.run_id for r in records.values()} == {result.run_id}
    assert all(r.evaluation.passed for r in records.values())
    assert not any(Path(storage.temp_dir).glob("*"))  # the local copy it read the input from is gone
