"""`hy3d-pipeline fetch-weights`: put the configured weights under HY3DGEN_MODELS, for baking into worker images.

What is fetched follows the settings: the Hunyuan3D subfolders the configured model needs (none under
HY3D_GENERATOR=extrude), and rembg's U2-Net file at HY3D_REMBG_MODEL for photos without a plain background.

Workers never download at run time (a fleet of GPU workers hitting the Hub at once is slow and fragile, and
many run offline); this command is the one place that does, ahead of time, into the same layout hy3dgen
reads: `$HY3DGEN_MODELS/<model path>/<subfolder>/{config.yaml, model.fp16.safetensors}`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from hy3d_pipeline.models.generators.base import GenerationSettings


class WeightsError(RuntimeError):
    pass


def _hub_download(repo_id: str, subfolders: list[str], target: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise WeightsError("fetch-weights needs huggingface_hub: pip install 'hy3d-pipeline[hunyuan]'") from exc
    try:
        snapshot_download(repo_id=repo_id, allow_patterns=[f"{s}/*" for s in subfolders], local_dir=str(target))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all end the same way for the user
        raise WeightsError(
            f"could not download {repo_id} ({', '.join(subfolders)}) from the Hugging Face Hub into {target}: "
            f"{type(exc).__name__}: {str(exc)[:300]}. Offline? Copy the folders there by other means "
            f"(e.g. from a machine with access), keeping the layout <HY3DGEN_MODELS>/{repo_id}/<subfolder>/"
        ) from exc


def _url_download(url: str, dest: Path, timeout: float = 60.0) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(f"could not download {url} to {dest}: {type(exc).__name__}: {exc}. Offline? "
                           "Copy the file there by other means, or point HY3D_REMBG_MODEL at a local copy") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch_weights(settings: GenerationSettings, *, rembg: bool = True, out=print) -> list[Path]:
    """Download what `settings` needs that is not already present; returns the folders/files now in place."""
    from hy3d_pipeline.images.foreground import REMBG_MODEL_URL, rembg_model_path
    from hy3d_pipeline.models.generators.hunyuan3d import PAINT_SUBFOLDERS, TURBO_VAES, local_model_dir, weights_present

    wanted = []
    # extrude runs no model: its only file is rembg's, which the message for a photo sends users here for
    if settings.generator != "extrude":
        wanted.append((settings.model_path, settings.model_subfolder))
        turbo = TURBO_VAES.get(settings.model_path.rstrip("/").split("/")[-1])
        if settings.flashvdm and turbo:
            wanted.append(turbo)
        if settings.texture == "paint":
            wanted += [(settings.model_path, sub) for sub in PAINT_SUBFOLDERS]
    done: list[Path] = []
    for repo_id, subfolder in wanted:
        folder = local_model_dir(repo_id, subfolder)
        if weights_present(repo_id, subfolder):
            out(f"already present: {folder}")
        else:
            out(f"downloading {repo_id}/{subfolder} -> {folder}")
            _hub_download(repo_id, [subfolder], folder.parent)
            if not weights_present(repo_id, subfolder):  # the Hub offline can "succeed" with what is on disk
                raise WeightsError(f"{repo_id}/{subfolder} is still incomplete in {folder} after the download; "
                                   "Offline? Copy the folder there by other means")
        done.append(folder)
    if rembg:
        path = rembg_model_path()
        if path.is_file():
            out(f"already present: {path}")
        else:
            out(f"downloading the rembg model -> {path}")
            _url_download(REMBG_MODEL_URL, path)
        done.append(path)
    return done
