"""A character's reference as plain data: what travels to whichever worker makes a scene.

A reference is a trajectory (the latents that go into every denoising step, then the result) and
the conditioning its passes are run with. Everything is a numpy array or a plain value, so it
pickles into a Ray task or a file with no device or torch version attached; a worker turns it
back into tensors on its own device (`ReferenceTensors`). Tensors are restored in the dtype they
were made in, bit for bit (bfloat16, which numpy lacks, travels widened to float32: exact).

torch is imported only where tensors are made: the daemon's side (the image seam, the story's
work folder) reads and writes references without it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from pipeline.fsutil import atomic_writer

if TYPE_CHECKING:
    import torch

Source = Literal["generated", "picture"]
FORMAT = 1  # of the .npz written by save_reference
_ARRAYS = ("latents", "prompt_embeds", "negative_embeds", "pooled", "negative_pooled", "image_embeds")


def to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        t = t.float()
    return np.ascontiguousarray(t.numpy())


def to_torch(a: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(a)).to(device=device, dtype=dtype)


@dataclass(frozen=True, eq=False)
class Reference:
    """One character's reference: the portrait's replayable trajectory and conditioning."""

    character: str
    source: Source  # "generated": a recorded portrait render; "picture": a bundle picture, noised
    width: int
    height: int
    steps: int
    dtype: str  # torch dtype name the tensors were made in ("float16", "float32", "bfloat16")
    latents: np.ndarray  # [steps + 1, C, h, w]: the input of step i at [i], the result at [steps]
    prompt_embeds: np.ndarray  # [1, tokens, dim]; any length (long prompts are encoded in chunks)
    negative_embeds: np.ndarray  # [1, tokens, dim], the same length as prompt_embeds
    pooled: np.ndarray  # [1, dim2]
    negative_pooled: np.ndarray
    image_embeds: np.ndarray | None = None  # IP-Adapter: [2, 1, ...] (negative, positive), or None

    def __post_init__(self) -> None:
        if self.latents.ndim != 4 or self.latents.shape[0] != self.steps + 1:
            raise ValueError(
                f"{self.character}: latents {self.latents.shape} do not hold {self.steps} steps + 1"
            )
        if self.prompt_embeds.shape != self.negative_embeds.shape:
            raise ValueError(f"{self.character}: prompt and negative embeddings differ in shape")

    @cached_property
    def digest(self) -> str:
        """What the reference is, to the bit: names it in caches and in the manifest."""
        h = hashlib.sha256()
        h.update(json.dumps(self.meta(), sort_keys=True).encode())
        for name in _ARRAYS:
            a = getattr(self, name)
            if a is not None:
                h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
                h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def meta(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _ARRAYS}

    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{self.character}: unknown dtype {self.dtype!r}")
        return dtype

    def fits(self, width: int, height: int, steps: int) -> None:
        """A reference replays step for step: the scene must have its size and step count."""
        if (self.width, self.height, self.steps) != (width, height, steps):
            raise ValueError(
                f"reference of {self.character} is {self.width}×{self.height}, {self.steps} steps; "
                f"the scene is {width}×{height}, {steps} steps"
            )

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in _ARRAYS if getattr(self, n) is not None)


@dataclass(frozen=True)
class ReferenceTensors:
    """A reference on one device: what a reference pass feeds the UNet."""

    reference: Reference
    latents: torch.Tensor
    prompt_embeds: torch.Tensor  # [2, tokens, dim]: negative, positive (the pipeline's CFG order)
    text_embeds: torch.Tensor  # [2, dim2]: negative, positive pooled
    image_embeds: torch.Tensor | None

    @classmethod
    def on(cls, ref: Reference, device: torch.device) -> ReferenceTensors:
        import torch

        dtype = ref.torch_dtype()
        emb = [to_torch(a, dtype, device) for a in (ref.negative_embeds, ref.prompt_embeds)]
        pooled = [to_torch(a, dtype, device) for a in (ref.negative_pooled, ref.pooled)]
        image = None if ref.image_embeds is None else to_torch(ref.image_embeds, dtype, device)
        return cls(ref, to_torch(ref.latents, dtype, device), torch.cat(emb), torch.cat(pooled), image)

    def rows(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """The last `batch` rows of [negative, positive]: both with guidance, positive alone without."""
        if batch not in (1, 2):
            raise ValueError(f"a reference pass has 1 or 2 rows (guidance halves), not {batch}")
        return t[2 - batch :]


def save_reference(path: Path, ref: Reference) -> None:
    """Write atomically as .npz (no pickle inside): a resumed story needs no portrait re-render."""
    arrays = {n: getattr(ref, n) for n in _ARRAYS if getattr(ref, n) is not None}
    meta = json.dumps({"format": FORMAT, **ref.meta()})
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(meta.encode(), dtype=np.uint8), **arrays)
    with atomic_writer(path) as fh:
        fh.write(buf.getvalue())


def load_reference(path: Path) -> Reference:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        if meta.pop("format", None) != FORMAT:
            raise ValueError(f"{path}: not a reference file of format {FORMAT}")
        arrays = {n: data[n] for n in _ARRAYS if n in data.files}
    return Reference(**meta, **arrays)
