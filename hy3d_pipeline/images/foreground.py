"""The foreground of an input image: its alpha channel, else a plain background keyed out, else rembg.

Generators condition on a cut-out object and the checks compare the model with this mask, so all three ways
of finding it live here. Most inputs already have one (alpha, or a uniform background). The rest need a
segmentation model: rembg would download its model on first use, which a pipeline worker must never do, so
the model is a local file (`HY3D_REMBG_MODEL`, default `~/.u2net/u2net.onnx`) and a missing file refuses the
image with a message saying how to provide it.

`import rembg` takes tens of seconds (numba compilation), so it happens only when a file really needs it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from hy3d_pipeline.images.prepared import ImageRejected
from hy3d_pipeline.settings import current

# Uniform-background detection, in 0-255 RGB distance: loose enough for JPEG ringing on a white sheet,
# tight enough that a photographed scene does not pass as "plain".
_BORDER_TOLERANCE = 24.0
_BORDER_AGREEMENT = 0.9
_FOREGROUND_TOLERANCE = 32.0
_MIN_FOREGROUND_FRACTION = 0.001
_SPECK_FRACTION = 0.0005  # blobs and holes smaller than this share of the image are noise

REMBG_MODEL_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx"

_sessions: dict[str, Any] = {}
_lock = threading.Lock()


def rembg_model_path() -> Path:
    return current().rembg_model_file


def _session(path: Path) -> Any:
    """A rembg U2-Net session reading `path` and nothing else, cached per file for the process."""
    key = str(path.resolve())
    with _lock:
        session = _sessions.get(key)
        if session is not None:
            return session
        import onnxruntime as ort
        from rembg.sessions.u2net_custom import U2netCustomSession

        class LocalFileSession(U2netCustomSession):
            # rembg's own custom session only accepts model files inside its home directories; this one takes
            # the configured file as is, and never has anything to download
            @classmethod
            def download_models(cls, *args: Any, **kwargs: Any) -> str:
                return key

        session = LocalFileSession("u2net_custom", ort.SessionOptions(), model_path=key)
        _sessions[key] = session
        return session


def find_foreground(rgba: Image.Image, name: str) -> tuple[Image.Image, np.ndarray, str]:
    """(the image with its background transparent, the foreground mask, the method used), or ImageRejected."""
    pixels = np.asarray(rgba)
    alpha = pixels[..., 3]
    # An alpha channel is a cut-out only if it makes something transparent; one that is merely not quite
    # opaque everywhere (some exporters write 254) says nothing about where the object is.
    if (alpha <= 127).any():
        mask, method = alpha > 127, "alpha"
    else:
        mask = mask_from_plain_background(pixels[..., :3])
        if mask is None:
            rgba = remove_background(rgba, name)[0]
            mask, method = np.asarray(rgba)[..., 3] > 127, "rembg"
        else:
            method = "uniform-background"
            pixels = pixels.copy()
            pixels[..., 3] = np.where(mask, 255, 0)  # later steps see a cut-out whatever the method
            rgba = Image.fromarray(pixels, "RGBA")
    if mask.mean() < _MIN_FOREGROUND_FRACTION:
        raise ImageRejected(name, f"no foreground: nothing stands out from the background ({method})")
    return rgba, mask, method


def remove_background(rgba: "Image.Image", name: str) -> tuple["Image.Image", str]:
    """Cut the foreground out of `rgba` with rembg; returns (RGBA image with the background transparent, "rembg").

    `name` is what error messages call the input (S3 URL or local path).
    """
    path = rembg_model_path()
    if not path.is_file():
        raise ImageRejected(
            name, "the image has no alpha channel and no plain background, so its background has to be removed "
            f"with rembg, but the rembg model file {path} does not exist. Run `hy3d-pipeline fetch-weights` where "
            f"the internet is reachable (it downloads {REMBG_MODEL_URL}), or set HY3D_REMBG_MODEL to a local copy; "
            "nothing is downloaded at run time. Or upload the image with a transparent or plain background.")
    try:
        session = _session(path)
    except Exception as exc:
        raise ImageRejected(name, f"the rembg model file {path} could not be loaded ({type(exc).__name__}: {exc}); "
                            f"replace it with a good copy of u2net.onnx ({REMBG_MODEL_URL})") from exc
    from rembg import remove

    try:
        out = remove(rgba.convert("RGB"), session=session)
    except Exception as exc:
        raise ImageRejected(name, f"background removal with rembg failed: {type(exc).__name__}: {exc}") from exc
    out = out.convert("RGBA")
    if not np.asarray(out)[..., 3].any():
        raise ImageRejected(name, "rembg found no foreground object in the image")
    return out, "rembg"


def mask_from_plain_background(rgb: np.ndarray) -> np.ndarray | None:
    """Foreground of an opaque image whose border is one colour (a product shot), or None if it is not."""
    rgb = rgb.astype(np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    background = np.median(border, axis=0)
    if (np.linalg.norm(border - background, axis=1) <= _BORDER_TOLERANCE).mean() < _BORDER_AGREEMENT:
        return None
    mask = np.linalg.norm(rgb - background, axis=2) > _FOREGROUND_TOLERANCE
    return _drop_specks(mask)


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    # compression noise makes specks outside the object and pinholes inside it; real holes (a handle) are large
    smallest = max(4, int(mask.size * _SPECK_FRACTION))
    labels, count = ndimage.label(mask)
    if count:
        sizes = np.bincount(labels.ravel())
        mask = (sizes >= smallest)[labels] & mask
    holes, count = ndimage.label(~mask)
    if count:
        sizes = np.bincount(holes.ravel())
        touching_border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = sizes < smallest
        fill[touching_border] = False
        fill[0] = False
        mask = mask | fill[holes]
    return mask
