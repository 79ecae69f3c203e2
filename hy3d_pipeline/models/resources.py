"""The generator resource: the generation settings as Dagster resource config, shown in the UI.

Only settings live here; the model itself is loaded lazily, in the run's process, by `load_generator`, so
loading the code location (every sensor tick, the UI) never touches torch. Its fields are the Settings fields
named in GENERATION_FIELDS (types, defaults and variables declared once, in settings.py), with the choices
of format and texture as enums so the launchpad offers them.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, get_args, get_origin, get_type_hints

from dagster import ConfigurableResource
from pydantic import Field

from hy3d_pipeline import settings as config
from hy3d_pipeline.models.generators.base import GENERATION_FIELDS, GenerationSettings


def choice(literal: Any) -> Any:
    """A Literal's choices as a str Enum: Dagster's config schema takes enums, not Literals."""
    values = get_args(literal)
    return enum.Enum(f"Choice_{'_'.join(v.replace('-', '_') for v in values)}", {v: v for v in values}, type=str)


def _dagster_type(kind: Any) -> Any:
    return choice(kind) if get_origin(kind) is not None and get_args(kind) and all(
        isinstance(a, str) for a in get_args(kind)) else kind


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


class _GeneratorMethods:
    @classmethod
    def from_env(cls, **overrides: Any) -> "GeneratorResource":
        """From the environment's settings (settings.current()), with `overrides` applied."""
        values = {name: getattr(config.current(), name) for name in GENERATION_FIELDS}
        values.update(overrides)
        return cls(**values)

    def settings(self, **overrides: Any) -> GenerationSettings:
        values = {name: _plain(getattr(self, name)) for name in GENERATION_FIELDS}
        values.update({k: _plain(v) for k, v in overrides.items() if v is not None})
        return GenerationSettings(**values)


def _resource_namespace() -> dict[str, Any]:
    hints = get_type_hints(config.Settings)
    fields = {f.name: f for f in dataclasses.fields(config.Settings)}
    namespace: dict[str, Any] = {"__module__": __name__, "__annotations__": {}, "__doc__": __doc__}
    for name in GENERATION_FIELDS:
        kind = _dagster_type(hints[name])
        meta = fields[name].metadata
        namespace["__annotations__"][name] = kind
        default = kind(fields[name].default) if isinstance(kind, type) and issubclass(kind, enum.Enum) else fields[name].default
        namespace[name] = Field(default=default, description=f"{meta['env']}: {meta['help']}")
    return namespace


# built from the Settings fields rather than written out a third time (they had drifted apart)
GeneratorResource = type("GeneratorResource", (_GeneratorMethods, ConfigurableResource), _resource_namespace())
