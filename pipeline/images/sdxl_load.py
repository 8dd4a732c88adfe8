"""The choices made once, when SDXL is loaded: scheduler, VAE precision, speed features, baseline savers.

Each is decided from the settings ("auto", "on", "off") and what the device is, and reported by
`describe()` and in every image's record, so a manifest says how its pictures were made.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler

from pipeline.images.device import GIB, DeviceOps
from pipeline.images.memory import MemorySavers
from pipeline.images.model import SdxlPipeline
from pipeline.settings import ImageSettings

# Below this much VRAM the "auto" memory savers are switched on from the start.
LOW_VRAM_BYTES = 12 * GIB
# CUDA graphs ("reduce-overhead") are avoided: they pin a private memory pool, must be re-recorded
# whenever the OOM ladder changes attention processors or offloads, and buy little for a UNet whose
# kernels are large. Autotuned kernels without graphs keep the memory behaviour of eager mode.
COMPILE_MODE = "max-autotune-no-cudagraphs"
ALLOCATOR_ENV = "PYTORCH_CUDA_ALLOC_CONF"
ALLOCATOR_SETTING = "expandable_segments:True"


def configure_allocator(environ: MutableMapping[str, str]) -> None:
    """Ask for expandable segments unless the user chose an allocator config (either variable name).

    Must run before CUDA initialises: the allocator reads it once. Expandable segments stop the
    fragmentation that otherwise makes a long-running daemon OOM on a frame it rendered an hour ago.
    """
    if "PYTORCH_ALLOC_CONF" in environ:  # the newer name; setting the old one too would conflict
        return
    environ.setdefault(ALLOCATOR_ENV, ALLOCATOR_SETTING)


@dataclass(frozen=True)
class Features:
    """The speed choices made at load (from the settings and the device), and whether the UNet
    has been compiled yet; reported by `describe()` and in every image's record."""

    vae_upcast: str  # why the VAE decodes in the dtype it does
    channels_last: bool
    fuse_qkv: bool
    compile_mode: str | None  # torch.compile mode for the UNet; None: it stays eager
    compiled: bool = False  # compilation happens at warm-up, not at load
    warmup_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        warm = {} if self.warmup_seconds is None else {"warmup_seconds": self.warmup_seconds}
        return {
            "vae_upcast": self.vae_upcast,
            "channels_last": self.channels_last,
            "fuse_qkv": self.fuse_qkv,
            "compile": self.compile_mode or False,
            "compiled": self.compiled,
            **warm,
        }

    def compiled_mode(self) -> str | bool:
        """The compile mode in effect for an image: False until warm-up compiled the UNet."""
        return (self.compiled and self.compile_mode) or False


def decide(setting: str, auto: bool) -> bool:
    return setting == "on" or (setting == "auto" and auto)


def vae_upcast_decision(setting: str, model_dtype: torch.dtype, force_upcast: bool) -> tuple[bool, str]:
    """Whether to keep the VAE in fp32, and why (recorded in every image's info).

    SDXL's own VAE overflows in fp16 (NaN, black frames). "auto" trusts the VAE config's
    `force_upcast`, which is False only on VAEs fixed for fp16; "off" is the user vouching
    for an fp16-safe VAE.
    """
    if model_dtype == torch.float32:
        return False, "not needed: model runs in fp32"
    if setting == "off":
        return False, "fp16 decode (vae_upcast = off)"
    if setting == "auto" and not force_upcast:
        return False, "fp16 decode (auto: VAE config says fp16-safe, force_upcast = false)"
    why = "vae_upcast = on" if setting == "on" else "auto: VAE config force_upcast = true"
    return True, f"fp32 decode ({why})"


def prepare(pipe: SdxlPipeline, img: ImageSettings, device: DeviceOps) -> tuple[Features, MemorySavers]:
    """Set the pipeline up for `device`: returns the features chosen and the baseline memory savers."""
    on_cuda = device.device.type == "cuda"
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    force = bool(getattr(pipe.vae.config, "force_upcast", True))
    upcast, why = vae_upcast_decision(img.vae_upcast, device.dtype, force)
    if upcast:  # stays fp32; latents are cast to it before decoding. float(), not to(dtype=...):
        pipe.vae.float()  # diffusers 0.42's ModelMixin.to warns of "modules to keep in float32: []"
    features = Features(
        vae_upcast=why,
        channels_last=decide(img.channels_last, on_cuda),
        fuse_qkv=decide(img.fuse_qkv, on_cuda),
        compile_mode=COMPILE_MODE if decide(img.compile, on_cuda) else None,
    )
    # fp16 on the CPU is asked for (model.dtype), and runs on torch 2.x: diffusers' warning that it
    # "cannot run" (one raw line per fp16 component) is out of date.
    pipe.to(device.device, silence_dtype_warnings=True)
    if features.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if features.fuse_qkv:
        pipe.fuse_qkv_projections()
    total = device.total_memory_bytes()
    low_vram = total is not None and total < LOW_VRAM_BYTES
    baseline = MemorySavers(
        attention_slicing=decide(img.attention_slicing, low_vram),
        vae_slicing=decide(img.vae_slicing, low_vram),
    )
    return features, baseline
