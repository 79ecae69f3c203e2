"""Background removal with rembg, for inputs that have neither an alpha channel nor a plain background.

Hunyuan3D conditions on a cut-out object; most inputs already have one (alpha, or a uniform background that
image validation can key out). The rest need a segmentation model. rembg would download its model on first
use, which a pipeline worker must never do, so the model is a local file (`HY3D_REMBG_MODEL`, default
`~/.u2net/u2net.onnx`) and a missing file is a GenerationError saying how to provide it.

`import rembg` takes tens of seconds (numba compilation), so it happens only when a file really needs it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hy3d_pipeline.models.generators.base import GenerationError

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_REMBG_MODEL = "~/.u2net/u2net.onnx"
REMBG_MODEL_URL = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx"

_sessions: dict[str, Any] = {}
_lock = threading.Lock()


def rembg_model_path() -> Path:
    raw = os.environ.get("HY3D_REMBG_MODEL", "").strip() or DEFAULT_REMBG_MODEL
    return Path(os.path.expanduser(raw))


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


def remove_background(rgba: "Image.Image", name: str) -> tuple["Image.Image", str]:
    """Cut the foreground out of `rgba` with rembg; returns (RGBA image with the background transparent, "rembg").

    `name` is what error messages call the input (S3 URL or local path).
    """
    import numpy as np

    path = rembg_model_path()
    if not path.is_file():
        raise GenerationError(
            f"{name}: the image has no alpha channel and no plain background, so its background has to be removed "
            f"with rembg, but the rembg model file {path} does not exist. Put u2net.onnx there ({REMBG_MODEL_URL}) "
            "or set HY3D_REMBG_MODEL to a local copy; nothing is downloaded at run time. Alternatively upload the "
            "image with a transparent or plain background."
        )
    try:
        session = _session(path)
    except Exception as exc:
        raise GenerationError(
            f"{name}: the rembg model file {path} could not be loaded ({type(exc).__name__}: {exc}); "
            f"replace it with a good copy of u2net.onnx ({REMBG_MODEL_URL})"
        ) from exc
    from rembg import remove

    try:
        out = remove(rgba.convert("RGB"), session=session)
    except Exception as exc:
        raise GenerationError(f"{name}: background removal with rembg failed: {type(exc).__name__}: {exc}") from exc
    out = out.convert("RGBA")
    if not np.asarray(out)[..., 3].any():
        raise GenerationError(f"{name}: rembg found no foreground object in the image")
    return out, "rembg"
