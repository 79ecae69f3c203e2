"""The generator interface.

Every backend (the CPU `extrude` default, the real `hunyuan3d` model, whatever comes next) is a callable
`build(settings) -> Generator` declared in the entry point group `hy3d_pipeline.generators` (see `registry`),
in this package or in any package installed beside it; its module also names `GENERATOR`, the class it builds.
The pipeline, the seed API and the benchmarks only ever talk to this interface, so a new model is one new
module (and its entry point) and nothing else changes.

A backend also declares which settings it honours (`Generator.honours`): the idempotence fingerprint is
taken over those alone, so a setting a backend ignores (the texture mode under `extrude`) never makes an
identical model count as new, and the ignored values are noted with the model instead of passing silently.

Backends are expensive to build (a multi-gigabyte model for Hunyuan3D), so `load_generator` keeps one
instance per process and settings: every partition a process handles reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, get_type_hints

if TYPE_CHECKING:  # keep `import hy3d_pipeline` light: trimesh only when a backend runs
    import trimesh

from hy3d_pipeline.images.prepared import PreparedImage
from hy3d_pipeline.settings import OUTPUT_FORMATS, TEXTURE_MODES, Settings

# the settings that decide what mesh comes out: their types and defaults are the Settings fields of these names
GENERATION_FIELDS = ("generator", "output_format", "texture", "model_path", "model_subfolder", "device", "steps",
                     "octree_resolution", "guidance_scale", "num_chunks", "seed", "max_faces", "flashvdm")
# honoured by every backend: which backend runs, and the export that follows it
UNIVERSAL_SETTINGS = frozenset({"generator", "output_format"})


class GenerationError(Exception):
    """A generation failed for one image; the message names the image and the problem."""


class _Generation:
    """Everything that decides what mesh comes out. Its `fingerprint` keys idempotence: a model that exists
    for the same source ETag and fingerprint is never generated again."""

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(
                f"output format {self.output_format!r} is not supported; use one of {', '.join(OUTPUT_FORMATS)}"
            )
        if self.texture not in TEXTURE_MODES:
            raise ValueError(f"texture mode {self.texture!r} is not supported; use one of {', '.join(TEXTURE_MODES)}")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> "GenerationSettings":
        values = {name: getattr(settings, name) for name in GENERATION_FIELDS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def fingerprint(self) -> str:
        """Short stable hash of the settings that change the output: the effective ones (device never does)."""
        data = {k: v for k, v in dataclasses.asdict(self.effective()).items() if k != "device"}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def effective(self) -> "GenerationSettings":
        """These settings with every one the backend ignores put back to its default.

        Defaults rather than dropping the fields: a model made with default settings keeps the fingerprint it
        had before backends declared what they honour, so nothing is regenerated for that."""
        ignored = self.ignored()
        return dataclasses.replace(self, **{name: _FIELD_DEFAULTS[name] for name in ignored}) if ignored else self

    def ignored(self) -> dict[str, Any]:
        """The settings given other than their defaults that the backend does not use: {field: value}."""
        honours = _honoured(self.generator)
        if honours is None:
            return {}
        return {
            name: getattr(self, name)
            for name in _FIELD_DEFAULTS
            if name not in honours and name != "device" and getattr(self, name) != _FIELD_DEFAULTS[name]
        }

    def ignored_notes(self) -> list[str]:
        """One sentence per ignored setting, for the model's metadata and the seed API's result."""
        ignored = self.ignored()
        if not ignored:
            return []
        reasons = backend_class(self.generator).ignored_because
        return [
            f"{name}={value!r} is ignored by {self.generator}: {reasons.get(name) or reasons.get('*') or 'it does not use it'}"
            for name, value in ignored.items()
        ]

    def seed_for(self, partition_key: str) -> int:
        """Seed fixed by configuration and partition key, so a re-run reproduces the same mesh."""
        digest = hashlib.sha256(f"{self.seed}:{partition_key}".encode()).digest()
        return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _generation_fields() -> list[tuple[str, Any, Any]]:
    hints = get_type_hints(Settings)
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    return [(name, hints[name], dataclasses.field(default=defaults[name])) for name in GENERATION_FIELDS]


# fields declared once, in Settings (types, defaults, environment variables): written out again here they drifted
GenerationSettings = dataclasses.make_dataclass("GenerationSettings", _generation_fields(), bases=(_Generation,),
                                                frozen=True, namespace={"__module__": __name__})




class Generator(ABC):
    """One backend. `generate` turns one prepared image into one mesh or scene, or raises GenerationError."""

    name: ClassVar[str]
    # the GenerationSettings fields this backend reads beyond UNIVERSAL_SETTINGS; None: every one of them. Only
    # these enter the fingerprint, so a backend must list every field that can change its output
    honours: ClassVar[frozenset[str] | None] = None
    # why a setting is ignored, by field name ("*": any other), for the notes recorded with the model
    ignored_because: ClassVar[dict[str, str]] = {}
    # the colouring this backend always makes, for one that ignores `texture`
    own_texture: ClassVar[str | None] = None

    def __init__(self, settings: GenerationSettings) -> None:
        self.settings = settings

    @abstractmethod
    def generate(self, image: PreparedImage, *, seed: int) -> "trimesh.Trimesh | trimesh.Scene":
        """Generate a mesh for `image`. Must raise GenerationError (naming `image.name`) on failure."""

    def describe(self) -> dict[str, Any]:
        """Facts about the loaded backend (device, model path...), recorded as `generator` metadata on every
        model it makes; JSON-serialisable."""
        return {"backend": self.name}


def known_generators() -> tuple[str, ...]:
    """Names of the installed backends (declared by entry point; see `registry`), whether or not they can be
    built here: `hy3d-pipeline generators` says which can."""
    from hy3d_pipeline.models.generators import registry

    return tuple(registry.installed())


_classes: dict[str, type[Generator]] = {}  # backend name -> its class, found once per process


def backend_class(name: str) -> type[Generator]:
    """The Generator class of backend `name` (its module's `GENERATOR`), without building it. A GenerationError
    names the installed backends when there is none of that name, or says why its module does not import."""
    found = _classes.get(name)
    if found is not None:
        return found
    from hy3d_pipeline.models.generators import registry

    try:
        backend = registry.find(name)
        module = importlib.import_module(backend.target.partition(":")[0])
    except LookupError as exc:
        raise GenerationError(str(exc)) from None
    except Exception as exc:
        raise GenerationError(
            f"generator {name!r} ({backend.target}, from {backend.distribution}) cannot be imported: "
            f"{type(exc).__name__}: {exc}") from exc
    # a backend that declares nothing is taken to honour every setting
    found = _classes[name] = getattr(module, "GENERATOR", Generator)
    return found


def _honoured(name: str) -> frozenset[str] | None:
    try:
        honours = backend_class(name).honours
    except GenerationError:
        return None  # nothing to ask: every setting counts (loading it fails with the real message)
    return None if honours is None else honours | UNIVERSAL_SETTINGS


def texture_made(settings: GenerationSettings) -> str:
    """What colours the model: the texture mode asked for, or the backend's own when it ignores the mode."""
    honours = _honoured(settings.generator)
    if honours is None or "texture" in honours:
        return settings.texture
    return backend_class(settings.generator).own_texture or "none"


_FIELD_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(GenerationSettings)}


_cache: dict[tuple, Generator] = {}
_lock = threading.Lock()
load_count: dict[str, int] = {}  # how many times each backend was built in this process (tests, metrics)
# every build of any backend in this process: what `generator_loads` metadata reports, so a worker that reloads
# (a settings change, a cache cleared) shows it on the models it makes
total_loads = 0


def _load_key(settings: GenerationSettings) -> tuple:
    # output format and texture mode are applied after generation; they must not force a reload
    return dataclasses.astuple(dataclasses.replace(settings, output_format="glb", texture="none"))


def load_generator(settings: GenerationSettings) -> Generator:
    """The warm generator for these settings: built on first use in this process, reused afterwards."""
    global total_loads
    key = _load_key(settings)
    with _lock:
        gen = _cache.get(key)
        if gen is None:
            gen = _build(settings)
            load_count[settings.generator] = load_count.get(settings.generator, 0) + 1
            total_loads += 1
            _cache.clear()  # one warm model per process: a new configuration frees the old one
            _cache[key] = gen
        gen.settings = settings  # same loaded model; this call's output format and texture mode
        return gen


def _build(settings: GenerationSettings) -> Generator:
    from hy3d_pipeline.models.generators import registry

    backend_class(settings.generator)  # an unknown name or a module that does not import: the message says so
    try:
        backend = registry.find(settings.generator)
        build = backend.load()
    except LookupError as exc:
        raise GenerationError(str(exc)) from None
    except Exception as exc:
        raise GenerationError(
            f"generator {backend.name!r} ({backend.target}, from {backend.distribution}) cannot be imported: "
            f"{type(exc).__name__}: {exc}") from exc
    gen = build(settings)
    if not isinstance(gen, Generator):
        raise GenerationError(f"generator {backend.name!r}: {backend.target} returned {type(gen).__name__}, not a "
                              "hy3d_pipeline.models.generators.Generator")
    return gen


def worker_identity() -> dict[str, Any]:
    """`worker` (HOST:PID of this process) and `generator_loads` (builds so far in it), for model metadata."""
    import os
    import socket

    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "generator_loads": total_loads}
