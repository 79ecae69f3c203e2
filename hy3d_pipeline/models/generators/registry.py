"""Which generator backends are installed: found by entry point, so a backend can live here or in any package.

A backend is a callable `build(settings) -> Generator` declared in the entry point group
`hy3d_pipeline.generators` of the package that ships it (its pyproject.toml):

    [project.entry-points."hy3d_pipeline.generators"]
    mymodel = "my_package.my_backend:build"

Once that package is installed, `HY3D_GENERATOR=mymodel` picks it; nothing else changes. This package declares
its own two backends the same way. They are also known here (`BUILTIN`, which a test holds equal to
pyproject.toml), so a source checkout on PYTHONPATH, or an editable install made before the entry points were
declared, still finds them.

The backend's module names `GENERATOR`, the class `build` returns (base.backend_class reads the settings it
honours from it without building it). Nothing is imported until a backend is built, listed or fingerprinted, so
`import hy3d_pipeline` stays light. A backend module may define `missing(settings) -> list[str]`: what building
it with these settings would lack (packages, weights), said without importing anything heavy, so the listing
can tell "installed" from "usable here".
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

GROUP = "hy3d_pipeline.generators"
DISTRIBUTION = "hy3d-pipeline"
BUILTIN = {
    "extrude": "hy3d_pipeline.models.generators.extrude:build",
    "hunyuan3d": "hy3d_pipeline.models.generators.hunyuan3d:build",
}


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    target: str  # "module:attribute", as in the entry point
    distribution: str  # the package that declares it
    conflict: str = ""  # set when two packages declare this name with different targets

    def load(self) -> Callable[..., Any]:
        """The backend's `build`, importing its module. Raises ImportError/AttributeError as the import does."""
        if self.conflict:
            raise LookupError(self.conflict)
        module_name, _, attribute = self.target.partition(":")
        found: Any = importlib.import_module(module_name)
        for part in filter(None, attribute.split(".")):
            found = getattr(found, part)
        if not callable(found):
            raise TypeError(f"{self.target} is not callable")
        return found

    def problem(self, settings: Any) -> str:
        """Why this backend cannot be built here with `settings` ("" when nothing is known to be missing);
        imports its module, which backends keep light (their heavy imports happen in `build`)."""
        try:
            self.load()
            module = importlib.import_module(self.target.partition(":")[0])
            missing = list(module.missing(settings)) if callable(getattr(module, "missing", None)) else []
        except Exception as exc:  # noqa: BLE001 - any failure to import is the answer
            return f"{type(exc).__name__}: {exc}"
        return "; ".join(missing)


def installed() -> dict[str, Backend]:
    """Every declared backend by name, in name order; nothing is imported."""
    declared: dict[str, list[Backend]] = {n: [Backend(n, t, DISTRIBUTION)] for n, t in BUILTIN.items()}
    for point in entry_points(group=GROUP):
        dist = point.dist.name if point.dist is not None else "?"
        backend = Backend(point.name, point.value.replace(" ", ""), dist)
        others = declared.setdefault(point.name, [])
        # the same declaration seen twice (our built-ins, a stale second copy of a package) is one backend
        if all(b.target != backend.target for b in others):
            others.append(backend)
    found = {}
    for name in sorted(declared):
        options = declared[name]
        if len(options) == 1:
            found[name] = options[0]
        else:
            which = "; ".join(f"{b.distribution} ({b.target})" for b in options)
            found[name] = dataclasses.replace(
                options[-1], conflict=f"generator {name!r} is declared by more than one package: {which}; "
                                      "uninstall one of them")
    return found


def find(name: str) -> Backend:
    """The backend called `name`; LookupError naming what is installed when there is none."""
    backends = installed()
    backend = backends.get(name)
    if backend is None:
        raise LookupError(
            f"unknown generator {name!r} (HY3D_GENERATOR); installed: {', '.join(backends) or 'none'}. A backend "
            f"is installed by a package that declares it in the entry point group {GROUP!r}; "
            "`hy3d-pipeline generators` lists them")
    if backend.conflict:
        raise LookupError(backend.conflict)
    return backend


def listing(settings: Any) -> list[dict[str, str]]:
    """One row per installed backend (name, package, target, status with these GenerationSettings, and whether
    they select it), for `hy3d-pipeline generators`."""
    rows = []
    for backend in installed().values():
        problem = backend.conflict or backend.problem(settings)
        rows.append({"name": backend.name, "package": backend.distribution, "target": backend.target,
                     "status": f"unavailable: {problem}" if problem else "available",
                     "selected": "yes" if backend.name == settings.generator else ""})
    return rows
