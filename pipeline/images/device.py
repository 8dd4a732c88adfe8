"""Every question asked of the accelerator, behind one small class.

The generator never calls `torch.cuda` itself: it asks a `DeviceOps`. That keeps the
CUDA-only paths (memory queries, cache flushing, CPU offload) testable on a CPU-only
machine with a fake, and it is the seam a multi-GPU worker (one process or Ray actor per
GPU) would use to pin itself to its own device.

The CUDA and MPS branches here are written against the torch API but have not been run on a
real GPU in this repository's tests; the tests use fakes of this class. The GPU's precision
(fp16) is not CUDA-only: `dtype="float16"` runs it on the CPU, which is how the tests rehearse
the path a GPU takes by default.
"""

from __future__ import annotations

import gc
from typing import Any

import torch

GIB = 1 << 30


class DeviceOps:
    """The real device: CUDA where asked or available, else MPS, else CPU."""

    def __init__(self, requested: str = "auto", dtype: str = "auto") -> None:
        self.device = self.resolve(requested)
        self.dtype = self.resolve_dtype(dtype, self.device)

    @staticmethod
    def resolve(requested: str) -> torch.device:
        """With "auto", prefer CUDA, then Apple's MPS, then the CPU; an explicit name is taken as given.

        An explicit "cuda" on a machine without one fails here, at start-up, with torch's own
        message, rather than at the first scene.
        """
        if requested != "auto":
            device = torch.device(requested)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise RuntimeError("model.device = 'cuda' but torch sees no CUDA device")
            return device
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")

    @staticmethod
    def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
        """With "auto", fp16 on CUDA (half the memory, tensor cores) and fp32 elsewhere, where fp16
        is slow; "float16" or "float32" is taken as given (`model.dtype`)."""
        if requested == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        dtype = getattr(torch, requested, None)
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"model.dtype = {requested!r}: expected auto, float16 or float32")
        return dtype

    @property
    def name(self) -> str:
        if self.device.type == "cuda":
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return str(self.device)

    def total_memory_bytes(self) -> int | None:
        """The accelerator's memory, or None where there is no separate device memory to budget."""
        if self.device.type == "cuda":
            return int(torch.cuda.get_device_properties(self.device).total_memory)
        return None

    @property
    def has_own_memory(self) -> bool:
        """Memory apart from the host's, with a cache that freed tensors go back to (CUDA, MPS)."""
        return self.device.type in ("cuda", "mps")

    def release(self) -> None:
        """Give freed memory back after an image: a full collection first (cycles still holding
        tensors), then the allocator's cache. On the CPU neither has anything to give back, and
        the full collection of a heap holding torch, diffusers and transformers holds the GIL, and
        the loop's thread with it, for 0.3 s quiet and over 3 s on a loaded box."""
        if self.has_own_memory:
            gc.collect()
            self.empty_cache()

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return None

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def synchronize(self) -> None:
        """Wait for queued kernels, so wall-clock timings measure work done, not work queued."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def supports_offload(self) -> bool:
        """Model CPU offload only means something when the model normally lives off the CPU."""
        return self.device.type != "cpu"

    def enable_offload(self, pipe: Any) -> None:
        """Keep weights in host RAM, moving one model at a time onto the device (last OOM rung)."""
        pipe.enable_model_cpu_offload(device=self.device)

    def disable_offload(self, pipe: Any) -> None:
        """Undo `enable_offload`: drop accelerate's hooks, then put every component back on the device."""
        pipe.remove_all_hooks()
        pipe.to(self.device)
