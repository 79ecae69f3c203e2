"""Is this generated model plausibly right? Cheap measurements of a mesh and the verdicts drawn from them.

A backfill of a thousand images must flag its broken generations without anyone opening the files. A model
is measured once, on the worker that made it, while the mesh and the input's foreground mask are still in
memory (`measure`); the verdicts are a pure function of those figures and the current thresholds (`evaluate`).
Keeping the two apart is what lets a model that is not regenerated (same source ETag and settings) still be
judged: its figures travel with it in its S3 metadata, and today's thresholds are applied to them again.

Nothing here imports Dagster: the asset turns `CheckOutcome`s into asset check evaluations, and the tests call
these functions directly. Thresholds, and why:

- `silhouette_matches_input`: the front view (seen from +Z, the convention every backend follows) against the
  input's foreground mask, as intersection over union. Position and size are normalised away (a model lives in
  its own units), aspect ratio is not. The extrude backend scores 0.96-0.99, a good image-to-3D model should be
  close to that, so below `IOU_WARN` (0.8) is worth a look and below `IOU_ERROR` (0.5) the model does not show
  the object in the picture (a blob, a wrong part, a collapsed surface).
- `bounds_normalised`: every backend centres its model and scales it into [-1, 1]^3 (hy3dgen's marching-cubes
  box reaches 1.01), so any coordinate beyond `BOUNDS_LIMIT` (1.05), or one that is not finite, means the
  geometry went wrong; so does a longest side under `MIN_EXTENT`, a model collapsed to a speck.
- `face_budget`: `max_faces` (HY3D_MAX_FACES) is what downstream viewers were promised.
- `watertight` only warns: an open surface still displays, though it cannot be printed or voxelised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    import numpy as np
    import trimesh

IOU_WARN = 0.8
IOU_ERROR = 0.5
BOUNDS_LIMIT = 1.05
MIN_EXTENT = 0.01
SILHOUETTE_RESOLUTION = 256  # long side of the grid the masks are compared on; finer changes the IoU by < 0.01

ERROR, WARN = "ERROR", "WARN"

# name -> what it checks (the asset check descriptions in the UI)
CHECKS: dict[str, str] = {
    "mesh_not_empty": "The model has at least one face.",
    "face_budget": "The face count is within HY3D_MAX_FACES.",
    "watertight": "The surface is closed (warning only: an open surface still displays).",
    "silhouette_matches_input": (
        f"Front-view silhouette vs the input's foreground mask (IoU): a warning below {IOU_WARN}, "
        f"an error below {IOU_ERROR}."
    ),
    "bounds_normalised": (
        f"Coordinates are finite and within [-{BOUNDS_LIMIT}, {BOUNDS_LIMIT}] on every axis; the longest side "
        f"is at least {MIN_EXTENT}."
    ),
}


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    severity: str  # ERROR | WARN: how bad a failure is (recorded on passes too, as the check's ceiling)
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


def measure(mesh: "trimesh.Trimesh | trimesh.Scene", mask: "np.ndarray") -> dict[str, Any]:
    """The figures every check needs, as JSON-friendly values (stored with the model in S3)."""
    import numpy as np

    from hy3d_pipeline.models.export import as_mesh, mesh_stats

    mesh = as_mesh(mesh)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite coordinates are for check_bounds to name
        stats = mesh_stats(mesh)
    return {
        "vertices": stats["vertices"],
        "faces": stats["faces"],
        "watertight": stats["watertight"],
        "bounds": [[_plain(v) for v in corner] for corner in stats["bounds"]],
        "silhouette_iou": round(silhouette_iou(mesh, mask), 4),
    }


def evaluate(figures: Mapping[str, Any], max_faces: int) -> list[CheckOutcome]:
    """One outcome per entry of `CHECKS`, in that order, from `measure`'s figures."""
    return [
        check_not_empty(figures),
        check_face_budget(figures, max_faces),
        check_watertight(figures),
        check_silhouette(figures),
        check_bounds(figures),
    ]


def has_figures(figures: Mapping[str, Any] | None) -> bool:
    """Whether `figures` hold everything `evaluate` reads (models made before the checks existed do not)."""
    return bool(figures) and all(k in figures for k in ("vertices", "faces", "watertight", "bounds", "silhouette_iou"))


def check_not_empty(figures: Mapping[str, Any]) -> CheckOutcome:
    faces, vertices = int(figures["faces"]), int(figures["vertices"])
    ok = faces > 0 and vertices > 0
    return CheckOutcome("mesh_not_empty", ok, ERROR,
                        f"{faces} faces, {vertices} vertices" if ok else "the mesh has no faces",
                        {"faces": faces, "vertices": vertices})


def check_face_budget(figures: Mapping[str, Any], max_faces: int) -> CheckOutcome:
    faces = int(figures["faces"])
    ok = faces <= max_faces
    used = faces / max_faces if max_faces > 0 else math.inf
    return CheckOutcome(
        "face_budget", ok, ERROR,
        f"{faces} faces, budget {max_faces}" if ok else f"{faces} faces exceed the budget of {max_faces} (HY3D_MAX_FACES)",
        {"faces": faces, "max_faces": int(max_faces), "budget_used": round(used, 4) if math.isfinite(used) else "inf"},
    )


def check_watertight(figures: Mapping[str, Any]) -> CheckOutcome:
    ok = bool(figures["watertight"])
    return CheckOutcome("watertight", ok, WARN,
                        "closed surface" if ok else "the surface has holes or non-manifold edges",
                        {"watertight": ok})


def check_silhouette(figures: Mapping[str, Any], warn_below: float = IOU_WARN,
                     error_below: float = IOU_ERROR) -> CheckOutcome:
    iou = float(figures["silhouette_iou"])
    if iou >= warn_below:
        ok, severity, text = True, WARN, f"front silhouette matches the input's foreground (IoU {iou:.3f})"
    elif iou >= error_below:
        ok, severity, text = False, WARN, (f"front silhouette differs from the input's foreground: IoU {iou:.3f} "
                                           f"is below {warn_below}")
    else:
        ok, severity, text = False, ERROR, (f"front silhouette does not show the input's object: IoU {iou:.3f} "
                                            f"is below {error_below}")
    # thresholds as one JSON value: the UI plots every number in check metadata, and constants plot as noise
    return CheckOutcome("silhouette_matches_input", ok, severity, text,
                        {"iou": iou, "thresholds": {"warn_below": warn_below, "error_below": error_below}})


def check_bounds(figures: Mapping[str, Any], limit: float = BOUNDS_LIMIT, min_extent: float = MIN_EXTENT) -> CheckOutcome:
    bounds = [[_number(v) for v in corner] for corner in figures["bounds"]]
    values = [v for corner in bounds for v in corner]
    finite = all(math.isfinite(v) for v in values)
    extents = [hi - lo for lo, hi in zip(*bounds)]
    largest = max((abs(v) for v in values), default=0.0) if finite else math.inf
    longest = max(extents, default=0.0) if finite else math.nan
    if not finite:
        ok, text = False, "the bounds are not finite (NaN or infinite coordinates)"
    elif largest > limit:
        ok, text = False, f"a coordinate reaches {largest:.4g}, outside [-{limit}, {limit}]"
    elif longest < min_extent:
        ok, text = False, f"the longest side is {longest:.4g}, under {min_extent}: the model collapsed"
    else:
        ok, text = True, f"within [-{limit}, {limit}], longest side {longest:.3f}"
    return CheckOutcome("bounds_normalised", ok, ERROR, text, {
        "bounds": [[_plain(v) for v in corner] for corner in bounds],
        "extents": [_plain(v) for v in extents],
        "max_abs_coordinate": _plain(largest),
        "longest_side": _plain(longest),
        "thresholds": {"limit": limit, "min_extent": min_extent},
    })


def silhouette_iou(mesh: "trimesh.Trimesh | trimesh.Scene", mask: "np.ndarray",
                   resolution: int = SILHOUETTE_RESOLUTION) -> float:
    """IoU of the mesh seen from +Z and the foreground mask, both centred and scaled to the same area.

    Stretching the silhouette onto the mask's bounding box (what `front_silhouette` alone does) would forgive a
    wrong aspect ratio: a sphere made from a tall bottle would score like a bottle. Matching areas with one
    scale keeps the aspect ratio in the comparison."""
    import numpy as np
    import trimesh
    from PIL import Image

    from hy3d_pipeline.models.export import as_mesh, crop_to_content, front_silhouette, mask_iou

    target = crop_to_content(np.asarray(mask, dtype=bool))
    if not target.any():
        return 0.0
    height, width = target.shape
    if max(height, width) > resolution:
        shrink = resolution / max(height, width)
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        target = np.asarray(Image.fromarray(target.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)) >= 128
        height, width = target.shape

    mesh = as_mesh(mesh)
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces):
        faces = faces[np.isfinite(vertices).all(axis=1)[faces].all(axis=1)]
    if len(faces) == 0:
        return 0.0
    used = np.unique(faces)
    index = np.zeros(len(vertices), dtype=np.int64)
    index[used] = np.arange(len(used))
    vertices, faces = vertices[used], index[faces]  # only finite corners, so the bounds are finite too
    extent_x, extent_y = vertices[:, :2].max(axis=0) - vertices[:, :2].min(axis=0)
    if extent_x <= 0 or extent_y <= 0:
        return 0.0  # edge-on: no area seen from the front
    scale = math.sqrt(height * width / (extent_x * extent_y))
    shape = (max(1, round(extent_y * scale)), max(1, round(extent_x * scale)))
    if max(shape) > 4 * resolution:
        return 0.0  # an aspect ratio this far from the mask's cannot overlap it meaningfully
    seen = front_silhouette(trimesh.Trimesh(vertices, faces, process=False), shape)
    canvas = (max(height, shape[0]), max(width, shape[1]))
    return mask_iou(_centred(target, canvas), _centred(seen, canvas))


def _centred(mask: "np.ndarray", shape: tuple[int, int]) -> "np.ndarray":
    import numpy as np

    out = np.zeros(shape, dtype=bool)
    top, left = (shape[0] - mask.shape[0]) // 2, (shape[1] - mask.shape[1]) // 2
    out[top:top + mask.shape[0], left:left + mask.shape[1]] = mask
    return out


def _number(value: Any) -> float:
    """A coordinate as a float; JSON has no NaN or infinity, so stored figures may carry them as strings."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _plain(value: Any) -> float | str:
    """A float for metadata and JSON: rounded, and non-finite values spelled out (JSON has no NaN)."""
    value = _number(value)
    return round(value, 6) if math.isfinite(value) else str(value)
