"""GPU memory: the savers switched on a pipeline, the OOM ladder, and the errors that tell OOM apart.

A scene that runs out of memory is tried again with more savers, rung by rung
(`MemorySaver.ladder`), and the next scene starts from the configured baseline again. A
sticky CUDA error is never an OOM: the context is gone, only a new process recovers.

Attention slicing replaces every attention processor with diffusers' sliced one: the shared
attention a scene with character references is made with, and an IP-Adapter's, would be gone
(the scene silently made without its references, every adapted call broken). So a scene whose
processors must stay climbs a ladder without that rung, and with an adapter loaded it is never
used at all; SDPA, the processor it would replace, already computes attention in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from pipeline.images.device import DeviceOps
from pipeline.images.model import SdxlPipeline

# diffusers tiles the VAE at its training size (1024 px for SDXL), which never tiles a 1024×768 frame;
# the tiling rung uses smaller tiles so that it actually lowers peak memory.
VAE_TILE_PIXELS = 512
# Messages of CUDA errors after which the context is unusable: only a new process can recover.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "CUDA error: device-side assert",
    "unspecified launch failure",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "misaligned address",
    "uncorrectable ECC",
)


@dataclass(frozen=True)
class MemorySavers:
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False

    def union(self, other: MemorySavers) -> MemorySavers:
        return MemorySavers(*(a or b for a, b in zip(self.flags(), other.flags(), strict=True)))

    def flags(self) -> tuple[bool, bool, bool, bool]:
        return (self.attention_slicing, self.vae_slicing, self.vae_tiling, self.cpu_offload)

    def names(self) -> list[str]:
        labels = ("attention_slicing", "vae_slicing", "vae_tiling", "model_cpu_offload")
        return [name for name, on in zip(labels, self.flags(), strict=True) if on]


# Rungs tried, in order, after an out-of-memory error; each adds to the configured baseline.
OOM_LADDER = (
    MemorySavers(attention_slicing=True, vae_slicing=True),
    MemorySavers(attention_slicing=True, vae_slicing=True, vae_tiling=True),
    MemorySavers(attention_slicing=True, vae_slicing=True, vae_tiling=True, cpu_offload=True),
)


def is_sticky_cuda_error(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(s in str(err) for s in STICKY_CUDA_ERRORS)


def is_out_of_memory(err: BaseException) -> bool:
    """torch's OOM type, plus the allocators that still raise a plain RuntimeError (MPS, cuBLAS, CPU).

    A sticky CUDA error is never an OOM, whatever its text: retrying on a dead context is pointless.
    """
    if is_sticky_cuda_error(err):
        return False
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    markers = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "can't allocate memory")
    return isinstance(err, RuntimeError) and any(m in text for m in markers)


class OutOfMemory:
    """An attempt's OOM, reduced to its message so no frame or tensor of the attempt survives it."""

    def __init__(self, message: str) -> None:
        self.message = message


class MemorySaver:
    """The savers in effect on one pipeline: switched one by one, and back to the baseline."""

    def __init__(
        self, pipe: SdxlPipeline, device: DeviceOps, baseline: MemorySavers, fixed_processors: bool = False
    ) -> None:
        """`fixed_processors`: the processors may never be replaced (an IP-Adapter is loaded)."""
        self.pipe = pipe
        self.device = device
        self.fixed_processors = fixed_processors
        self.baseline = replace(baseline, attention_slicing=False) if fixed_processors else baseline
        # Saved after fusing and after the consistency processors are installed (the last to
        # touch them), so that undoing attention slicing restores exactly this.
        self.unet_processors: dict[str, Any] = dict(pipe.unet.attn_processors)
        self.vae_tiles = (pipe.vae.tile_sample_min_size, pipe.vae.tile_latent_min_size)
        self.active = MemorySavers()
        self.apply(self.baseline)

    def apply(self, want: MemorySavers) -> None:
        """Move from the active savers to `want`, touching only what differs."""
        pipe, have = self.pipe, self.active
        if want.cpu_offload != have.cpu_offload and self.device.supports_offload():
            if want.cpu_offload:
                self.device.enable_offload(pipe)
            else:
                self.device.disable_offload(pipe)
        if want.attention_slicing != have.attention_slicing:
            if want.attention_slicing:
                pipe.enable_attention_slicing()
            else:
                pipe.unet.set_attn_processor(dict(self.unet_processors))
        if want.vae_slicing != have.vae_slicing:
            if want.vae_slicing:
                pipe.vae.enable_slicing()
            else:
                pipe.vae.disable_slicing()
        if want.vae_tiling != have.vae_tiling:
            self._set_vae_tiling(want.vae_tiling)
        self.active = replace(want, cpu_offload=want.cpu_offload and self.device.supports_offload())

    def _set_vae_tiling(self, on: bool) -> None:
        vae = self.pipe.vae
        if on:
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            sample = min(VAE_TILE_PIXELS, self.vae_tiles[0])
            vae.tile_sample_min_size, vae.tile_latent_min_size = sample, sample // scale
            vae.enable_tiling()
        else:
            vae.tile_sample_min_size, vae.tile_latent_min_size = self.vae_tiles
            vae.disable_tiling()

    def ladder(self, keep_processors: bool = False) -> list[MemorySavers]:
        """The baseline, then each OOM rung on top of it, minus rungs that change nothing here.

        `keep_processors` (a scene with references): no rung slices attention, the baseline's
        slicing included; each rung then puts the saved processors back before the attempt.
        """
        keep = keep_processors or self.fixed_processors
        rungs: list[MemorySavers] = []
        for extra in (MemorySavers(), *OOM_LADDER):
            savers = self.baseline.union(extra)
            if keep:
                savers = replace(savers, attention_slicing=False)
            if not self.device.supports_offload():
                savers = replace(savers, cpu_offload=False)
            if savers not in rungs:
                rungs.append(savers)
        return rungs
