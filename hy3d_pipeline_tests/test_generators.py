"""The generator registry: backends found by entry point (group `hy3d_pipeline.generators`), from this package or
from a package installed beside it.

"A package elsewhere" is a real one here: a module and a `.dist-info` folder that declares its entry point, put on
sys.path (what pip leaves in site-packages), found by importlib.metadata like any installed distribution.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hy3d_pipeline.models.generators import registry
from hy3d_pipeline.models.generators.base import GenerationError, GenerationSettings, known_generators, load_generator
from hy3d_pipeline_tests.conftest import png_bytes
from hy3d_pipeline_tests.dev_process import ROOT

BOX_BACKEND = textwrap.dedent('''
    """An outside backend: a unit box for any image."""
    import trimesh

    from hy3d_pipeline.models.generators import Generator


    class BoxGenerator(Generator):
        name = "box"

        def generate(self, image, *, seed):
            return trimesh.creation.box()

        def describe(self):
            return {"backend": self.name, "package": "hy3d-box-backend", "edge": 1.0}


    GENERATOR = BoxGenerator


    def build(settings):
        return BoxGenerator(settings)
''')


def install_package(root: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> Path:
    """A distribution as pip installs one: its modules and `<dist>-1.0.dist-info` (METADATA, entry_points.txt)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in modules.items():
        (root / f"{name}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{registry.GROUP}]\n{lines}")
    return root


@pytest.fixture
def box_package(tmp_path, monkeypatch):
    root = install_package(tmp_path / "site", "hy3d-box-backend", {"hy3d_box_backend": BOX_BACKEND},
                           {"box": "hy3d_box_backend:build"})
    monkeypatch.syspath_prepend(str(root))
    return root


def test_builtins_are_the_entry_points_pyproject_declares():
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][registry.GROUP]
    assert declared == registry.BUILTIN
    assert set(known_generators()) >= {"extrude", "hunyuan3d"}


def test_a_backend_from_another_package_is_installed_and_used(box_package, tmp_path, monkeypatch):
    """Installed beside this package, the backend is listed, built by name and used by the seed API, with its
    describe() in what the model records."""
    from hy3d_pipeline.core import generate_3d_from_image_core
    from hy3d_pipeline.models.generators import base

    monkeypatch.setattr(base, "_cache", {})
    assert "box" in known_generators()
    assert registry.installed()["box"] == registry.Backend("box", "hy3d_box_backend:build", "hy3d-box-backend")
    generator = load_generator(GenerationSettings(generator="box"))
    assert type(generator).__module__ == "hy3d_box_backend"
    [row] = [r for r in registry.listing(GenerationSettings(generator="box")) if r["name"] == "box"]
    assert (row["package"], row["status"], row["selected"]) == ("hy3d-box-backend", "available", "yes")

    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    monkeypatch.setenv("HY3D_GENERATOR", "box")
    result = generate_3d_from_image_core(str(image), output_format="stl", output_dir=str(tmp_path / "out"))
    assert result["status"] == "success" and result["backend"] == "box", result
    assert Path(result["model_path"]).stat().st_size > 0


def test_the_pipeline_records_an_outside_backends_description(box_package, instance, storage, s3, monkeypatch):
    from dagster import AssetKey, AssetRecordsFilter, materialize

    from hy3d_pipeline.definitions import build_defs
    from hy3d_pipeline.models.assets import image_to_model
    from hy3d_pipeline.models.generators import base

    monkeypatch.setattr(base, "_cache", {})
    monkeypatch.setenv("HY3D_GENERATOR", "box")
    s3.put_object(Bucket=storage.images_bucket, Key="cube.png", Body=png_bytes())
    instance.add_dynamic_partitions("images", ["cube.png"])
    defs = build_defs()
    assert materialize([image_to_model], instance=instance, resources=defs.resources, partition_key="cube.png").success
    [record] = instance.fetch_materializations(AssetRecordsFilter(asset_key=AssetKey("models_3d")), limit=1).records
    meta = {k: v.value for k, v in record.asset_materialization.metadata.items()}
    assert meta["backend"] == "box"
    assert meta["generator"] == {"backend": "box", "package": "hy3d-box-backend", "edge": 1.0}


def test_generators_command_lists_what_is_installed(box_package, tmp_path):
    """`hy3d-pipeline generators` in a fresh interpreter: the outside backend, the built-ins, and why hunyuan3d
    cannot be used without its weights."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(box_package), str(ROOT)]), "HY3D_GENERATOR": "box",
           "HY3DGEN_MODELS": str(tmp_path / "no-weights")}
    done = subprocess.run([sys.executable, "-m", "hy3d_pipeline.cli", "generators"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["*", "box", "available"]
    assert "from hy3d-box-backend: hy3d_box_backend:build" in lines[1]
    assert lines[2].split() == ["extrude", "available"]
    hunyuan = next(line for line in lines if line.split()[0] == "hunyuan3d")
    assert "unavailable" in hunyuan and str(tmp_path / "no-weights") in hunyuan
    env["HY3D_GENERATOR"] = "hunyuan3d"  # selected but unusable: exit 1
    assert subprocess.run([sys.executable, "-m", "hy3d_pipeline.cli", "generators"], env=env, capture_output=True,
                          timeout=120).returncode == 1


def test_a_backend_that_cannot_be_imported_is_listed_unavailable(tmp_path, monkeypatch):
    root = install_package(tmp_path / "site", "hy3d-broken-backend",
                           {"hy3d_broken_backend": "import hy3d_no_such_library  # its dependency is not installed\n"},
                           {"broken": "hy3d_broken_backend:build"})
    monkeypatch.syspath_prepend(str(root))
    rows = {r["name"]: r for r in registry.listing(GenerationSettings(generator="extrude"))}
    assert rows["broken"]["status"] == "unavailable: ModuleNotFoundError: No module named 'hy3d_no_such_library'"
    assert rows["extrude"]["status"] == "available"  # the others are listed all the same
    with pytest.raises(GenerationError, match=r"generator 'broken' \(hy3d_broken_backend:build, from "
                                              r"hy3d-broken-backend\) cannot be imported: ModuleNotFoundError"):
        load_generator(GenerationSettings(generator="broken"))


def test_unknown_generator_names_what_is_installed():
    with pytest.raises(GenerationError) as err:
        load_generator(GenerationSettings(generator="nope"))
    message = str(err.value)
    assert "unknown generator 'nope' (HY3D_GENERATOR); installed: extrude, hunyuan3d" in message
    assert "hy3d_pipeline.generators" in message and "hy3d-pipeline generators" in message


def test_one_name_from_two_packages_is_refused(tmp_path, monkeypatch):
    from hy3d_pipeline.models.generators import base

    monkeypatch.setattr(base, "_cache", {})
    root = install_package(tmp_path / "site", "hy3d-other", {"hy3d_other": BOX_BACKEND},
                           {"extrude": "hy3d_other:build"})
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(GenerationError, match="'extrude' is declared by more than one package: hy3d-pipeline "
                                              r"\(hy3d_pipeline.models.generators.extrude:build\); hy3d-other"):
        load_generator(GenerationSettings(generator="extrude"))
    [row] = [r for r in registry.listing(GenerationSettings()) if r["name"] == "extrude"]
    assert row["status"].startswith("unavailable: generator 'extrude' is declared by more than one package")


def test_import_loads_no_backend():
    """`import hy3d_pipeline` and its definitions import no backend module, torch or hy3dgen."""
    code = ("import sys, hy3d_pipeline; hy3d_pipeline.defs.resolve_asset_graph(); print(json.dumps(sorted(m for m in "
            "sys.modules if m.startswith(('torch', 'hy3dgen', 'hy3d_pipeline.models.generators.')))))")
    done = subprocess.run([sys.executable, "-c", "import json; " + code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, check=True, timeout=120)
    # the registry is read (the location checks HY3D_GENERATOR names an installed backend); no backend is imported
    assert json.loads(done.stdout) == ["hy3d_pipeline.models.generators.base",
                                       "hy3d_pipeline.models.generators.registry"]
