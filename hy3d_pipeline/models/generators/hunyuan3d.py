"""The Hunyuan3D-2 backend: image -> mesh with Tencent's `hy3dgen` shape pipeline, loaded only from local files.

Loading goes through hy3dgen's own `Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`, so the on-disk layout is
hy3dgen's: `$HY3DGEN_MODELS/<model_path>/<subfolder>/config.yaml` + `model.fp16.safetensors` (default root
`~/.cache/hy3dgen`). hy3dgen quietly calls `huggingface_hub.snapshot_download` when that folder is missing; a
pipeline worker must never do that (no network, and a multi-gigabyte surprise download per worker), so every
file hy3dgen would look for is checked here first and a missing one is a GenerationError that names the path
and says to run `hy3d-pipeline fetch-weights` or set HY3DGEN_MODELS. Nothing ever falls back to another
backend or to downloading.

Importing hy3dgen's shape pipeline costs seconds (torch, diffusers, transformers, pymeshlab), so it happens in
`build`, never when this module is imported.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hy3d_pipeline.models.generators.base import (
    GenerationError,
    GenerationSettings,
    Generator,
    PreparedImage,
)
from hy3d_pipeline.settings import current

if TYPE_CHECKING:
    import trimesh

log = logging.getLogger(__name__)

FETCH_HINT = "run `hy3d-pipeline fetch-weights` or set HY3DGEN_MODELS to the folder that holds the weights"
# for a machine that has no weights at all: the way to see the pipeline work without them
CPU_HINT = "; or, to try the pipeline on CPU without weights, set HY3D_GENERATOR=extrude (the image's outline extruded)"

# (file name, use_safetensors, variant) in the order they are tried; hy3dgen builds the name as
# f"model{.variant}.{safetensors|ckpt}" from exactly these two arguments
WEIGHT_CANDIDATES: tuple[tuple[str, bool, str | None], ...] = (
    ("model.fp16.safetensors", True, "fp16"),
    ("model.safetensors", True, None),
    ("model.fp16.ckpt", False, "fp16"),
    ("model.ckpt", False, None),
)
CONFIG_SECTIONS = ("model", "vae", "conditioner", "scheduler", "image_processor")

# hy3dgen 2.0.2's enable_flashvdm swaps in a distilled "turbo" VAE for these model names (last path component),
# loading it with ShapeVAE.from_pretrained, which downloads when it is missing locally
TURBO_VAES = {
    "Hunyuan3D-2": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
    "Hunyuan3D-2mv": ("tencent/Hunyuan3D-2", "hunyuan3d-vae-v2-0-turbo"),
    "Hunyuan3D-2mini": ("tencent/Hunyuan3D-2mini", "hunyuan3d-vae-v2-mini-turbo"),
}
PAINT_SUBFOLDERS = ("hunyuan3d-delight-v2-0", "hunyuan3d-paint-v2-0")

# below this the mesh is too coarse to be worth delivering; an OOM retry never goes lower
MIN_RETRY_OCTREE_RESOLUTION = 128


# what `build` and generation import, all from the [hunyuan] extra
_NEEDS = ("torch", "hy3dgen", "pymeshlab", "yaml")


def missing(settings: GenerationSettings) -> list[str]:
    """What `build(settings)` would miss, found without importing anything heavy (the registry's listing):
    packages of the [hunyuan] extra, and the weights of these settings."""
    from importlib.util import find_spec

    gone = [name for name in _NEEDS if find_spec(name) is None]
    problems = [f"{', '.join(gone)} (pip install 'hy3d-pipeline[hunyuan]')"] if gone else []
    try:
        check_local_model(settings.model_path, settings.model_subfolder)
    except GenerationError as exc:
        problems.append(str(exc))
    return problems


def models_root() -> str:
    return current().models_root


def local_model_dir(model_path: str, subfolder: str) -> Path:
    """The folder hy3dgen's `smart_load_model` reads, built the same way (join, then expanduser)."""
    return Path(os.path.expanduser(os.path.join(models_root(), model_path, subfolder)))


def find_weights(folder: Path) -> tuple[Path, bool, str | None] | None:
    """The checkpoint hy3dgen would load from `folder`, with the from_pretrained arguments that select it."""
    for name, use_safetensors, variant in WEIGHT_CANDIDATES:
        path = folder / name
        if path.is_file():
            return path, use_safetensors, variant
    return None


def weights_present(model_path: str, subfolder: str) -> bool:
    """Whether `subfolder` is complete locally, as the loader will judge it: shape models are config.yaml +
    a checkpoint; the paint and delight models are diffusers pipelines (model_index.json). `fetch-weights` asks
    this too, so the two never disagree (they did: paint weights were downloaded again on every call)."""
    folder = local_model_dir(model_path, subfolder)
    if subfolder in PAINT_SUBFOLDERS:
        return (folder / "model_index.json").is_file()
    return (folder / "config.yaml").is_file() and find_weights(folder) is not None


def check_local_model(model_path: str, subfolder: str, what: str = "Hunyuan3D model") -> tuple[Path, Path, bool, str | None]:
    """(folder, weights, use_safetensors, variant), or GenerationError naming the exact folder tried."""
    folder = local_model_dir(model_path, subfolder)
    if not folder.is_dir():
        raise GenerationError(
            f"{what} {model_path}/{subfolder} is not available locally: {folder} does not exist; {FETCH_HINT}"
            f"{CPU_HINT}"
        )
    if not (folder / "config.yaml").is_file():
        raise GenerationError(f"{what} folder {folder} has no config.yaml; {FETCH_HINT}")
    found = find_weights(folder)
    if found is None:
        names = ", ".join(name for name, _, _ in WEIGHT_CANDIDATES)
        raise GenerationError(f"{what} folder {folder} has no weights (looked for {names}); {FETCH_HINT}{CPU_HINT}")
    return (folder, *found)


def _read_config(config_path: Path) -> dict:
    """Parse config.yaml before hy3dgen does, so a broken file is reported by path, and refuse configs whose
    image encoder would be fetched from the Hugging Face Hub by name instead of built from a `config:` dict."""
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise GenerationError(f"Hunyuan3D config {config_path} is unreadable ({exc}); {FETCH_HINT}") from exc
    missing = [
        s for s in CONFIG_SECTIONS if not (isinstance(config, dict) and isinstance(config.get(s), dict) and "target" in config[s])
    ]
    if missing:
        raise GenerationError(
            f"Hunyuan3D config {config_path} lacks a `target:` for {', '.join(missing)}; "
            f"it is not a hy3dgen config; {FETCH_HINT}"
        )
    encoders = (config["conditioner"].get("params") or {}).values()
    for encoder in encoders:
        kwargs = encoder.get("kwargs", {}) if isinstance(encoder, dict) else {}
        version = kwargs.get("version")
        if kwargs.get("config") is None and version and not os.path.isdir(os.path.expanduser(str(version))):
            raise GenerationError(
                f"Hunyuan3D config {config_path} builds its image encoder from {version!r}, which is neither a "
                f"local folder nor an inline `config:`; loading it would download from the Hugging Face Hub"
            )
    return config


def resolve_device(requested: str) -> str:
    import torch

    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise GenerationError(f"device {requested!r} was requested (HY3D_DEVICE) but CUDA is not available here")
    return requested


def paint_missing(model_path: str) -> list[str]:
    """What Hunyuan3D-Paint needs and this machine lacks (empty list: paint can run)."""
    import importlib.util

    import torch

    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False; Hunyuan3D-Paint runs on GPU only)")
    try:
        importlib.import_module("custom_rasterizer")
    except Exception as exc:  # a compiled extension can fail with more than ImportError
        missing.append(
            f"the compiled `custom_rasterizer` extension ({type(exc).__name__}: {exc}); build it from "
            "Hunyuan3D-2's hy3dgen/texgen/custom_rasterizer"
        )
    if importlib.util.find_spec("xatlas") is None:
        missing.append("the `xatlas` package (UV unwrapping)")
    absent = [str(local_model_dir(model_path, sub)) for sub in PAINT_SUBFOLDERS if not weights_present(model_path, sub)]
    if absent:
        missing.append(f"the paint weights {' and '.join(absent)} ({FETCH_HINT})")
    return missing


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # older kernels and some extensions still raise a plain RuntimeError for the same condition
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def retry_octree_resolution(resolution: int) -> int | None:
    """The resolution of the single OOM retry: half, never under MIN_RETRY_OCTREE_RESOLUTION; None if that
    would not be lower than what just failed."""
    lower = max(resolution // 2, MIN_RETRY_OCTREE_RESOLUTION)
    return lower if lower < resolution else None


def conditioning_image(image: PreparedImage):
    """The RGBA image handed to hy3dgen: its preprocessor recentres on the alpha channel, so alpha must be zero
    wherever the prepared mask says background (a uniform-background cut-out may still be fully opaque)."""
    import numpy as np
    from PIL import Image

    rgba = np.array(image.rgba.convert("RGBA"))
    mask = np.asarray(image.mask, dtype=bool)
    if mask.shape != rgba.shape[:2]:
        raise GenerationError(
            f"{image.name}: foreground mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
            f"{rgba.shape[1]}x{rgba.shape[0]}"
        )
    if not mask.any():
        raise GenerationError(f"{image.name}: the image has no foreground to turn into a 3D model")
    rgba[..., 3] = np.where(mask, rgba[..., 3], 0)
    return Image.fromarray(rgba, mode="RGBA")


def project_vertex_colors(mesh: "trimesh.Trimesh", image: PreparedImage) -> "trimesh.Trimesh":
    """Colour the vertices facing the camera with the input image; the rest get the mean foreground colour.

    hy3dgen's preprocessor scales the foreground's bounding box uniformly into the conditioning square, and the
    model reproduces that silhouette in the mesh's XY plane (camera on +Z, +Y up, +X to the image's right).
    Mapping the mesh's XY bounds onto the mask's bounding box inverts that normalisation without knowing the
    border ratio, and keeps samples on the foreground even when the mesh's aspect drifts from the image's.
    """
    import numpy as np
    import trimesh

    rgb = np.asarray(image.rgba.convert("RGB"))
    mask = np.asarray(image.mask, dtype=bool)
    if not mask.any():
        raise GenerationError(f"{image.name}: projected texture needs a foreground, the mask is empty")
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
    mean = rgb[mask].reshape(-1, 3).mean(axis=0)

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    lo, hi = vertices[:, :2].min(axis=0), vertices[:, :2].max(axis=0)
    span = np.where(hi - lo > 1e-9, hi - lo, 1.0)
    u = (vertices[:, 0] - lo[0]) / span[0]
    v = (vertices[:, 1] - lo[1]) / span[1]
    col = np.clip(np.rint(c0 + u * (c1 - c0)), 0, rgb.shape[1] - 1).astype(np.intp)
    row = np.clip(np.rint(r1 - v * (r1 - r0)), 0, rgb.shape[0] - 1).astype(np.intp)  # image rows grow downwards

    front = np.asarray(mesh.vertex_normals)[:, 2] > 0
    use_image = front & mask[row, col]  # concave silhouettes: a sample off the foreground would be background
    colors = np.empty((len(vertices), 4), dtype=np.uint8)
    colors[:, :3] = np.rint(mean).astype(np.uint8)
    colors[:, 3] = 255
    colors[use_image, :3] = rgb[row[use_image], col[use_image]]

    out = mesh.copy()
    out.visual = trimesh.visual.ColorVisuals(out, vertex_colors=colors)
    return out


def _to_meshset(mesh: "trimesh.Trimesh"):
    import numpy as np
    import pymeshlab

    ms = pymeshlab.MeshSet()
    ms.add_mesh(
        pymeshlab.Mesh(
            vertex_matrix=np.asarray(mesh.vertices, dtype=np.float64),
            face_matrix=np.asarray(mesh.faces, dtype=np.int32),
        ),
        "hunyuan3d",
    )
    return ms


def _from_meshset(ms) -> "trimesh.Trimesh":
    import trimesh

    current = ms.current_mesh()
    return trimesh.Trimesh(vertices=current.vertex_matrix(), faces=current.face_matrix())


def postprocess(mesh: "trimesh.Trimesh", *, max_faces: int, name: str) -> "trimesh.Trimesh":
    """hy3dgen's clean-up chain (floaters, degenerate faces, face budget), kept in memory.

    The chain runs on a pymeshlab MeshSet because hy3dgen's post-processors, given a trimesh, round-trip it
    through `NamedTemporaryFile(delete=False)` PLY files that are never deleted (one leaked file per step per
    image on a long-lived worker). For the same reason hy3dgen's DegenerateFaceRemover, which is nothing but
    such a save/reload, is replaced by the equivalent in-memory pymeshlab filters.
    """
    try:
        from hy3dgen.shapegen.postprocessors import FaceReducer, FloaterRemover
    except ImportError as exc:
        raise GenerationError(
            f"{name}: Hunyuan3D mesh post-processing needs pymeshlab ({exc}); install it with `pip install pymeshlab`"
        ) from exc
    try:
        ms = _to_meshset(mesh)
        ms = FloaterRemover()(ms)
        ms.apply_filter("meshing_remove_duplicate_vertices")
        ms.apply_filter("meshing_remove_null_faces")
        ms.apply_filter("meshing_remove_duplicate_faces")
        ms.apply_filter("meshing_remove_unreferenced_vertices")
        ms = FaceReducer()(ms, max_facenum=max_faces)
        out = _from_meshset(ms)
    except Exception as exc:
        raise GenerationError(f"{name}: Hunyuan3D mesh post-processing failed: {type(exc).__name__}: {exc}") from exc
    if len(out.faces) == 0:
        raise GenerationError(f"{name}: Hunyuan3D mesh post-processing removed every face")
    return out


class Hunyuan3DGenerator(Generator):
    """A loaded hy3dgen shape pipeline. One per process (see `load_generator`); `generate` is serialised
    because the pipeline's scheduler keeps per-call state."""

    name = "hunyuan3d"
    honours = None  # every setting: weights, sampling, resolution, seed, face budget, texture mode

    def __init__(
        self,
        settings: GenerationSettings,
        pipeline: Any,
        *,
        device: str,
        dtype: Any,
        folder: Path,
        weights: Path,
        load_seconds: float,
    ) -> None:
        super().__init__(settings)
        self.pipeline = pipeline
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.weights = weights
        self.load_seconds = load_seconds
        self._lock = threading.Lock()
        self._paint = None

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_path": self.settings.model_path,
            "model_subfolder": self.settings.model_subfolder,
            "weights": str(self.weights),
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "flashvdm": self.settings.flashvdm,
            "load_seconds": round(self.load_seconds, 3),
        }

    def generate(self, image: PreparedImage, *, seed: int, texture: str | None = None) -> "trimesh.Trimesh":
        """Mesh for `image`. `texture` overrides settings.texture (by default the mode of the settings that
        `load_generator` last handed this shared instance)."""
        settings = self.settings  # one snapshot: load_generator may swap settings while this call runs
        mode = settings.texture if texture is None else texture
        if mode == "paint":
            # before the shape is generated: a machine that cannot paint should fail in seconds, not minutes
            missing = paint_missing(settings.model_path)
            if missing:
                raise GenerationError(f"{image.name}: texture=paint is not possible here; missing: {'; '.join(missing)}")
        cond = conditioning_image(image)
        with self._lock:
            mesh, resolution = self._shape(settings, cond, image.name, seed)
            mesh = postprocess(mesh, max_faces=settings.max_faces, name=image.name)
            mesh.metadata["octree_resolution"] = resolution
            mesh.metadata["seed"] = seed
            return self.texture_mesh(mesh, image, mode)

    def texture_mesh(self, mesh: "trimesh.Trimesh", image: PreparedImage, mode: str) -> "trimesh.Trimesh":
        if mode == "none":
            return mesh
        if mode == "projected":
            return project_vertex_colors(mesh, image)
        if mode == "paint":
            return self._paint_mesh(mesh, image)
        raise GenerationError(f"{image.name}: unknown texture mode {mode!r}")

    def _call_pipeline(self, settings: GenerationSettings, cond, seed: int, resolution: int):
        import torch

        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.pipeline(
            image=cond,
            num_inference_steps=settings.steps,
            octree_resolution=resolution,
            guidance_scale=settings.guidance_scale,
            num_chunks=settings.num_chunks,
            generator=generator,
            output_type="trimesh",
            enable_pbar=False,
        )

    def _shape(self, settings: GenerationSettings, cond, name: str, seed: int) -> tuple["trimesh.Trimesh", int]:
        import torch

        resolution = settings.octree_resolution
        outputs = None
        oom = False
        try:
            outputs = self._call_pipeline(settings, cond, seed, resolution)
        except Exception as exc:
            if not _is_oom(exc):
                raise GenerationError(f"{name}: Hunyuan3D generation failed: {type(exc).__name__}: {exc}") from exc
            oom = True
        if oom:
            # outside the except block, so the traceback no longer pins the failed call's tensors
            torch.cuda.empty_cache()
            lower = retry_octree_resolution(resolution)
            if lower is None:
                raise GenerationError(
                    f"{name}: CUDA ran out of memory at octree resolution {resolution}, and no lower resolution "
                    f"(minimum {MIN_RETRY_OCTREE_RESOLUTION}) is left to retry with"
                )
            log.warning("%s: CUDA out of memory at octree resolution %d; retrying once at %d", name, resolution, lower)
            try:
                outputs = self._call_pipeline(settings, cond, seed, lower)
            except Exception as exc:
                again = _is_oom(exc)
                err = GenerationError(
                    f"{name}: CUDA ran out of memory at octree resolution {resolution} and again at {lower}"
                    if again
                    else f"{name}: Hunyuan3D generation failed on the retry at octree resolution {lower}: "
                    f"{type(exc).__name__}: {exc}"
                )
            else:
                err = None
                resolution = lower
            if err is not None:
                torch.cuda.empty_cache()
                raise err
        mesh = outputs[0] if outputs else None
        if mesh is None or len(mesh.faces) == 0:
            raise GenerationError(
                f"{name}: marching cubes found no surface in the Hunyuan3D volume (octree resolution {resolution}); "
                "the model did not see an object in this image"
            )
        return mesh, resolution

    def _paint_mesh(self, mesh: "trimesh.Trimesh", image: PreparedImage) -> "trimesh.Trimesh":
        missing = paint_missing(self.settings.model_path)
        if missing:
            raise GenerationError(f"{image.name}: texture=paint is not possible here; missing: {'; '.join(missing)}")
        if self._paint is None:
            try:
                from hy3dgen.texgen import Hunyuan3DPaintPipeline
            except Exception as exc:
                raise GenerationError(
                    f"{image.name}: hy3dgen.texgen (Hunyuan3D-Paint) cannot be imported: {type(exc).__name__}: {exc}"
                ) from exc
            # an existing absolute path makes hy3dgen read it directly instead of consulting the Hub
            local = os.path.expanduser(os.path.join(models_root(), self.settings.model_path))
            try:
                self._paint = Hunyuan3DPaintPipeline.from_pretrained(os.path.abspath(local))
            except Exception as exc:
                raise GenerationError(
                    f"{image.name}: could not load Hunyuan3D-Paint from {local}: {type(exc).__name__}: {exc}"
                ) from exc
        try:
            return self._paint(mesh, image=conditioning_image(image))
        except Exception as exc:
            raise GenerationError(f"{image.name}: Hunyuan3D-Paint failed: {type(exc).__name__}: {exc}") from exc


def build(settings: GenerationSettings) -> Hunyuan3DGenerator:
    started = time.perf_counter()
    # the files first: a machine without weights learns so in milliseconds, before torch is imported
    folder, weights, use_safetensors, variant = check_local_model(settings.model_path, settings.model_subfolder)
    device = resolve_device(settings.device)
    config_path = folder / "config.yaml"
    _read_config(config_path)
    if settings.texture == "paint":
        missing = paint_missing(settings.model_path)
        if missing:
            raise GenerationError(f"texture=paint is not possible here; missing: {'; '.join(missing)}")
    turbo = TURBO_VAES.get(settings.model_path.rstrip("/").split("/")[-1]) if settings.flashvdm else None
    if turbo is not None:
        # hy3dgen loads it with the pipeline's use_safetensors and its own fixed variant "fp16"
        turbo_weights = local_model_dir(*turbo) / f"model.fp16.{'safetensors' if use_safetensors else 'ckpt'}"
        if not (turbo_weights.is_file() and (turbo_weights.parent / "config.yaml").is_file()):
            raise GenerationError(
                f"flashvdm needs the turbo VAE {turbo[0]}/{turbo[1]}, but {turbo_weights} or the config.yaml next "
                f"to it is missing; {FETCH_HINT}"
            )

    try:
        import torch
        from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline
    except ImportError as exc:
        hint = " (install it with `pip install pymeshlab`)" if getattr(exc, "name", "") == "pymeshlab" else ""
        raise GenerationError(f"the hy3dgen shape pipeline cannot be imported: {exc}{hint}") from exc

    dtype = torch.float16 if device.startswith("cuda") else torch.float32  # fp16 kernels are GPU-only
    try:
        pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
            settings.model_path,
            subfolder=settings.model_subfolder,
            device=device,
            dtype=dtype,
            use_safetensors=use_safetensors,
            variant=variant,
        )
    except Exception as exc:
        if _is_oom(exc):
            torch.cuda.empty_cache()
            raise GenerationError(f"not enough GPU memory on {device} to load {weights}: {exc}") from exc
        raise GenerationError(
            f"could not load the Hunyuan3D checkpoint {weights} (config {config_path}): {type(exc).__name__}: "
            f"{exc}. The file is corrupt, incomplete or does not match its config; delete {folder} and "
            "run `hy3d-pipeline fetch-weights` again"
        ) from exc

    if settings.flashvdm:
        try:
            # mc_algo 'mc' (skimage): hy3dgen's other choice, 'dmc', needs the optional `diso` CUDA package
            pipeline.enable_flashvdm(enabled=True, mc_algo="mc", replace_vae=turbo is not None)
            # the turbo VAE is loaded with hy3dgen's fp16 default whatever the pipeline's dtype
            pipeline.vae.to(device=device, dtype=dtype)
        except Exception as exc:
            raise GenerationError(f"could not enable FlashVDM for {settings.model_path}: {type(exc).__name__}: {exc}") from exc

    load_seconds = time.perf_counter() - started
    log.info("loaded Hunyuan3D %s on %s (%s) in %.2fs", weights, device, dtype, load_seconds)
    return Hunyuan3DGenerator(
        settings, pipeline, device=device, dtype=dtype, folder=folder, weights=weights, load_seconds=load_seconds
    )


GENERATOR = Hunyuan3DGenerator
