"""What image preparation hands the generators (PreparedImage), and what it refuses inputs with (ImageRejected).

Its own module so that generators (models/) can name these types without importing the decoding code, and
images/ never imports from models/.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import hy3d_pipeline` light: numpy/PIL only when an image is prepared
    import numpy as np
    from PIL import Image


class ImageRejected(ValueError):
    """An input that cannot become a model; the message names the input and the problem."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name}: {problem}")
        self.name = name
        self.problem = problem


@dataclasses.dataclass
class PreparedImage:
    """A verified, normalised input: RGBA 8-bit, EXIF orientation applied, with its foreground mask."""

    name: str  # what error messages call this input (S3 URL or local path)
    rgba: "Image.Image"
    mask: "np.ndarray"  # bool, H x W, True on the foreground
    foreground_method: str  # "alpha" | "uniform-background" | "rembg"
