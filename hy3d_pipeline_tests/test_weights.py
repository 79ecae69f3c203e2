"""`hy3d-pipeline fetch-weights`: offline it fails clearly and leaves nothing half-written; present weights
are not downloaded again. (The Hub is reached through HF_ENDPOINT pointed at a closed loopback port, which is
what "offline" looks like; no real download can run here.)"""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from hy3d_pipeline.models.generators.base import GenerationSettings
from hy3d_pipeline.models.weights import WeightsError, fetch_weights
from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model


@pytest.fixture
def offline(monkeypatch, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HY3DGEN_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HY3D_REMBG_MODEL", str(tmp_path / "rembg" / "u2net.onnx"))
    return tmp_path


def test_offline_fails_clearly(offline):
    settings = GenerationSettings(model_path="tencent/Hunyuan3D-2mini", model_subfolder="hunyuan3d-dit-v2-mini-turbo")
    with pytest.raises(WeightsError) as err:
        fetch_weights(settings, out=lambda *_: None)
    message = str(err.value)
    assert "tencent/Hunyuan3D-2mini" in message and "hunyuan3d-dit-v2-mini-turbo" in message and "Offline?" in message
    assert not list((offline / "models").rglob("*.safetensors"))


def test_present_weights_are_kept_and_rembg_offline_fails(offline, monkeypatch):
    build_tiny_model(offline / "models", model_path="tiny/Hunyuan3D-tiny", subfolder="hunyuan3d-dit-v2-0")
    settings = GenerationSettings(model_path="tiny/Hunyuan3D-tiny", model_subfolder="hunyuan3d-dit-v2-0")
    said = []
    assert fetch_weights(settings, rembg=False, out=said.append)
    assert said and said[0].startswith("already present")
    monkeypatch.setattr("hy3d_pipeline.images.foreground.REMBG_MODEL_URL", f"{__import__('os').environ['HF_ENDPOINT']}/u2net.onnx")
    with pytest.raises(WeightsError, match="u2net.onnx"):
        fetch_weights(settings, out=said.append)
    assert not (offline / "rembg").exists() or not list((offline / "rembg").iterdir())


def test_cli_exit_code(offline):
    result = subprocess.run([sys.executable, "-m", "hy3d_pipeline.cli", "fetch-weights", "--no-rembg"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "fetch-weights failed" in result.stderr and "Hunyuan3D-2" in result.stderr


def test_present_paint_weights_are_not_fetched_again(offline):
    """Paint and delight are diffusers pipelines (model_index.json, no config.yaml): present ones count as
    present for fetch-weights exactly as for the backend (offline, any download attempt would raise)."""
    from hy3d_pipeline.models.generators.hunyuan3d import PAINT_SUBFOLDERS, local_model_dir, weights_present

    build_tiny_model(offline / "models", model_path="tiny/Hunyuan3D-tiny", subfolder="hunyuan3d-dit-v2-0")
    for sub in PAINT_SUBFOLDERS:
        folder = local_model_dir("tiny/Hunyuan3D-tiny", sub)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
    settings = GenerationSettings(model_path="tiny/Hunyuan3D-tiny", model_subfolder="hunyuan3d-dit-v2-0",
                                  texture="paint")
    said = []
    fetch_weights(settings, rembg=False, out=said.append)
    assert len(said) == 3 and all(line.startswith("already present") for line in said), said
    (local_model_dir("tiny/Hunyuan3D-tiny", PAINT_SUBFOLDERS[0]) / "model_index.json").unlink()
    assert not weights_present("tiny/Hunyuan3D-tiny", PAINT_SUBFOLDERS[0])
    with pytest.raises(WeightsError, match=PAINT_SUBFOLDERS[0]):
        fetch_weights(settings, rembg=False, out=said.append)


def test_extrude_fetches_the_rembg_model_alone(offline, monkeypatch):
    """Under HY3D_GENERATOR=extrude (the rembg message sends CPU users here) no Hunyuan3D weights are fetched."""
    settings = GenerationSettings(generator="extrude", texture="paint")
    said = []
    assert fetch_weights(settings, rembg=False, out=said.append) == [] and said == []
    monkeypatch.setattr("hy3d_pipeline.images.foreground.REMBG_MODEL_URL", f"{__import__('os').environ['HF_ENDPOINT']}/u2net.onnx")
    with pytest.raises(WeightsError, match="u2net.onnx"):
        fetch_weights(settings, out=said.append)
    assert said == [f"downloading the rembg model -> {offline / 'rembg' / 'u2net.onnx'}"]
    assert not (offline / "models").exists()
