"""Seconds per shape and peak GPU memory at the published Hunyuan3D-2 / Hunyuan3D-2mini sizes, random weights.

    python3 bench/gpu_shapes.py            # on a GPU machine: one command, budgeted to end within ~8 minutes
    python3 bench/gpu_shapes.py --smoke    # CPU check: tiny model, octree 64 and 128, 2 steps (seconds)
    python3 bench/gpu_shapes.py --models 2mini --octree 380 --flashvdm on --steps 5,30,50 --repeats 5

The published weights cannot be downloaded on the bench machine, and the time per shape depends on the sizes,
not on the trained values. So this writes checkpoints with the published sizes and random weights into a temp
`HY3DGEN_MODELS`, in hy3dgen's on-disk layout (config.yaml + model.fp16.safetensors), and loads them through the
real `Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`, fp16 on CUDA. Each configuration is called once as a
warm-up, then `--repeats` times with the same arguments the product's hunyuan3d backend passes (guidance 5.0,
num_chunks 8000, output_type trimesh, a seeded generator); the median is reported. Every call is timed whole
(CUDA synchronised), and split into volume decoding, surface extraction (marching cubes) and the rest
(conditioning + diffusion + VAE transformer), so other step counts can be read off: the rest grows linearly with
steps. Peak memory is `torch.cuda.max_memory_allocated` over the configuration (weights included).

Default matrix, per model (Hunyuan3D-2 then Hunyuan3D-2mini) and octree resolution (256, 380):
FlashVDM off at 50 steps (hy3dgen's default `num_inference_steps`, the published non-turbo setting) and FlashVDM
on at 5 steps (turbo-like). `--steps 5,50` crosses the step counts with everything instead. A time budget
(`--budget`, 390 s after start) cuts repeats, then whole configurations (a configuration already started still
gets its warm-up and one timed call), so the default run stays within about 8 minutes whatever the GPU; anything
cut is printed. Expected on one H100 (an estimate, not a measurement): 2-3 minutes writing and loading the two
random checkpoints, 2-4 minutes of timed calls.

Anchors (published, approximate): about 1 s per shape with FlashVDM (turbo model, consumer GPU) and 17 s for
image-to-shape without it on an A100. The last column is s/shape divided by the anchor for the row's FlashVDM
setting. They are different machines and trained weights: read the column as an order of magnitude.

Reconstructed configs (from hy3dgen 2.0.2's source and the published model cards; assumptions marked *):
- Hunyuan3D-2 (`hunyuan3d-dit-v2-0`): DiT `Hunyuan3DDiT` in_channels 64, context_in_dim 1536, hidden_size 1024,
  mlp_ratio 4, num_heads 16, depth 16, depth_single_blocks 32, axes_dim [64], theta 10000, qkv_bias true,
  guidance_embed false (about 1.1 B parameters, the published size). VAE `ShapeVAE` num_latents 3072,
  embed_dim 64, num_freqs 8, include_pi false, heads 16, width 1024, num_decoder_layers 16, qkv_bias false,
  qk_norm true. Image processor size 512, border 0.15. Scheduler FlowMatchEulerDiscrete, 1000 train steps.
- Image encoder: DINOv2 built from an inline config, image_size 518, patch 14 (37 x 37 patches + cls token).
  The DiT's context_in_dim 1536 is DINOv2-giant's width, so the encoder is DINOv2-giant (hidden 1536, 40 layers,
  24 heads, SwiGLU FFN, layerscale 1.0), not DINOv2-large (1024 wide): a 1024-wide encoder could not feed a
  1536-wide `cond_in`. (*) giant is inferred from context_in_dim.
- Hunyuan3D-2mini (`hunyuan3d-dit-v2-mini`): the same DiT width (1024, 16 heads, context 1536) with depth 8 and
  depth_single_blocks 16 (about 0.6 B parameters, the published size); VAE as above but num_latents 512
  (hy3dgen's FlashVDM code special-cases 3072 and 512 latents, which supports this); same DINOv2-giant
  encoder and image processor. (*) num_latents 512 and the shared encoder are assumptions.
- VAE scale_factor is 1.0 here (the published values are near 1; timing does not depend on it).
- (*) The turbo models are guidance-distilled (guidance_embed: true, no classifier-free-guidance batch of 2);
  the FlashVDM rows here keep CFG, so their diffusion part is an upper bound for a turbo model.
- With `--surface blob` (default) the VAE's geometry decoder is hand-set, as in the tests' tiny model, to a
  smooth closed blob, so every call has a real surface to refine and extract (random weights give no surface, or
  noise, which makes FlashVDM's adaptive refinement and marching cubes unrepresentative). That needs
  geo_decoder_ln_post false, which also switches off the decoder's q/k norm: three per-query LayerNorms
  (ln_post, q and k heads) fewer than the published decoder, a small fraction of its cost. `--surface random`
  keeps the published structure exactly, with plain random weights (calls may yield [None]; they are timed
  anyway and counted).

The model folders are named `random/Hunyuan3D-2-random` and `random/Hunyuan3D-2mini-random`, whose last path
component is not one that hy3dgen's `enable_flashvdm` maps to a turbo VAE, and `replace_vae=False` is passed too:
nothing is ever downloaded. Marching cubes is hy3dgen's `mc` (skimage, on the CPU), as the product uses;
`--mc-algo dmc` needs the `diso` package.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # hy3d_pipeline_tests is not an installed package; run from a checkout
    sys.path.insert(0, str(ROOT))

ANCHOR_FLASHVDM_S = 1.0  # published: ~1 s per shape with FlashVDM (turbo, consumer GPU)
ANCHOR_PLAIN_S = 17.0  # published: ~17 s image-to-shape without FlashVDM, A100
GIB = 1024 ** 3

MODELS = {
    # name: (model_path, subfolder, DiT depth, DiT single blocks, VAE num_latents)
    "2.0": ("random/Hunyuan3D-2-random", "hunyuan3d-dit-v2-0", 16, 32, 3072),
    "2mini": ("random/Hunyuan3D-2mini-random", "hunyuan3d-dit-v2-mini", 8, 16, 512),
}
SMOKE_MODEL = ("random/Hunyuan3D-tiny-smoke", "hunyuan3d-dit-v2-0")


def published_config(depth: int, single_blocks: int, num_latents: int, *, blob: bool) -> dict:
    """config.yaml content with the published structure and sizes (see the module docstring)."""
    vae = {
        "num_latents": num_latents,
        "embed_dim": 64,
        "num_freqs": 8,
        "include_pi": False,
        "heads": 16,
        "width": 1024,
        "num_decoder_layers": 16,
        "qkv_bias": False,
        "qk_norm": True,
        "scale_factor": 1.0,
    }
    if blob:
        vae["geo_decoder_ln_post"] = False
    return {
        "model": {
            "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
            "params": {
                "in_channels": 64,
                "context_in_dim": 1536,
                "hidden_size": 1024,
                "mlp_ratio": 4.0,
                "num_heads": 16,
                "depth": depth,
                "depth_single_blocks": single_blocks,
                "axes_dim": [64],
                "theta": 10000,
                "qkv_bias": True,
                "guidance_embed": False,
            },
        },
        "vae": {"target": "hy3dgen.shapegen.models.ShapeVAE", "params": vae},
        "conditioner": {
            "target": "hy3dgen.shapegen.models.SingleImageEncoder",
            "params": {
                "main_image_encoder": {
                    "type": "DinoImageEncoder",
                    "kwargs": {
                        "config": {  # DINOv2-giant
                            "attention_probs_dropout_prob": 0.0,
                            "drop_path_rate": 0.0,
                            "hidden_act": "gelu",
                            "hidden_dropout_prob": 0.0,
                            "hidden_size": 1536,
                            "image_size": 518,
                            "initializer_range": 0.02,
                            "layer_norm_eps": 1.0e-6,
                            "layerscale_value": 1.0,
                            "mlp_ratio": 4,
                            "model_type": "dinov2",
                            "num_attention_heads": 24,
                            "num_channels": 3,
                            "num_hidden_layers": 40,
                            "patch_size": 14,
                            "qkv_bias": True,
                            "torch_dtype": "float32",
                            "use_swiglu_ffn": True,
                        },
                        "image_size": 518,
                        "use_cls_token": True,
                    },
                }
            },
        },
        "scheduler": {
            "target": "hy3dgen.shapegen.schedulers.FlowMatchEulerDiscreteScheduler",
            "params": {"num_train_timesteps": 1000},
        },
        "image_processor": {
            "target": "hy3dgen.shapegen.preprocessors.ImageProcessorV2",
            "params": {"size": 512, "border_ratio": 0.15},
        },
    }


def blob_shaper():
    """The tests' tiny-model helper that hand-sets a geometry decoder to a closed blob, or None if it is gone."""
    try:
        from hy3d_pipeline_tests.tiny_hunyuan import _shape_geo_decoder
    except ImportError:
        return None
    return _shape_geo_decoder


def write_random_model(root: Path, model_path: str, subfolder: str, config: dict, *, build_device: str,
                       blob: bool) -> dict[str, int]:
    """Write config.yaml + model.fp16.safetensors (random weights); returns parameters per component.

    The DiT and the image encoder are initialised on `build_device` (fast on a GPU); the VAE on the CPU, where
    the tiny model's blob geometry decoder is set."""
    import torch
    import yaml
    from safetensors.torch import save_file
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    torch.manual_seed(1234)
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for prefix in ("model", "conditioner", "vae"):
        device = "cpu" if prefix == "vae" else build_device
        try:
            with torch.device(device):
                module = instantiate_from_config(config[prefix])
        except Exception as exc:  # noqa: BLE001 - initialising on the CPU is slower but always works
            if device == "cpu":
                raise
            print(f"    building {prefix} on {device} failed ({type(exc).__name__}: {exc}); building it on the CPU")
            device = "cpu"
            torch.cuda.empty_cache()
            module = instantiate_from_config(config[prefix])
        if prefix == "vae" and blob:
            blob_shaper()(module, empty_surface=False)
        counts[prefix] = sum(p.numel() for p in module.parameters())
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to("cpu", torch.float16).clone().contiguous()
        del module
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    folder = root / model_path / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_file(tensors, str(folder / "model.fp16.safetensors"))
    return counts


def test_image(size: int):
    """A two-colour disc on a transparent background, like an uploaded product photo after background removal."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    box = (size * 0.15, size * 0.15, size * 0.85, size * 0.85)
    d.pieslice(box, 90, 270, fill=(220, 40, 30, 255))
    d.pieslice(box, 270, 90, fill=(30, 60, 220, 255))
    return img


class Timed:
    """Wraps a callable (hy3dgen's volume decoder / surface extractor) and adds its synchronised time to `acc`."""

    def __init__(self, inner, acc: dict, name: str, sync) -> None:
        self.inner, self.acc, self.name, self.sync = inner, acc, name, sync

    def __call__(self, *args, **kwargs):
        self.sync()
        start = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.sync()
            self.acc[self.name] = self.acc.get(self.name, 0.0) + time.perf_counter() - start


def set_flashvdm(pipeline, enabled: bool, mc_algo: str) -> None:
    from hy3dgen.shapegen.models.autoencoders import SurfaceExtractors
    from hy3dgen.shapegen.models.autoencoders.attention_processors import CrossAttentionProcessor

    if enabled:
        # replace_vae=False: never swap in (download) a turbo VAE; the folder names are not mapped anyway
        pipeline.enable_flashvdm(enabled=True, mc_algo=mc_algo, replace_vae=False)
    else:
        pipeline.vae.enable_flashvdm_decoder(enabled=False)
        pipeline.vae.surface_extractor = SurfaceExtractors[mc_algo]()
        # FlashVDM leaves its processor on the geometry decoder; hy3dgen's set_default_cross_attention_processor
        # assigns the class instead of an instance, so set an instance here
        pipeline.vae.geo_decoder.set_cross_attention_processor(CrossAttentionProcessor())


def run_config(pipeline, image, *, octree: int, steps: int, repeats: int, num_chunks: int, device: str,
               sync, deadline: float, guidance: float) -> dict:
    """Warm-up + repeats of one configuration. Returns per-call timings and outcome counts."""
    import torch

    vae = pipeline.vae
    calls: list[dict] = []
    meshes = 0
    errors: dict[str, int] = {}
    cut = False
    for i in range(repeats + 1):
        # at least one timed call; then stop when the next one would end past the budget
        if i >= 2 and time.perf_counter() + statistics.median(c["total"] for c in calls) > deadline:
            cut = True
            break
        acc: dict[str, float] = {}
        volume, surface = vae.volume_decoder, vae.surface_extractor
        vae.volume_decoder = Timed(volume, acc, "volume", sync)
        vae.surface_extractor = Timed(surface, acc, "surface", sync)
        generator = torch.Generator(device=device).manual_seed(1234 + i)
        err = io.StringIO()
        sync()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):  # hy3dgen prints a traceback for every empty surface
                out = pipeline(image=image, num_inference_steps=steps, octree_resolution=octree,
                               guidance_scale=guidance, num_chunks=num_chunks, generator=generator,
                               output_type="trimesh", enable_pbar=False)
            ok = bool(out) and out[0] is not None and len(out[0].faces) > 0
        except Exception as exc:  # noqa: BLE001 - random weights may break a decoder; timed and counted
            ok = False
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            if "out of memory" in str(exc).lower():
                torch.cuda.empty_cache()
        sync()
        total = time.perf_counter() - start
        vae.volume_decoder, vae.surface_extractor = volume, surface
        if i == 0:
            warm = total
            continue  # warm-up: not counted
        meshes += ok
        calls.append({"total": total, **acc})
    return {"calls": calls, "meshes": meshes, "errors": errors, "warmup": warm, "cut": cut}


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: tiny model, octree 64 and 128 (FlashVDM refines), 2 steps, 2 repeats")
    parser.add_argument("--models", default="2.0,2mini", help="comma list of: 2.0, 2mini")
    parser.add_argument("--octree", default="256,380", help="comma list of octree resolutions")
    parser.add_argument("--flashvdm", default="off,on", help="comma list of: off, on")
    parser.add_argument("--steps", default="auto",
                        help="comma list of step counts crossed with everything; auto: 50 without FlashVDM "
                        "(hy3dgen's default), 5 with it (turbo-like)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration after one warm-up")
    parser.add_argument("--num-chunks", type=int, default=8000, help="HY3D_NUM_CHUNKS (the product's default)")
    parser.add_argument("--guidance", type=float, default=5.0, help="HY3D_GUIDANCE_SCALE (the product's default)")
    parser.add_argument("--mc-algo", default="mc", choices=("mc", "dmc"))
    parser.add_argument("--surface", default="blob", choices=("blob", "random"))
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    parser.add_argument("--budget", type=float, default=390.0,
                        help="seconds after start beyond which repeats, then configurations, are cut")
    parser.add_argument("--keep", default=None, help="write the random models here and keep them (default: temp)")
    args = parser.parse_args()

    started = time.perf_counter()
    deadline = started + args.budget

    import torch

    from importlib.metadata import version

    from hy3dgen.shapegen import Hunyuan3DDiTFlowMatchingPipeline

    logging.getLogger("hy3dgen.shapgen").setLevel(logging.WARNING)  # after the import that sets it to INFO

    device = args.device or ("cpu" if args.smoke else "cuda")
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for the CPU check, or on a GPU machine")
    dtype = torch.float16 if cuda else torch.float32  # as the product: fp16 on CUDA, fp32 on the CPU

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    if args.smoke:  # a CPU-sized check of the same code path
        octrees, repeats, model_names = [64, 128], min(args.repeats, 2), ["tiny"]  # 128: FlashVDM refines
        steps_list = [2] if args.steps == "auto" else [int(x) for x in args.steps.split(",")]
    else:
        octrees = [int(x) for x in args.octree.split(",")]
        steps_list = None if args.steps == "auto" else [int(x) for x in args.steps.split(",")]
        repeats, model_names = args.repeats, [m.strip() for m in args.models.split(",")]
        unknown = [m for m in model_names if m not in MODELS]
        if unknown:
            sys.exit(f"unknown model(s) {unknown}; use {', '.join(MODELS)}")
    flash_list = [{"off": False, "on": True}[x.strip()] for x in args.flashvdm.split(",")]

    blob = args.surface == "blob"
    if blob and not args.smoke and blob_shaper() is None:
        print("hy3d_pipeline_tests.tiny_hunyuan._shape_geo_decoder is not importable: using --surface random")
        blob, args.surface = False, "random"
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device {device} ({gpu}), dtype {str(dtype).replace('torch.', '')}, torch {torch.__version__}, "
          f"hy3dgen {version('hy3dgen')}, surface {args.surface}, mc {args.mc_algo}, "
          f"num_chunks {args.num_chunks}, {repeats} timed call(s) + 1 warm-up per configuration")

    image = test_image(512)
    rows: list[dict] = []
    skipped: list[str] = []
    root_ctx = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="hy3d-gpu-")
    with root_ctx as root_name:
        root = Path(root_name)
        os.environ["HY3DGEN_MODELS"] = str(root)
        for name in model_names:
            if time.perf_counter() > deadline:
                skipped.append(f"model {name}: budget spent before it was written")
                continue
            t = time.perf_counter()
            if name == "tiny":
                from hy3d_pipeline_tests.tiny_hunyuan import build_tiny_model, count_parameters

                model_path, subfolder = SMOKE_MODEL
                build_tiny_model(root, model_path, subfolder)
                desc = f"{count_parameters(root, model_path, subfolder):,} parameters (the tests' tiny model)"
            else:
                model_path, subfolder, depth, single, latents = MODELS[name]
                config = published_config(depth, single, latents, blob=blob)
                counts = write_random_model(root, model_path, subfolder, config, build_device=device,
                                            blob=blob)
                parts = (("DiT", counts["model"]), ("VAE", counts["vae"]), ("image encoder", counts["conditioner"]))
                desc = ", ".join(f"{k} {v / 1e9:.2f} B parameters" for k, v in parts)
            written = time.perf_counter() - t
            t = time.perf_counter()
            pipeline = Hunyuan3DDiTFlowMatchingPipeline.from_pretrained(
                model_path, subfolder=subfolder, device=device, dtype=dtype, use_safetensors=True, variant="fp16")
            sync()
            loaded = time.perf_counter() - t
            weights = torch.cuda.memory_allocated() / GIB if cuda else float("nan")
            print(f"model {name}: {desc}; random checkpoint written in {written:.1f} s, from_pretrained "
                  f"{loaded:.1f} s" + (f", {weights:.2f} GiB on the GPU" if cuda else ""))
            if not args.keep:
                shutil.rmtree(root / model_path, ignore_errors=True)  # loaded; free the disk

            for flash in flash_list:
                set_flashvdm(pipeline, flash, args.mc_algo)
                for octree in octrees:
                    for steps in steps_list or [5 if flash else 50]:
                        label = f"{name} octree {octree} flashvdm {'on' if flash else 'off'} steps {steps}"
                        if time.perf_counter() > deadline:
                            skipped.append(label)
                            continue
                        if cuda:
                            torch.cuda.reset_peak_memory_stats()
                        res = run_config(pipeline, image, octree=octree, steps=steps, repeats=repeats,
                                         num_chunks=args.num_chunks, device=device, sync=sync, deadline=deadline,
                                         guidance=args.guidance)
                        peak = torch.cuda.max_memory_allocated() / GIB if cuda else float("nan")
                        calls = res["calls"]
                        for c in calls:
                            c["rest"] = c["total"] - c.get("volume", 0.0) - c.get("surface", 0.0)
                        med = {k: statistics.median(c.get(k, 0.0) for c in calls)
                               for k in ("total", "rest", "volume", "surface")}
                        row = {"model": name, "octree": octree, "flash": flash, "steps": steps, "n": len(calls),
                               "peak": peak, "meshes": res["meshes"], "errors": res["errors"], "cut": res["cut"],
                               "warmup": res["warmup"], **med}
                        rows.append(row)
                        errs = ", ".join(f"{v} {k}" for k, v in res["errors"].items())
                        print(f"  {label}: {med['total']:.3f} s/shape (median of {len(calls)}; warm-up "
                              f"{res['warmup']:.2f} s), volume {med['volume']:.3f} s, surface {med['surface']:.3f} s"
                              + (f", peak {peak:.2f} GiB" if cuda else "") + f", meshes {res['meshes']}/{len(calls)}"
                              + (f", errors: {errs}" if errs else "")
                              + (" [repeats cut by --budget]" if res["cut"] else ""))
            del pipeline
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()

    print()
    head = (f"{'model':<6} {'octree':>6} {'flashvdm':>8} {'steps':>5} {'s/shape':>8} {'rest':>7} {'volume':>7} "
            f"{'surface':>7} {'peak GiB':>8} {'meshes':>6}  x anchor")
    print(head)
    print("-" * len(head))
    for r in rows:
        anchor = ANCHOR_FLASHVDM_S if r["flash"] else ANCHOR_PLAIN_S
        rest = r["rest"]
        peak = f"{r['peak']:.2f}" if r["peak"] == r["peak"] else "-"
        print(f"{r['model']:<6} {r['octree']:>6} {'on' if r['flash'] else 'off':>8} {r['steps']:>5} "
              f"{r['total']:>8.3f} {rest:>7.3f} {r['volume']:>7.3f} {r['surface']:>7.3f} {peak:>8} "
              f"{r['meshes']:>2}/{r['n']:<3}  {r['total'] / anchor:.2f} x {anchor:g} s"
              + (" (repeats cut)" if r["cut"] else ""))
    print("rest = conditioning + diffusion + VAE transformer (scales with steps); volume = volume decoding; "
          "surface = marching cubes")
    print(f"anchors: FlashVDM rows vs ~{ANCHOR_FLASHVDM_S:g} s/shape (published, turbo + FlashVDM, consumer GPU); "
          f"others vs ~{ANCHOR_PLAIN_S:g} s (published, A100, no FlashVDM)")
    for s in skipped:
        print(f"cut by --budget ({args.budget:g} s): {s}")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
