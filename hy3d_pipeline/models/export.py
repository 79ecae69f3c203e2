"""Meshes to files, and the measurements the asset checks make of them.

Every backend returns a trimesh object; what leaves the process is bytes in the format the run asked for,
with whatever companion files that format needs (an OBJ is useless without its .mtl and texture). The
silhouette and IoU helpers let checks ask "does the model look like the picture from the front" without a
renderer.

Colour goes where each format's readers look for it: GLB carries the texture or COLOR_0 vertex colours, PLY
vertex colours, an OBJ a .mtl with a `map_Kd` texture. Vertex colours in an OBJ (`v x y z r g b`) are an
unofficial extension that many readers take for a six-dimensional point, so an OBJ of a vertex-coloured mesh
gets its colours baked into a small texture instead. STL has no colour.
"""

from __future__ import annotations

import hashlib
import io
import math
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
        return [(main, _export_glb(mesh))]
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


# glTF bufferView targets: what a viewer binds each slice as (the validator's BUFFER_VIEW_TARGET_MISSING)
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963
# an edge whose faces meet at more than this is a crease: its faces do not bend each other's normals
CREASE_DEGREES = 45.0


def _export_glb(mesh: trimesh.Trimesh) -> bytes:
    """GLB with NORMAL on every vertex and a target on every vertex and index bufferView.

    Without NORMAL a viewer must draw flat facets (the glTF rule); with them a Hunyuan3D surface shades smooth.
    The normals come from `shading_normals`, one per vertex, so the vertices are the mesh's own and the file
    stays a closed solid as loaded."""
    mesh = mesh.copy()
    normals = shading_normals(mesh)
    mesh.vertex_normals = normals
    return mesh.export(file_type="glb", include_normals=True, tree_postprocessor=_set_buffer_view_targets)


def _set_buffer_view_targets(tree: dict) -> None:
    """Vertex attributes are ARRAY_BUFFER, indices ELEMENT_ARRAY_BUFFER; image bufferViews take none."""
    accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])
    for gltf_mesh in tree.get("meshes", []):
        for primitive in gltf_mesh.get("primitives", []):
            for accessor in primitive.get("attributes", {}).values():
                views[accessors[accessor]["bufferView"]]["target"] = ARRAY_BUFFER
            if "indices" in primitive:
                views[accessors[primitive["indices"]]["bufferView"]]["target"] = ELEMENT_ARRAY_BUFFER


def shading_normals(mesh: trimesh.Trimesh, crease_degrees: float = CREASE_DEGREES) -> np.ndarray:
    """One unit normal per vertex: the angle-weighted mean of the faces around it that lie within
    `crease_degrees` of the vertex's dominant face, the adjacent face on the largest flat region.

    Plain averaging bends every normal along a sharp edge: on an extruded slab, whose front and walls share
    their rim vertices, the whole front would tilt some 40 degrees and shade like a dome. Splitting vertices
    at creases would fix the shading but make the file an open surface for every loader that does not weld.
    Taking each vertex's dominant side keeps one vertex per position: the slab's front and back are exactly
    flat (its thin walls shade like them), and a curved surface, where no flat region stands out, gets the
    usual smooth normals."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    count = len(mesh.vertices)
    if len(faces) == 0:
        return np.zeros((count, 3))
    face_normals = np.asarray(mesh.face_normals, dtype=np.float64)
    region_area = np.asarray(mesh.area_faces, dtype=np.float64).copy()
    facets = mesh.facets  # groups of coplanar neighbouring faces
    if len(facets):
        region_area[np.concatenate(facets)] = np.repeat(np.asarray(mesh.facets_area), [len(f) for f in facets])
    corner_vertex = faces.ravel()
    corner_face = np.repeat(np.arange(len(faces)), 3)
    ranked = np.lexsort((-region_area[corner_face], corner_vertex))  # by vertex, largest region first
    leaders = ranked[np.r_[0, np.flatnonzero(np.diff(corner_vertex[ranked])) + 1]]
    dominant = np.zeros((count, 3))
    dominant[corner_vertex[leaders]] = face_normals[corner_face[leaders]]

    cos = math.cos(math.radians(crease_degrees))
    included = np.einsum("ij,ij->i", face_normals[corner_face], dominant[corner_vertex]) >= cos
    weights = np.where(included, np.asarray(mesh.face_angles, dtype=np.float64).ravel(), 0.0)
    normals = np.stack([np.bincount(corner_vertex, weights=weights * face_normals[corner_face, axis],
                                    minlength=count) for axis in range(3)], axis=1)
    length = np.linalg.norm(normals, axis=1)
    fallback = length < 1e-12  # unused vertices, or only degenerate faces around them
    normals[~fallback] /= length[~fallback, None]
    if fallback.any():
        normals[fallback] = np.asarray(mesh.vertex_normals, dtype=np.float64)[fallback]
    return normals


def _export_obj(mesh: trimesh.Trimesh, basename: str) -> list[tuple[str, bytes]]:
    companion = companion_name(basename)
    if isinstance(mesh.visual, trimesh.visual.ColorVisuals) and mesh.visual.kind in ("vertex", "face"):
        return _export_obj_baked(mesh, basename, companion)
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


def _export_obj_baked(mesh: trimesh.Trimesh, basename: str, companion: str) -> list[tuple[str, bytes]]:
    """An OBJ whose vertex (or face) colours live in a `map_Kd` texture, which every OBJ reader with materials
    shows. The positions stay one per vertex (faces index them as before); the texture coordinates are per
    face corner (`f v/vt`), each face drawing from its own 2 x 2 texel cell (`bake_corner_colours`)."""
    faces = np.asarray(mesh.faces, dtype=np.int64)
    texture, uv = bake_corner_colours(_corner_colours(mesh), np.asarray(mesh.triangles_center))
    out = io.StringIO()
    out.write(f"# hy3d-pipeline: the mesh's vertex colours, baked into {companion}.png\n")
    out.write(f"mtllib {companion}.mtl\nusemtl {companion}\n")
    np.savetxt(out, np.asarray(mesh.vertices, dtype=np.float64), fmt="v %.8f %.8f %.8f")
    np.savetxt(out, uv, fmt="vt %.8f %.8f")
    corners = np.arange(1, faces.size + 1).reshape(-1, 3)
    np.savetxt(out, np.stack([faces + 1, corners], axis=2).reshape(-1, 6), fmt="f %d/%d %d/%d %d/%d")
    # white Kd: readers multiply it with the texture
    mtl = f"newmtl {companion}\nKa 1.0 1.0 1.0\nKd 1.0 1.0 1.0\nKs 0.0 0.0 0.0\nd 1.0\nillum 1\nmap_Kd {companion}.png\n"
    png = io.BytesIO()
    texture.save(png, format="PNG")
    return [(f"{basename}.obj", out.getvalue().encode("utf-8")), (f"{companion}.mtl", mtl.encode("utf-8")),
            (f"{companion}.png", png.getvalue())]


def _corner_colours(mesh: trimesh.Trimesh) -> np.ndarray:
    """RGB of each face's three corners, (faces, 3, 3) uint8."""
    visual = mesh.visual
    if visual.kind == "vertex":
        return np.asarray(visual.vertex_colors, dtype=np.uint8)[:, :3][np.asarray(mesh.faces)]
    return np.repeat(np.asarray(visual.face_colors, dtype=np.uint8)[:, None, :3], 3, axis=1)


def bake_corner_colours(corners: np.ndarray, centres: np.ndarray | None = None) -> tuple[Image.Image, np.ndarray]:
    """A texture and per-corner UVs ((faces * 3, 2), OBJ's v-up convention) that reproduce colours
    interpolated linearly across each face, as vertex colours are drawn.

    Each face gets its own 2 x 2 cell: its corners sit on the centres of three texels holding their colours,
    and the fourth texel holds the colour the face's gradient reaches there (the sum of the two corners beside
    it less the one across). Bilinear filtering of that cell is then exactly the linear interpolation between
    the corners. The corner across is chosen so that the fourth colour stays within 0..255 where it can (with
    two corners of one colour it always can); clamping it is the only loss, at the sharpest three-colour
    steps. Faces are laid out in Z-order of their centres, so neighbouring cells hold neighbouring faces and
    the blur of a texture's smaller mipmaps stays local."""
    corners = np.asarray(corners, dtype=np.int16)
    count = len(corners)
    # for each choice of the corner across the fourth texel: how far that texel would leave 0..255
    rotations = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]])
    fourth = corners[:, rotations[:, 1]] + corners[:, rotations[:, 2]] - corners[:, rotations[:, 0]]
    overflow = np.abs(fourth - np.clip(fourth, 0, 255)).sum(axis=2)
    role = rotations[np.argmin(overflow, axis=1)]  # per face: corner indices in the roles a, b, c
    corners = np.take_along_axis(corners, role[:, :, None], axis=1)
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    cell = np.arange(count)
    if centres is not None and count > 1:
        cell[_z_order(np.asarray(centres, dtype=np.float64))] = np.arange(count)
    cx, cy = cell % columns, cell // columns
    texels = np.zeros((rows * 2, columns * 2, 3), dtype=np.uint8)
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    texels[2 * cy, 2 * cx] = a
    texels[2 * cy, 2 * cx + 1] = b
    texels[2 * cy + 1, 2 * cx] = c
    texels[2 * cy + 1, 2 * cx + 1] = np.clip(b + c - a, 0, 255)
    width, height = columns * 2, rows * 2
    x = np.stack([2 * cx + 0.5, 2 * cx + 1.5, 2 * cx + 0.5], axis=1) / width
    y = np.stack([2 * cy + 0.5, 2 * cy + 0.5, 2 * cy + 1.5], axis=1) / height
    by_role = np.stack([x, 1.0 - y], axis=2)
    uv = np.empty_like(by_role)
    np.put_along_axis(uv, role[:, :, None], by_role, axis=1)  # back to the faces' own corner order
    return Image.fromarray(texels, "RGB"), uv.reshape(-1, 2)


def _z_order(points: np.ndarray, bits: int = 10) -> np.ndarray:
    """Indices that sort `points` (n, 3) along a Morton curve: near in the order is near in space."""
    low, high = points.min(axis=0), points.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    grid = np.clip(((points - low) / span * (2**bits - 1)).astype(np.int64), 0, 2**bits - 1)
    code = np.zeros(len(points), dtype=np.int64)
    for bit in range(bits):
        for axis in range(3):
            code |= ((grid[:, axis] >> bit) & 1) << (3 * bit + axis)
    return np.argsort(code, kind="stable")


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

