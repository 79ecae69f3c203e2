"""The settings model: every variable parsed once, bad values refused with the variable's name and what it
accepts, and the README's table, the resource and the launchpad built from the same definitions."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hy3d_pipeline import settings as config
from hy3d_pipeline.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_when_nothing_is_set():
    s = Settings.from_env({})
    assert (s.batch_size, s.sensor_interval, s.output_format, s.models_prefix) == (8, 15, "glb", "models/")
    assert s.retry_backoff == 15 and s.sqs_visibility() == 60 and s.run_limit == 4


@pytest.mark.parametrize("env, words", [
    ({"HY3D_BATCH_SIZE": "abc"}, ["HY3D_BATCH_SIZE='abc'", "whole number"]),
    ({"HY3D_BATCH_SIZE": "0"}, ["HY3D_BATCH_SIZE='0'", "1 or more"]),
    ({"HY3D_OUTPUT_FORMAT": "fbx"}, ["HY3D_OUTPUT_FORMAT='fbx'", "glb, obj, ply, stl"]),
    ({"HY3D_TEXTURE": "gold"}, ["HY3D_TEXTURE='gold'", "none, projected, paint"]),
    ({"HY3D_FLASHVDM": "perhaps"}, ["HY3D_FLASHVDM='perhaps'", "true or false"]),
    ({"HY3D_DEVICE": "gpu0"}, ["HY3D_DEVICE='gpu0'", "cuda:N"]),
    ({"S3_DOWNLOAD_TIMEOUT": "soon"}, ["S3_DOWNLOAD_TIMEOUT='soon'", "a number"]),
    ({"HY3D_RUN_LAUNCHER": "k8s"}, ["HY3D_RUN_LAUNCHER='k8s'", "workers, default"]),
])
def test_bad_value_names_the_variable_and_what_it_accepts(env, words):
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    for word in words:
        assert word in str(err.value)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(SettingsError) as err:
        Settings.from_env({"HY3D_BATCH_SIZE": "abc", "HY3D_SEED": "x", "HY3D_STEPS": "2"})
    assert "HY3D_BATCH_SIZE" in str(err.value) and "HY3D_SEED" in str(err.value)
    assert "HY3D_STEPS" not in str(err.value)


def test_values_are_parsed_and_fallbacks_apply():
    s = Settings.from_env({"HY3D_BATCH_SIZE": " 12 ", "HY3D_FLASHVDM": "YES", "HY3D_OUTPUT_FORMAT": "OBJ",
                           "AWS_DEFAULT_REGION": "eu-west-1", "HY3D_RETRY_BACKOFF_SECONDS": "0"})
    assert (s.batch_size, s.flashvdm, s.output_format, s.region, s.retry_backoff) == (12, True, "obj", "eu-west-1", 0)
    assert Settings.from_env({"S3_REGION": "ap-south-1", "AWS_REGION": "eu-west-1"}).region == "ap-south-1"


def test_current_parses_again_only_when_a_variable_changes(monkeypatch):
    monkeypatch.setenv("HY3D_BATCH_SIZE", "5")
    first = config.current()
    assert first is config.current() and first.batch_size == 5
    monkeypatch.setenv("HY3D_BATCH_SIZE", "6")
    assert config.current().batch_size == 6


def test_code_location_refuses_a_bad_value_when_it_loads():
    """The whole code location (what `dagster dev` loads: the module's `defs`, built on first access) fails at
    once, naming the variable."""
    env = {**os.environ, "HY3D_BATCH_SIZE": "abc", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import hy3d_pipeline; hy3d_pipeline.defs"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "HY3D_BATCH_SIZE='abc': expected a whole number" in proc.stderr
    env = {**os.environ, "HY3D_GENERATOR": "nope", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", "import hy3d_pipeline; hy3d_pipeline.defs"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "HY3D_GENERATOR='nope'" in proc.stderr and "extrude" in proc.stderr


def test_readme_table_is_the_settings_table():
    """README's configuration table is printed from these definitions (`python3 -m hy3d_pipeline.settings`)."""
    readme = (ROOT / "README.md").read_text()
    assert config.markdown_table() in readme, "README's table is stale: paste `python3 -m hy3d_pipeline.settings`"
    for f in dataclasses.fields(Settings):
        assert f"`{f.metadata['env']}`" in config.markdown_table()


def test_generator_resource_and_launchpad_come_from_the_settings():
    from hy3d_pipeline.models.assets import ModelsRunConfig
    from hy3d_pipeline.models.generators.base import GENERATION_FIELDS, GenerationSettings
    from hy3d_pipeline.models.resources import GeneratorResource

    defaults = Settings()
    resource = GeneratorResource.from_env()
    assert set(GeneratorResource.model_fields) == set(GENERATION_FIELDS)
    assert resource.settings() == GenerationSettings.from_settings(config.current())
    assert GenerationSettings().steps == defaults.steps and GenerationSettings().output_format == defaults.output_format
    schema = ModelsRunConfig.to_config_schema().as_field().config_type
    choices = {name: [v.config_value for v in field.config_type.inner_type.enum_values]
               for name, field in schema.fields.items()}
    assert choices == {"output_format": list(config.OUTPUT_FORMATS), "texture": list(config.TEXTURE_MODES)}


def test_an_empty_models_prefix_is_a_value_and_empty_numbers_are_unset():
    assert Settings.from_env({"S3_MODELS_PREFIX": ""}).models_prefix == ""
    assert Settings.from_env({"HY3D_BATCH_SIZE": "", "HY3D_GENERATOR": ""}).batch_size == 8


def test_optional_numbers_are_numbers():
    s = Settings.from_env({"HY3D_SQS_VISIBILITY_SECONDS": "2", "HY3D_MAX_CONCURRENT_RUNS": "3",
                           "HY3D_RETRY_BACKOFF_SECONDS": "1.5"})
    assert (s.sqs_visibility(), s.run_limit, s.retry_backoff) == (2, 3, 1.5)
    with pytest.raises(SettingsError, match="HY3D_SQS_VISIBILITY_SECONDS='x': expected a whole number"):
        Settings.from_env({"HY3D_SQS_VISIBILITY_SECONDS": "x"})
