"""A tiny Hunyuan3D-2 checkpoint for tests, written in hy3dgen's own on-disk layout.

The real checkpoint is gigabytes and cannot be downloaded here, yet the backend must be tested through
hy3dgen's real `Hunyuan3DDiTFlowMatchingPipeline.from_pretrained`, not a mock. So this module writes
`<root>/<model_path>/<subfolder>/config.yaml` with the same structure as the published
`tencent/Hunyuan3D-2/hunyuan3d-dit-v2-0/config.yaml` (model / vae / conditioner / scheduler / image_processor,
each a `target:` + `params:` entry; DINOv2 built from a `config:` dict) but tiny widths and depths, plus
`model.fp16.safetensors` whose keys carry the `model.` / `vae.` / `conditioner.` prefixes hy3dgen splits on.

Random weights would give a noisy, non-deterministic-looking surface, so the VAE geometry decoder is
hand-set to a smooth closed blob: the occupancy is `cos(x) + cos(y) + cos(z) - c` (read straight off the
Fourier embedding, which includes frequency 1 when `include_pi` is false) plus a small, bounded offset that
depends on the latents. The blob therefore stays closed and inside the marching-cubes box whatever the
diffusion produces, while a different seed still changes the mesh a little.
"""

from __future__ import annotations

import math
from pathlib import Path

# radius of the blob along an axis; the level constant follows from cos(r) + 2 = c
_BLOB_RADIUS = 0.6
# upper bound on the latent-dependent offset added to the occupancy; small next to the level-set margin
# (0.175 at the centre, ~0.56 per unit radius at the surface) so the blob can neither vanish nor grow
# out of the box
_MAX_OFFSET = 0.04
_OCC_SCALE = 8.0

_TINY = {
    "latents": 32,
    "embed_dim": 8,
    "vae_width": 32,
    "heads": 2,
    "num_freqs": 4,
    "dino_width": 32,
    "dit_width": 32,
    "image_size": 28,  # DINOv2 patch 14 -> 2x2 patches + cls token
    "processor_size": 64,
}


def tiny_config(*, empty_surface: bool = False) -> dict:
    """The config.yaml content: the published structure with tiny sizes."""
    t = _TINY
    return {
        "model": {
            "target": "hy3dgen.shapegen.models.Hunyuan3DDiT",
            "params": {
                "in_channels": t["embed_dim"],
                "context_in_dim": t["dino_width"],
                "hidden_size": t["dit_width"],
                "mlp_ratio": 2.0,
                "num_heads": t["heads"],
                "depth": 1,
                "depth_single_blocks": 1,
                "axes_dim": [t["dit_width"] // t["heads"]],
                "theta": 10000,
                "qkv_bias": True,
                "guidance_embed": False,
            },
        },
        "vae": {
            "target": "hy3dgen.shapegen.models.ShapeVAE",
            "params": {
                "num_latents": t["latents"],
                "embed_dim": t["embed_dim"],
                "num_freqs": t["num_freqs"],
                "include_pi": False,
                "heads": t["heads"],
                "width": t["vae_width"],
                "num_decoder_layers": 1,
                "qkv_bias": False,
                "qk_norm": True,
                "scale_factor": 1.0,
                # the published config keeps ln_post; without it the hand-set occupancy stays linear in the
                # Fourier features (LayerNorm would squash it to a sign)
                "geo_decoder_ln_post": False,
                "geo_decoder_mlp_expand_ratio": 2,
            },
        },
        "conditioner": {
            "target": "hy3dgen.shapegen.models.SingleImageEncoder",
            "params": {
                "main_image_encoder": {
                    "type": "DinoImageEncoder",
                    "kwargs": {
                        "config": {
                            "attention_probs_dropout_prob": 0.0,
                            "drop_path_rate": 0.0,
                            "hidden_act": "gelu",
                            "hidden_dropout_prob": 0.0,
                            "hidden_size": t["dino_width"],
                            "image_size": t["image_size"],
                            "initializer_range": 0.02,
                            "layer_norm_eps": 1.0e-6,
                            "layerscale_value": 1.0,
                            "mlp_ratio": 2,
                            "model_type": "dinov2",
                            "num_attention_heads": t["heads"],
                            "num_channels": 3,
                            "num_hidden_layers": 1,
                            "patch_size": 14,
                            "qkv_bias": True,
                            "torch_dtype": "float32",
                            "use_swiglu_ffn": False,
                        },
                        "image_size": t["image_size"],
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
            "params": {"size": t["processor_size"], "border_ratio": 0.15},
        },
    }


def _shape_geo_decoder(vae, *, empty_surface: bool) -> None:
    """Hand-set the geometry decoder so occupancy = scale * (cos x + cos y + cos z - c + offset(latents))."""
    import torch

    dec = vae.geo_decoder
    embedder = dec.fourier_embedder
    num_freqs = embedder.num_freqs
    if not torch.allclose(embedder.frequencies[0], torch.tensor(1.0)):
        raise AssertionError("tiny VAE expects the first Fourier frequency to be 1 (include_pi: false)")
    # FourierEmbedder output layout: [x, y, z, sin(x f0..fN), sin(y ..), sin(z ..), cos(x ..), cos(y ..), cos(z ..)]
    cos_start = 3 + 3 * num_freqs
    cos_f0 = [cos_start + axis * num_freqs for axis in range(3)]
    level = 4.0 if empty_surface else 2.0 + math.cos(_BLOB_RADIUS)  # 4 > max of the cosine sum: all outside

    with torch.no_grad():
        # channel 0 carries the blob; channels 1-3 carry x, y, z so the cross-attention queries vary
        # smoothly with position (LayerNorm of a single non-zero channel would only keep its sign)
        dec.query_proj.weight.zero_()
        dec.query_proj.bias.zero_()
        for idx in cos_f0:
            dec.query_proj.weight[0, idx] = 1.0
        dec.query_proj.bias[0] = -level
        for axis in range(3):
            dec.query_proj.weight[1 + axis, axis] = 1.0

        block = dec.cross_attn_decoder
        # the MLP branch is switched off; the attention branch only writes a bounded offset into channel 0
        block.mlp.c_proj.weight.zero_()
        block.mlp.c_proj.bias.zero_()
        attn = block.attn
        width = attn.c_proj.weight.shape[0]
        # value half of c_kv, per head: |attention output| <= ||W_v|| * ||LayerNorm(data)|| <= ||W_v|| * sqrt(width)
        w_kv = attn.c_kv.weight.detach()
        v_bound = torch.linalg.matrix_norm(w_kv, ord=2).item() * math.sqrt(width) + 1e-6
        gen = torch.Generator().manual_seed(7)
        row = torch.randn(width, generator=gen)
        row = row / row.norm() * (_MAX_OFFSET / v_bound)
        attn.c_proj.weight.zero_()
        attn.c_proj.bias.zero_()
        attn.c_proj.weight[0] = row

        dec.output_proj.weight.zero_()
        dec.output_proj.bias.zero_()
        dec.output_proj.weight[0, 0] = _OCC_SCALE


def _write(root: Path, model_path: str, subfolder: str, *, empty_surface: bool) -> Path:
    import torch
    import yaml
    from safetensors.torch import save_file
    from hy3dgen.shapegen.pipelines import instantiate_from_config

    config = tiny_config(empty_surface=empty_surface)
    torch.manual_seed(1234)  # the checkpoint itself is deterministic, so tests are too
    model = instantiate_from_config(config["model"])
    vae = instantiate_from_config(config["vae"])
    conditioner = instantiate_from_config(config["conditioner"])
    _shape_geo_decoder(vae, empty_surface=empty_surface)

    tensors = {}
    for prefix, module in (("model", model), ("vae", vae), ("conditioner", conditioner)):
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().to(torch.float16).contiguous().clone()

    folder = Path(root) / model_path / subfolder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    save_file(tensors, str(folder / "model.fp16.safetensors"))
    return folder


def build_tiny_model(
    root: Path, model_path: str = "tiny/Hunyuan3D-tiny", subfolder: str = "hunyuan3d-dit-v2-0"
) -> None:
    """Write a tiny checkpoint whose decoder yields a smooth closed blob (watertight after marching cubes)."""
    _write(Path(root), model_path, subfolder, empty_surface=False)


def build_empty_surface_model(
    root: Path, model_path: str = "tiny/Hunyuan3D-empty", subfolder: str = "hunyuan3d-dit-v2-0"
) -> None:
    """Write a tiny checkpoint whose decoder says "outside" everywhere, so hy3dgen returns `[None]`."""
    _write(Path(root), model_path, subfolder, empty_surface=True)


def count_parameters(root: Path, model_path: str = "tiny/Hunyuan3D-tiny", subfolder: str = "hunyuan3d-dit-v2-0") -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(Path(root) / model_path / subfolder / "model.fp16.safetensors")).values())
