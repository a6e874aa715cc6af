"""Stability AI's SD3 reference sampler (github Stability-AI/sd3.5), driven with random weights.

Its files are not ours: `bash bench/fetch_stability_ref.sh MIRROR` copies them into the git-ignored
.vendor/sd3.5/ (never committed; carried to the device). This module only calls them:
`mmditx.MMDiTX` built directly at SD3-medium's shapes (what `sd3_impls.BaseModel` derives from
sd3_medium.safetensors), `sd3_impls.BaseModel.apply_model` for the flow-matching denoised output,
`sd3_impls.CFGDenoiser` (uncond and cond as one batch of two rows per image) and
`sd3_impls.sample_euler` under its own fp16 autocast, then `SDVAE.decode`.

What differs from diffusers, and what a timed run leaves out (the driver `sd3_infer.py` needs
the hub's tokenizers and real checkpoints):
- text: random conditioning of the driver's shapes, 154 tokens (77 CLIP-L+G padded to 4096, 77
  T5) against diffusers' 333 (77 + 256); the text encoders are not run (diffusers rows run them);
- the driver moves the MMDiT to the GPU and back to the host around every image, and the VAE
  around every decode; here both stay on the GPU (the moves are timed once, on the side);
- its weights are fp16 under fp16 autocast, ours bf16.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

VENDOR = Path(__file__).resolve().parents[1] / ".vendor" / "sd3.5"
FILES = ("mmditx.py", "sd3_impls.py", "other_impls.py", "dit_embedder.py")
SHIFT = 3.0  # the driver's shift for SD3-medium and SD3.5
CLIP_TOKENS = T5_TOKENS = 77
TEXT_TOKENS = CLIP_TOKENS + T5_TOKENS


class ReferenceUnavailable(RuntimeError):
    """The reference sampler's files or imports are missing."""


@dataclass(frozen=True)
class MMDiTShape:
    depth: int  # hidden size 64 * depth, depth heads of 64: MMDiTX's own rule
    adm_in_channels: int  # pooled text (CLIP-L 768 + CLIP-G 1280)
    context_in: int  # text embedding width into the context Linear
    pos_embed_max_size: int
    patch_size: int = 2
    in_channels: int = 16


SHAPES = {
    "sd3-medium": MMDiTShape(depth=24, adm_in_channels=2048, context_in=4096, pos_embed_max_size=192),
    "tiny": MMDiTShape(depth=2, adm_in_channels=64, context_in=32, pos_embed_max_size=32),
}


@dataclass
class Reference:
    """The imported reference modules and where they came from (their objects are typed `Any`:
    the vendored code has no annotations)."""

    mmditx: ModuleType
    sd3_impls: ModuleType
    commit: str


def load_reference(vendor: Path = VENDOR) -> Reference:
    missing = [f for f in FILES if not (vendor / f).is_file()]
    if missing:
        raise ReferenceUnavailable(
            f"Stability's reference sampler is not in {vendor} (missing {', '.join(missing)}): run "
            "`bash bench/fetch_stability_ref.sh <git mirror or checkout of Stability-AI/sd3.5>` and carry .vendor"
        )
    for needed in ("einops", "safetensors", "transformers", "tqdm"):
        if importlib.util.find_spec(needed) is None:
            raise ReferenceUnavailable(
                f"Stability's reference sampler imports {needed}, which is not installed (pip install {needed})"
            )
    if str(vendor) not in sys.path:
        sys.path.insert(0, str(vendor))  # its files import each other as top-level modules
    commit_file = vendor / "COMMIT"
    commit = commit_file.read_text().split()[-1] if commit_file.is_file() else "unknown"
    return Reference(importlib.import_module("mmditx"), importlib.import_module("sd3_impls"), commit)


def build_model(ref: Reference, shape: MMDiTShape, device, dtype) -> Any:
    """`sd3_impls.BaseModel` around an `MMDiTX` built directly with random weights at `shape`
    (BaseModel's own constructor reads the shapes from a checkpoint file)."""
    base_model = ref.sd3_impls.BaseModel

    class RandomWeightsModel(base_model):  # type: ignore[misc, valid-type]
        def __init__(self, diffusion_model: torch.nn.Module) -> None:
            torch.nn.Module.__init__(self)
            self.diffusion_model = diffusion_model
            self.model_sampling = ref.sd3_impls.ModelSamplingDiscreteFlow(shift=SHIFT)
            self.control_model = None

    mmdit = ref.mmditx.MMDiTX(
        input_size=None,
        pos_embed_scaling_factor=None,
        pos_embed_offset=None,
        pos_embed_max_size=shape.pos_embed_max_size,
        num_patches=shape.pos_embed_max_size**2,
        patch_size=shape.patch_size,
        in_channels=shape.in_channels,
        depth=shape.depth,
        adm_in_channels=shape.adm_in_channels,
        context_embedder_config={
            "target": "torch.nn.Linear",
            "params": {"in_features": shape.context_in, "out_features": 64 * shape.depth},
        },
        qk_norm=None,
        x_block_self_attn_layers=[],
        device=device,
        dtype=dtype,
    )
    return RandomWeightsModel(mmdit).eval().requires_grad_(False).to(device)


def build_vae(ref: Reference, device, dtype) -> Any:
    return ref.sd3_impls.SDVAE(device=device, dtype=dtype).eval().requires_grad_(False)


def sigmas(model: Any, steps: int) -> torch.Tensor:
    """The driver's schedule (`SD3Inferencer.get_sigmas`): `steps` timesteps evenly from the
    largest sigma's to the smallest's, mapped through the model's shifted sigma, then 0."""
    sampling = model.model_sampling
    timesteps = torch.linspace(float(sampling.timestep(sampling.sigma_max)), float(sampling.timestep(sampling.sigma_min)), steps)
    return torch.tensor([float(sampling.sigma(t)) for t in timesteps] + [0.0])


@dataclass
class Conditioning:
    """The driver's `fix_cond` output: per image, tokens (154 × 4096) and pooled (2048)."""

    c_crossattn: torch.Tensor
    y: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"c_crossattn": self.c_crossattn, "y": self.y}


def random_conditioning(shape: MMDiTShape, images: int, device, dtype, seed: int, tokens: int = TEXT_TOKENS) -> Conditioning:
    g = torch.Generator("cpu").manual_seed(seed)
    return Conditioning(
        torch.randn(images, tokens, shape.context_in, generator=g).to(device, dtype),
        torch.randn(images, shape.adm_in_channels, generator=g).to(device, dtype),
    )


class _MarkedDenoiser(torch.nn.Module):
    """The CFG denoiser, with a mark after each call (one sampler step)."""

    def __init__(self, denoiser: torch.nn.Module, mark) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.mark = mark

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.denoiser(*args, **kwargs)
        self.mark()
        return out


def generate(
    ref: Reference,
    model: Any,
    vae: Any,
    seeds: list[int],
    size: int,
    steps: int,
    cfg_scale: float,
    cond: Conditioning,
    uncond: Conditioning,
    mark=None,
):
    """One sampling call over len(seeds) images (the driver does one at a time): the driver's noise
    (a CPU generator per seed), Euler with CFG under the sampler's fp16 autocast, the latent
    format's shift, then (with `vae`) the decode and PIL images as the driver's `vae_decode`.
    Returns (latents, images)."""
    device = cond.c_crossattn.device
    latent_shape = (len(seeds), 16, size // 8, size // 8)
    noise = torch.cat([torch.randn((1, *latent_shape[1:]), generator=torch.manual_seed(s)) for s in seeds])
    noise = noise.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    sched = sigmas(model, steps).to(device)
    x = model.model_sampling.noise_scaling(sched[0], noise, torch.zeros_like(noise))
    denoiser = ref.sd3_impls.CFGDenoiser(model)
    if mark is not None:
        denoiser = _MarkedDenoiser(denoiser, mark)
    extra = dict(cond=cond.as_dict(), uncond=uncond.as_dict(), cond_scale=cfg_scale, controlnet_cond=None)
    latents = ref.sd3_impls.sample_euler(denoiser, x, sched, extra_args=extra)
    latents = ref.sd3_impls.SD3LatentFormat().process_out(latents)
    images: list[Image.Image] = []
    if vae is not None:
        with torch.no_grad():
            decoded = vae.decode(latents.to(next(vae.parameters()).dtype)).float()
        pixels = torch.clamp((decoded + 1.0) / 2.0, 0.0, 1.0).mul(255.0).to(torch.uint8).cpu().numpy()
        images = [Image.fromarray(np.moveaxis(p, 0, 2)) for p in pixels]
        if mark is not None:
            mark()
    return latents, images
