"""Generator backends behind one small interface; `load_generator` picks one by name and keeps it warm."""

from hy3d_pipeline.models.generators.base import (
    GenerationError,
    GenerationSettings,
    Generator,
    PreparedImage,
    load_generator,
    known_generators,
)

__all__ = [
    "GenerationError",
    "GenerationSettings",
    "Generator",
    "PreparedImage",
    "load_generator",
    "known_generators",
]
