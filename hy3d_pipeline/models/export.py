"""Meshes to files, and the measurements the asset checks make of them.

Every backend returns a trimesh object; what leaves the process is bytes in the format the run asked for,
with whatever companion files that format needs (an OBJ is useless without its .mtl and texture). The
silhouette and IoU helpers let checks ask "does the model look like the picture from the front" without a
renderer.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import trimesh
from PIL import Image, ImageDraw

from hy3d_pipeline.models.generators.base import OUTPUT_FORMATS


def export_model(mesh: trimesh.Trimesh | trimesh.Scene, output_format: str, basename: str) -> list[tuple[str, bytes]]:
    """[(file name, bytes)], the main file `basename.output_format` first, then its companions."""
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r} is not supported; use one of {', '.join(OUTPUT_FORMATS)}")
    mesh = as_mesh(mesh)
    main = f"{basename}.{output_format}"
    if output_format == "glb":
        return [(main, mesh.export(file_type="glb"))]
    if output_format == "stl":
        return [(main, mesh.export(file_type="stl"))]
    if output_format == "ply":
        return [(main, _with_vertex_colours(mesh).export(file_type="ply", encoding="binary"))]
    return _export_obj(mesh, basename)


def as_mesh(mesh: trimesh.Trimesh | trimesh.Scene) -> trimesh.Trimesh:
    if isinstance(mesh, trimesh.Scene):
        return mesh.to_mesh()
    if isinstance(mesh, trimesh.Trimesh):
        return mesh
    raise TypeError(f"expected a trimesh Trimesh or Scene, got {type(mesh).__name__}")


def companion_name(basename: str) -> str:
    """The name an OBJ's .mtl and texture are built on: `basename` when it is already safe, else the safe form
    plus a short hash of `basename`.

    `mtllib` and `map_Kd` end at whitespace in most readers, so companions get a name without any. Replacing
    characters alone maps `a b` and `a_b` to the same name, and two models in one folder would then share (and
    overwrite) one .mtl and one texture; the hash keeps distinct basenames apart.
    """
    safe = re.sub(r"[^\w.-]", "_", basename)
    if safe == basename:
        return basename
    return f"{safe}-{hashlib.sha256(basename.encode()).hexdigest()[:8]}"


def _export_obj(mesh: trimesh.Trimesh, basename: str) -> list[tuple[str, bytes]]:
    companion = companion_name(basename)
    mesh = mesh.copy()
    material = getattr(mesh.visual, "material", None)
    if material is not None:
        # trimesh names the texture after the material; naming it after the model keeps files distinct
        # when several models share a folder
        material.name = companion
    mtl = f"{companion}.mtl"
    text, companions = trimesh.exchange.obj.export_obj(mesh, include_texture=True, return_texture=True, mtl_name=mtl)
    files = [(f"{basename}.obj", text.encode("utf-8"))]
    if mtl in companions:
        files.append((mtl, companions.pop(mtl)))
    files.extend(sorted(companions.items()))
    return files


def _with_vertex_colours(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """PLY has no textures: sample the texture at each vertex's UV instead."""
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals) and visual.uv is not None and visual.material is not None:
        colours = np.array(visual.to_color().vertex_colors, dtype=np.uint8)
        if colours.ndim == 2 and len(colours) == len(mesh.vertices):
            colours[:, 3] = 255  # the solid is opaque, whatever alpha the texture had at its rim
            return trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=colours, process=False)
        return trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
    return mesh


def mesh_stats(mesh: trimesh.Trimesh | trimesh.Scene) -> dict[str, Any]:
    """Size and soundness of a mesh, as plain JSON-friendly values."""
    mesh = as_mesh(mesh)
    if len(mesh.vertices) == 0:
        bounds = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    else:
        bounds = np.asarray(mesh.bounds, dtype=float).tolist()
    return {
        "vertices": int(len(mesh.vertices)),
        "faces": int(len(mesh.faces)),
        "bounds": bounds,
        "extents": [hi - lo for lo, hi in zip(*bounds)],
        "watertight": bool(mesh.is_watertight),
        "is_volume": bool(mesh.is_volume),
    }


def front_silhouette(mesh: trimesh.Trimesh | trimesh.Scene, size: tuple[int, int]) -> np.ndarray:
    """Where the mesh covers the XY plane seen from +Z, as a bool (h, w) grid spanning the mesh's XY bounds."""
    mesh = as_mesh(mesh)
    height, width = size
    canvas = Image.new("1", (width, height), 0)
    if len(mesh.faces) == 0:
        return np.zeros((height, width), dtype=bool)
    xy = np.asarray(mesh.vertices)[:, :2]
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    # pixel centres sit at +0.5; image rows grow downwards while y grows upwards
    cols = (xy[:, 0] - low[0]) / span[0] * width - 0.5
    rows = (high[1] - xy[:, 1]) / span[1] * height - 0.5
    corners = np.stack([cols, rows], axis=1)[np.asarray(mesh.faces)]
    # walls and other edge-on faces project to slivers that would only fatten the outline
    ab, ac = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    doubled_area = ab[:, 0] * ac[:, 1] - ab[:, 1] * ac[:, 0]
    draw = ImageDraw.Draw(canvas)
    for triangle in corners[np.abs(doubled_area) > 1e-9]:
        draw.polygon([tuple(p) for p in triangle], fill=1)
    return np.asarray(canvas, dtype=bool)


def crop_to_content(mask: np.ndarray) -> np.ndarray:
    """The mask cut to the bounding box of its True pixels, to compare it with `front_silhouette`."""
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return mask
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks, `b` resized to `a`'s shape first; 1.0 when both are empty."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        resized = Image.fromarray(b.astype(np.uint8) * 255).resize((a.shape[1], a.shape[0]), Image.Resampling.BILINEAR)
        b = np.asarray(resized) >= 128
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)

