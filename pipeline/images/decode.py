"""Latents -> an RGB picture with the VAE, in its own dtype, with one fp32 retry for an fp16 overflow."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import PIL.Image
import torch

from pipeline.images.model import SdxlPipeline


def decode(pipe: SdxlPipeline, latents: torch.Tensor) -> tuple[PIL.Image.Image, dict[str, Any]]:
    """Decode in the VAE's own dtype; an fp16 VAE that still overflows is retried once in fp32.

    The upcast is decided once at load (`sdxl_load.vae_upcast_decision`), not per call as
    diffusers does, and the NaN check and retry are ours; the denormalising is diffusers' own.
    The retry starts again from the UNet's latents, so it is exactly the decode an upcast VAE
    makes (the same picture as `vae_upcast = "on"`), and it is per image: the next one is tried in
    fp16 again, so no picture depends on whether an earlier one overflowed.
    """
    vae = pipe.vae
    decoded = _vae_decode(vae, latents, vae.dtype)
    retried = False
    if vae.dtype == torch.float16 and not bool(torch.isfinite(decoded).all()):
        del decoded
        with _vae_in_fp32(vae):
            decoded = _vae_decode(vae, latents, torch.float32)
        retried = True
    image = pipe.image_processor.postprocess(decoded.float(), output_type="pil")[0]
    return image.convert("RGB"), {"vae_nan_fp32_retry": retried}


def _vae_decode(vae: Any, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Denormalise in the decode's dtype (an upcast VAE never sees fp16-rounded inputs), then decode."""
    cfg = vae.config
    # Adapted from diffusers 0.42 pipeline_stable_diffusion_xl.py, StableDiffusionXLPipeline.__call__,
    # the decode after "# 8. Denoising loop": cast to the VAE's dtype (upcast if needed), then
    # "unscale/denormalize the latents" with latents_mean/latents_std when the config has them.
    latents = latents.to(dtype)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, dtype)
        s = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, dtype)
        latents = latents * s / cfg.scaling_factor + m
    else:
        latents = latents / cfg.scaling_factor
    decoded: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    return decoded


@contextlib.contextmanager
def _vae_in_fp32(vae: Any) -> Iterator[None]:
    """Upcast for one decode, then back, as diffusers 0.42's SDXL `__call__` does when
    `needs_upcasting` (there for every decode; here only to retry one that overflowed).

    `float()`/`half()`, not `to(dtype=...)`: diffusers 0.42's `ModelMixin.to` warns on every
    dtype cast ("modules ... should be kept in float32: []"), a raw line in the journal per retry.
    """
    vae.float()
    try:
        yield
    finally:
        vae.half()
