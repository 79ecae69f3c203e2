"""The CPU backend: the image's outline, extruded into a thin textured slab.

It needs no GPU and no model download, runs in milliseconds and is deterministic, so the whole pipeline (S3,
partitions, export, asset checks) can run on a laptop or in CI. The result is honest about its shape: a solid
whose front silhouette is the foreground mask and whose front face shows the picture.

Convention: the front cap faces +Z (the viewer), image up is +Y, image left is -X; the longest side spans 1.0
and the slab is centred at the origin.
"""

from __future__ import annotations

import numpy as np
import shapely
import trimesh
from mapbox_earcut import triangulate_float64
from PIL import Image
from scipy import ndimage
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient

from hy3d_pipeline.models.generators.base import GenerationError, GenerationSettings, Generator, PreparedImage

OUTLINE_RESOLUTION = 128  # long side of the grid the outline is traced on; finer only adds triangles
DEPTH = 0.08
_SIMPLIFY_PX = 0.6  # smooths the pixel staircase without moving the outline by more than a pixel
# Shrinking every outline by a hair splits parts that touch only at a corner: a shared corner would become an
# edge of four faces after extrusion, and the mesh would no longer be a closed manifold.
_SEPARATION_PX = 0.05
_MIN_AREA_PX = 2.0


class ExtrudeGenerator(Generator):
    name = "extrude"
    # no model runs and nothing is random: only the backend's name and the output format change the file
    honours = frozenset()
    ignored_because = {
        "texture": "its front always carries the image itself as a texture (projected and paint are Hunyuan3D's)",
        "*": "it traces the image's outline; no model runs",
    }
    own_texture = "image"

    def generate(self, image: PreparedImage, *, seed: int) -> trimesh.Trimesh:
        # `seed` is accepted for the interface and ignored: there is nothing random here
        grid = _outline_grid(image.mask)
        outlines = _outline_polygons(grid)
        if not outlines:
            raise GenerationError(f"{image.name}: the foreground mask yields no outline to extrude")
        positions, uv, faces = _extrude(outlines, grid.shape)
        material = trimesh.visual.material.PBRMaterial(
            name="image",
            baseColorTexture=_texture(image),
            baseColorFactor=[255, 255, 255, 255],  # else OBJ export writes a grey Kd that darkens the picture
            metallicFactor=0.0,
            roughnessFactor=1.0,
        )
        mesh = trimesh.Trimesh(
            vertices=positions,
            faces=faces,
            visual=trimesh.visual.TextureVisuals(uv=uv, material=material),
            process=False,
        )
        if not _is_closed_solid(mesh):
            raise GenerationError(f"{image.name}: the extruded outline is not a closed solid")
        return mesh


def build(settings: GenerationSettings) -> ExtrudeGenerator:
    return ExtrudeGenerator(settings)


GENERATOR = ExtrudeGenerator


def _outline_grid(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    scale = OUTLINE_RESOLUTION / max(height, width)
    if scale >= 1:
        return mask
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # area averaging, then majority: thin parts survive as long as they are half a cell wide
    coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX)
    return np.asarray(coverage) >= 128


def _outline_polygons(grid: np.ndarray) -> list[Polygon]:
    """The mask as polygons in grid units (x = column, y = -row), holes kept, outer rings counter-clockwise."""
    edges = np.diff(np.pad(grid, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)  # row-major order pairs each run's end with its start
    if rows.size == 0:
        return []
    runs = shapely.box(starts, -(rows + 1.0), ends, -rows.astype(float))
    shape = shapely.union_all(runs).simplify(_SIMPLIFY_PX)
    shape = shape.buffer(-_SEPARATION_PX, join_style="mitre", mitre_limit=10.0)
    parts = [p for p in shapely.get_parts(shape) if isinstance(p, Polygon) and p.area >= _MIN_AREA_PX]
    # a stable order keeps vertex numbering identical from run to run
    parts.sort(key=lambda p: (round(-p.bounds[3], 6), round(p.bounds[0], 6)))
    return [orient(p, sign=1.0) for p in parts]


def _extrude(outlines: list[Polygon], grid_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caps and walls sharing one vertex per outline point, so the slab is closed without any merging."""
    height_px, width_px = grid_shape
    faces, points = [], []
    offset = 0
    for polygon in outlines:
        rings = [np.asarray(polygon.exterior.coords)[:-1]]
        rings += [np.asarray(r.coords)[:-1] for r in polygon.interiors]
        ring_points = np.vstack(rings)
        count = len(ring_points)
        cap = _triangulate(polygon, rings, ring_points)
        # Walls follow the cap's own boundary rather than the rings: a triangulator may skip a collinear ring
        # point, and a wall through a point the cap skipped would leave a crack.
        a, b = _boundary_edges(cap)  # counter-clockwise seen from the front: material on the left
        af, bf, ab, bb = a + offset, b + offset, a + offset + count, b + offset + count
        faces += [cap + offset, cap[:, ::-1] + offset + count]
        faces += [np.column_stack([ab, bb, bf]), np.column_stack([ab, bf, af])]  # outward normal (dy, -dx)
        points.append(ring_points)
        offset += 2 * count

    faces = np.vstack(faces)
    xy = np.vstack([np.vstack([p, p]) for p in points])
    z = np.concatenate([np.repeat([DEPTH / 2, -DEPTH / 2], len(p)) for p in points])
    used, faces = np.unique(faces, return_inverse=True)
    faces = faces.reshape(-1, 3)
    xy, z = xy[used], z[used]
    # planar projection: UV depends on x, y only, so every copy of a position carries the same UV
    uv = np.column_stack([xy[:, 0] / width_px, 1.0 + xy[:, 1] / height_px])

    low, high = xy.min(axis=0), xy.max(axis=0)
    scale = 1.0 / max(float((high - low).max()), 1e-9)
    positions = np.column_stack([(xy - (low + high) / 2) * scale, z])
    return positions, uv, faces


def _boundary_edges(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges used by exactly one triangle: the outline as the triangulation actually has it."""
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    _, inverse, counts = np.unique(np.sort(edges, axis=1), axis=0, return_inverse=True, return_counts=True)
    once = edges[counts[inverse.ravel()] == 1]
    return once[:, 0], once[:, 1]


def _triangulate(polygon: Polygon, rings: list[np.ndarray], points: np.ndarray) -> np.ndarray:
    """Cap triangles as indices into `points`, each counter-clockwise seen from the front."""
    if hasattr(shapely, "constrained_delaunay_triangles"):  # shapely >= 2.1
        # GEOS adds no points, so every corner maps back to an outline point. Preferred over earcut, whose
        # hole bridges run through other outline points when many of them share a row, as pixel outlines do.
        index = {point: i for i, point in enumerate(map(tuple, points))}
        triangles = shapely.get_parts(shapely.constrained_delaunay_triangles(polygon))
        corners = shapely.get_coordinates(triangles).reshape(-1, 4, 2)[:, :3]
        cap = np.array([index[tuple(c)] for c in corners.reshape(-1, 2)], dtype=np.int64).reshape(-1, 3)
    else:
        ends = np.cumsum([len(r) for r in rings]).astype(np.uint32)
        cap = np.asarray(triangulate_float64(points, ends), dtype=np.int64).reshape(-1, 3)
    a, b, c = points[cap[:, 0]], points[cap[:, 1]], points[cap[:, 2]]
    clockwise = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) < 0
    cap[clockwise] = cap[clockwise][:, ::-1]
    return cap


def _texture(image: PreparedImage) -> Image.Image:
    """The picture with foreground colours spread over the background, opaque.

    The outline is smoothed, so its edge and the walls sample pixels just outside the mask; those are
    transparent and often black, which would show as a dark rim.
    """
    pixels = np.asarray(image.rgba.convert("RGBA"))
    foreground = pixels[..., 3] > 127
    rgb = pixels[..., :3]
    if foreground.any() and not foreground.all():
        _, (rows, cols) = ndimage.distance_transform_edt(~foreground, return_indices=True)
        rgb = rgb[rows, cols]
    opaque = np.dstack([rgb, np.full(foreground.shape, 255, np.uint8)])
    return Image.fromarray(np.ascontiguousarray(opaque), "RGBA")


def _is_closed_solid(mesh: trimesh.Trimesh) -> bool:
    # judged with coincident positions welded, as any loader or slicer may do: a corner shared by two parts
    # looks fine on the unwelded mesh and breaks the moment it is welded
    welded = mesh.copy()
    welded.merge_vertices(merge_tex=True, merge_norm=True)
    return bool(welded.is_watertight and welded.is_volume)
