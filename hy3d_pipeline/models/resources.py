"""The generator resource: HY3D_* settings read once when the code location loads.

Only settings live here; the model itself is loaded lazily, in the run's process, by `load_generator`, so
loading the code location (every sensor tick, the UI) never touches torch.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from hy3d_pipeline.models.generators.base import GenerationSettings
from hy3d_pipeline.s3.resources import env_flag

_DEFAULTS = GenerationSettings()


def _env(name: str, default: Any) -> Any:
    raw = os.getenv(name)
    if raw is None or raw.strip() == "":
        return default
    return type(default)(raw) if not isinstance(default, bool) else env_flag(name, default)


class GeneratorResource(ConfigurableResource):
    generator: str = Field(default=_DEFAULTS.generator, description="HY3D_GENERATOR: hunyuan3d or extrude")
    output_format: str = Field(default=_DEFAULTS.output_format, description="glb, obj, ply or stl (HY3D_OUTPUT_FORMAT)")
    texture: str = Field(default=_DEFAULTS.texture, description="none, projected or paint (HY3D_TEXTURE)")
    model_path: str = Field(default=_DEFAULTS.model_path, description="HY3D_MODEL_PATH")
    model_subfolder: str = Field(default=_DEFAULTS.model_subfolder, description="HY3D_MODEL_SUBFOLDER")
    device: str = Field(default=_DEFAULTS.device, description="HY3D_DEVICE: auto, cuda, cuda:N, cpu")
    steps: int = _DEFAULTS.steps
    octree_resolution: int = _DEFAULTS.octree_resolution
    guidance_scale: float = _DEFAULTS.guidance_scale
    num_chunks: int = _DEFAULTS.num_chunks
    seed: int = _DEFAULTS.seed
    max_faces: int = _DEFAULTS.max_faces
    flashvdm: bool = _DEFAULTS.flashvdm

    @classmethod
    def from_env(cls, **overrides: Any) -> "GeneratorResource":
        names = {
            "generator": "HY3D_GENERATOR", "output_format": "HY3D_OUTPUT_FORMAT", "texture": "HY3D_TEXTURE",
            "model_path": "HY3D_MODEL_PATH", "model_subfolder": "HY3D_MODEL_SUBFOLDER", "device": "HY3D_DEVICE",
            "steps": "HY3D_STEPS", "octree_resolution": "HY3D_OCTREE_RESOLUTION",
            "guidance_scale": "HY3D_GUIDANCE_SCALE", "num_chunks": "HY3D_NUM_CHUNKS", "seed": "HY3D_SEED",
            "max_faces": "HY3D_MAX_FACES", "flashvdm": "HY3D_FLASHVDM",
        }
        values = {field: _env(env, getattr(_DEFAULTS, field)) for field, env in names.items()}
        values.update(overrides)
        return cls(**values)

    def settings(self, **overrides: Any) -> GenerationSettings:
        values = {name: getattr(self, name) for name in GenerationSettings.__dataclass_fields__}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return GenerationSettings(**values)
