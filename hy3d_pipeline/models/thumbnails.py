"""Pictures of models and inputs, for people: a shaded render of every model and a preview of its input.

Someone browsing a backfill of a thousand images wants to see the models, not read vertex counts. The render
runs on the worker that made the model, with no display, no GPU and no OpenGL: a small numpy z-buffer
rasteriser (orthographic, three-quarter view, Lambert shading) that colours each pixel from the model's own
texture or vertex colours. It costs tens of milliseconds, nothing next to generation, and adds no dependency.

Two sizes leave the worker: a PNG uploaded next to the model (`THUMBNAIL_SIZE`) and a much smaller WEBP inlined
in Dagster metadata as markdown. The Dagster UI (1.13) renders a markdown metadata value inline only when it is
shorter than 1000 characters (longer ones hide behind a "[Show Markdown]" button) and its sanitiser allows
`data:` image sources, so `inline_markdown` fits the picture to that budget.
"""

from __future__ import annotations

import base64
import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # keep `import hy3d_pipeline` light: numpy, PIL and trimesh load when a picture is made
    import numpy as np
    import trimesh
    from PIL import Image

THUMBNAIL_SIZE = 256
THUMBNAIL_SUFFIX = ".thumb.png"
# Dagster UI: `MarkdownMetadataEntry` is drawn inline when `mdStr.length < 1e3`
INLINE_MARKDOWN_LIMIT = 1000
INLINE_SIZES = (128, 112, 96, 80, 64, 48)
INLINE_QUALITIES = (75, 60, 45, 30, 15)
BACKGROUND = (243, 244, 246)  # a light grey that reads on the UI's light and dark themes alike
CLAY = (186, 178, 166)  # a model with no colours of its own

# three-quarter view: turned to show the front (+Z) and the right side, seen from a little above
YAW_DEGREES = -35.0
PITCH_DEGREES = 22.0
_LIGHT = (-0.45, 0.65, 0.62)  # upper left, in front
_AMBIENT, _DIFFUSE, _HEADLIGHT = 0.32, 0.58, 0.18
_SMOOTH_LIMIT = math.cos(math.radians(20))  # sharper creases keep the face normal (the extrusion's rim)
_SUPERSAMPLE = 2
_MARGIN = 0.06
_CANDIDATES_PER_CHUNK = 1_500_000  # pixel-triangle pairs tested at once; bounds the rasteriser's memory


def thumbnail_key(model_key: str) -> str:
    """Where a model's picture lives: next to it, under the models prefix, which the sensor never lists."""
    return model_key + THUMBNAIL_SUFFIX


def render_mesh(mesh: "trimesh.Trimesh | trimesh.Scene", size: int = THUMBNAIL_SIZE) -> "Image.Image":
    """An RGBA picture of the mesh from a three-quarter view, transparent where there is no model."""
    import numpy as np
    from PIL import Image

    from hy3d_pipeline.models.export import as_mesh

    mesh = as_mesh(mesh)
    canvas = size * _SUPERSAMPLE
    vertices = np.asarray(mesh.vertices, dtype=np.float64).reshape(-1, 3)
    faces = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
    if len(faces):
        faces = faces[np.isfinite(vertices).all(axis=1)[faces].all(axis=1)]  # a NaN corner has no place to go
    if len(faces) == 0:
        return Image.new("RGBA", (size, size), (0, 0, 0, 0))

    view = vertices @ _rotation().T  # x right, y up, z towards the viewer
    used = np.unique(faces)
    low, high = view[used, :2].min(axis=0), view[used, :2].max(axis=0)
    scale = canvas * (1 - 2 * _MARGIN) / max(float((high - low).max()), 1e-12)
    centre = (low + high) / 2
    screen = np.empty((len(view), 3))
    screen[:, 0] = (view[:, 0] - centre[0]) * scale + canvas / 2
    screen[:, 1] = canvas / 2 - (view[:, 1] - centre[1]) * scale
    screen[:, 2] = view[:, 2]

    face_id, bary = _rasterise(screen, faces, canvas)
    covered = face_id >= 0
    rgba = np.zeros((canvas, canvas, 4), dtype=np.float64)
    if covered.any():
        fid, w = face_id[covered], bary[covered]
        colour = _surface_colour(mesh, faces, fid, w)
        rgba[covered, :3] = colour * _shading(mesh, view, faces, fid, w)[:, None]
        rgba[covered, 3] = 255.0
    image = Image.fromarray(np.clip(np.rint(rgba), 0, 255).astype(np.uint8), "RGBA")
    # premultiplied while shrinking, so the transparent background does not bleed a dark fringe into edges
    return image.convert("RGBa").resize((size, size), Image.Resampling.BOX).convert("RGBA")


def image_preview(source: "Image.Image | str | Any", size: int = THUMBNAIL_SIZE) -> "Image.Image":
    """The input picture shrunk to fit `size`, as RGBA; `source` is an image or a path."""
    from PIL import Image, ImageOps

    from hy3d_pipeline.images.validation import to_rgba8

    if isinstance(source, Image.Image):
        image = source.copy()
    else:
        with Image.open(source) as opened:
            opened.draft("RGB", (size * 2, size * 2))  # JPEGs decode at a fraction of their size
            image = ImageOps.exif_transpose(opened)
            image.load()
    image = to_rgba8(image)
    image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def flatten(image: "Image.Image", background: tuple[int, int, int] = BACKGROUND) -> "Image.Image":
    """The picture over a plain background, as RGB (what a viewer without alpha would show)."""
    from PIL import Image

    base = Image.new("RGBA", image.size, background + (255,))
    return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")


def png_bytes(image: "Image.Image") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def inline_markdown(image: "Image.Image", alt: str, limit: int = INLINE_MARKDOWN_LIMIT) -> str:
    """`![alt](data:image/webp;base64,...)` no longer than `limit` characters: the largest size, then the best
    quality, that fits. WEBP because JPEG's own tables alone take half the budget."""
    from PIL import Image

    alt = "".join(ch for ch in alt if ch not in "[]()\\\n\r")[:40]
    flat = flatten(image)
    text = ""
    for side in INLINE_SIZES:
        small = flat.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        for quality in INLINE_QUALITIES:
            buffer = io.BytesIO()
            small.save(buffer, format="WEBP", quality=quality, method=6)
            text = f"![{alt}](data:image/webp;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')})"
            if len(text) < limit:
                return text
    return f"({alt}: no preview fits in {limit} characters)"


def decode_inline(markdown: str) -> "Image.Image | None":
    """The picture inside an `inline_markdown` string: what the UI will show."""
    from PIL import Image

    head, _, rest = markdown.partition(";base64,")
    if not head or not rest:
        return None
    try:
        return Image.open(io.BytesIO(base64.b64decode(rest.rstrip(")")))).convert("RGBA")
    except Exception:  # noqa: BLE001 - a preview is a nicety; a damaged one is simply absent
        return None


# --- rasteriser -----------------------------------------------------------------------------------------------


def _rotation() -> "np.ndarray":
    import numpy as np

    yaw, pitch = math.radians(YAW_DEGREES), math.radians(PITCH_DEGREES)
    turn = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    tilt = np.array([[1, 0, 0], [0, math.cos(pitch), -math.sin(pitch)], [0, math.sin(pitch), math.cos(pitch)]])
    return tilt @ turn


def _rasterise(screen: "np.ndarray", faces: "np.ndarray", canvas: int) -> "tuple[np.ndarray, np.ndarray]":
    """Nearest face per pixel (-1 for none) and the pixel centre's barycentric weights in that face.

    Every face is tested against every pixel of its bounding box at once, in chunks: a python loop over faces
    would cost seconds on a 40000-face mesh."""
    import numpy as np

    tri = screen[faces]  # (F, 3, 3)
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]
    doubled = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    x0 = np.clip(np.ceil(x.min(axis=1) - 0.5), 0, canvas).astype(np.int64)
    x1 = np.clip(np.floor(x.max(axis=1) - 0.5), -1, canvas - 1).astype(np.int64)
    y0 = np.clip(np.ceil(y.min(axis=1) - 0.5), 0, canvas).astype(np.int64)
    y1 = np.clip(np.floor(y.max(axis=1) - 0.5), -1, canvas - 1).astype(np.int64)
    width, height = x1 - x0 + 1, y1 - y0 + 1
    live = np.nonzero((width > 0) & (height > 0) & (np.abs(doubled) > 1e-12))[0]
    counts = (width * height)[live]

    depth = np.full(canvas * canvas, -np.inf)
    face_id = np.full(canvas * canvas, -1, dtype=np.int64)
    bary = np.zeros((canvas * canvas, 3))
    start = 0
    ends = np.cumsum(counts)
    while start < len(live):
        done = int(ends[start - 1]) if start else 0
        stop = max(start + 1, int(np.searchsorted(ends, done + _CANDIDATES_PER_CHUNK, side="right")))
        chunk, n = live[start:stop], counts[start:stop]
        start = stop
        f = np.repeat(chunk, n)
        local = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
        px = x0[f] + local % width[f]
        py = y0[f] + local // width[f]
        cx, cy = px + 0.5, py + 0.5
        xa, ya, xb, yb, xc, yc = x[f, 0], y[f, 0], x[f, 1], y[f, 1], x[f, 2], y[f, 2]
        w0 = ((xb - cx) * (yc - cy) - (xc - cx) * (yb - cy)) / doubled[f]
        w1 = ((xc - cx) * (ya - cy) - (xa - cx) * (yc - cy)) / doubled[f]
        w2 = 1.0 - w0 - w1
        inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
        if not inside.any():
            continue
        f, w0, w1, w2 = f[inside], w0[inside], w1[inside], w2[inside]
        pixel = py[inside] * canvas + px[inside]
        near = w0 * z[f, 0] + w1 * z[f, 1] + w2 * z[f, 2]
        order = np.lexsort((-near, pixel))  # per pixel, nearest first
        pixel, near = pixel[order], near[order]
        first = np.ones(len(pixel), dtype=bool)
        first[1:] = pixel[1:] != pixel[:-1]
        pick = order[first]
        pixel, near = pixel[first], near[first]
        better = near > depth[pixel]
        target = pixel[better]
        depth[target] = near[better]
        face_id[target] = f[pick[better]]
        bary[target] = np.column_stack([w0[pick[better]], w1[pick[better]], w2[pick[better]]])
    return face_id.reshape(canvas, canvas), bary.reshape(canvas, canvas, 3)


def _shading(mesh: "trimesh.Trimesh", view: "np.ndarray", faces: "np.ndarray", fid: "np.ndarray",
             w: "np.ndarray") -> "np.ndarray":
    """Lambert from a key light plus a little light from the camera, so no side is ever black."""
    import numpy as np

    tri = view[faces[fid]]
    flat = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)
    normal = flat
    vertex_normals = None
    if len(mesh.vertices) == len(view):
        try:
            vertex_normals = np.asarray(mesh.vertex_normals, dtype=np.float64) @ _rotation().T
        except Exception:  # noqa: BLE001 - degenerate meshes: flat shading is still a picture
            vertex_normals = None
    if vertex_normals is not None and np.isfinite(vertex_normals).all():
        # auto-smooth: a corner whose vertex normal leans too far from the face (a slab's rim, where cap
        # and wall share the vertex) keeps the face normal, so creases stay crisp and curves stay smooth
        corners = vertex_normals[faces[fid]]
        agree = np.einsum("pkd,pd->pk", corners, flat) > _SMOOTH_LIMIT
        corners = np.where(agree[..., None], corners, flat[:, None, :])
        normal = np.einsum("pk,pkd->pd", w, corners)
        normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    normal = np.where(normal[:, 2:3] < 0, -normal, normal)  # an open mesh's inside is lit like its outside
    light = np.asarray(_LIGHT) / np.linalg.norm(_LIGHT)
    return _AMBIENT + _DIFFUSE * np.clip(normal @ light, 0, 1) + _HEADLIGHT * np.clip(normal[:, 2], 0, 1)


def _surface_colour(mesh: "trimesh.Trimesh", faces: "np.ndarray", fid: "np.ndarray", w: "np.ndarray") -> "np.ndarray":
    """RGB (0-255) per covered pixel: the texture at the interpolated UV, else vertex or face colours, else clay."""
    import numpy as np
    import trimesh

    visual = mesh.visual
    count = len(fid)
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = getattr(visual, "material", None)
        texture = _material_image(material)
        uv = getattr(visual, "uv", None)
        factor = _base_colour(material, "baseColorFactor")
        if texture is not None and uv is not None and len(uv) == len(mesh.vertices):
            pixels = np.asarray(texture.convert("RGB"), dtype=np.float64)
            height, width = pixels.shape[:2]
            at = np.nan_to_num(np.einsum("pk,pkd->pd", w, np.asarray(uv, dtype=np.float64)[faces[fid]]))
            col = np.clip(np.rint(at[:, 0] * (width - 1)), 0, width - 1).astype(np.intp)
            row = np.clip(np.rint((1.0 - at[:, 1]) * (height - 1)), 0, height - 1).astype(np.intp)
            # glTF multiplies the texture by the base colour; an OBJ's Kd is not applied: trimesh gives a
            # textured OBJ a grey Kd that no viewer shows
            return pixels[row, col] * (factor / 255.0 if factor is not None else 1.0)
        plain = factor if factor is not None else _base_colour(material, "main_color")
        return np.tile(plain if plain is not None else np.asarray(CLAY, dtype=np.float64), (count, 1))
    if isinstance(visual, trimesh.visual.ColorVisuals) and visual.kind in ("vertex", "face"):
        if visual.kind == "vertex":
            colours = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3]
            return np.einsum("pk,pkd->pd", w, colours[faces[fid]])
        return np.asarray(visual.face_colors, dtype=np.float64)[:, :3][fid]
    return np.tile(np.asarray(CLAY, dtype=np.float64), (count, 1))


def _material_image(material: Any) -> "Image.Image | None":
    for name in ("baseColorTexture", "image"):
        image = getattr(material, name, None)
        if image is not None and hasattr(image, "convert"):
            return image
    return None


def _base_colour(material: Any, name: str) -> "np.ndarray | None":
    """A material's colour attribute as RGB 0-255, or None."""
    import numpy as np

    value = getattr(material, name, None)
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64).ravel()[:3]
    if value.size != 3 or not np.isfinite(value).all():
        return None
    # trimesh keeps colours as uint8, glTF writes floats in 0-1
    return value if np.asarray(getattr(material, name)).dtype == np.uint8 or value.max() > 1.0 else value * 255.0
