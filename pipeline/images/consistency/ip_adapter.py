"""IP-Adapter weights, for those who have them: loaded through diffusers' own loader, offline.

`[characters] ip_adapter` names a local folder in h94/IP-Adapter's layout; `ip_adapter_file`
(default `sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors`) and `ip_adapter_encoder`
(default `models/image_encoder`, the ViT-H encoder the "plus ... vit-h" adapters take) are paths
inside it, and `ip_adapter_scale` (default 0.6) how strongly a reference picture steers a scene.

Order at load: diffusers' `load_ip_adapter` rebuilds every attention processor (attn1 with no
arguments), and `fuse_qkv_projections` replaces them all, so: fuse first (if at all), then this,
then `pipe.to(device)` (the adapter's layers are loaded on the CPU), then `SharedAttention`.

Once loaded, every UNet call needs image embeddings: plain scenes and reference passes get
neutral ones at scale 0, where diffusers' processor skips the image branch altogether, so they
compute exactly what they would without the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from safetensors import SafetensorError

from pipeline.images.consistency.adapter_files import IpAdapterError, IpAdapterFiles, check_files
from pipeline.images.consistency.reference import to_numpy, to_torch

PROBE_SIZE = 64  # the picture encoded at load to prove encoder and adapter fit together
__all__ = ["IpAdapter", "IpAdapterError", "check_files", "load_ip_adapter"]


class IpAdapter:
    """A loaded adapter: encodes reference pictures, and sets the scale for each pipeline call."""

    def __init__(self, pipe: Any, files: IpAdapterFiles, scale: float) -> None:
        self.pipe = pipe
        self.files = files
        self.scale = scale
        self._neutral: np.ndarray | None = None

    def describe(self) -> dict[str, Any]:
        return {**self.files.describe(), "scale": self.scale}

    def _processors(self) -> list[Any]:
        return [p for p in self.pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Every adapter layer at `scale` inside, back to what it was after (0 between scenes)."""
        procs = self._processors()
        before = [p.scale for p in procs]
        for p in procs:
            p.scale = [scale] * len(p.scale)
        try:
            yield
        finally:
            for p, s in zip(procs, before, strict=True):
                p.scale = s

    def encode(self, picture: PIL.Image.Image) -> np.ndarray:
        """A picture's embeddings, [2, 1, ...] (negative, positive): computed once, they travel."""
        device = self.pipe.unet.device
        with torch.no_grad():
            embeds = self.pipe.prepare_ip_adapter_image_embeds(
                [picture.convert("RGB")], None, device, 1, True
            )
        return to_numpy(embeds[0])

    def neutral(self, rows: int) -> list[torch.Tensor]:
        """Embeddings for a call that must not be steered (used at scale 0 only): zeros."""
        assert self._neutral is not None, "IpAdapter.probe() runs at load"
        return [
            self._rows(torch.from_numpy(self._neutral).to(self.pipe.unet.device, self.pipe.unet.dtype), rows)
        ]

    @staticmethod
    def _rows(embeds: torch.Tensor, rows: int) -> torch.Tensor:
        return embeds if rows == 2 else embeds[1:]

    def scene_embeds(self, per_reference: Sequence[torch.Tensor | None], rows: int) -> list[torch.Tensor]:
        """The references' embeddings side by side (one image each): the adapter attends to all."""
        if any(e is None for e in per_reference):
            raise ValueError("a reference has no IP-Adapter embeddings (encode its picture first)")
        joined = torch.cat([e for e in per_reference if e is not None], dim=1)
        return [self._rows(joined, rows)]

    def plain_kwargs(self, guidance: float) -> dict[str, Any]:
        """What a plain pipeline call (no references) adds while the adapter is loaded."""
        return {"ip_adapter_image_embeds": self.neutral(2 if guidance > 1.0 else 1)}

    def probe(self) -> None:
        """Encode a grey picture and project it: an encoder that does not fit the adapter fails here."""
        grey = PIL.Image.new("RGB", (PROBE_SIZE, PROBE_SIZE), (128, 128, 128))
        try:
            embeds = self.encode(grey)
            with torch.no_grad():
                self.pipe.unet.encoder_hid_proj(
                    [to_torch(embeds, self.pipe.unet.dtype, self.pipe.unet.device)]
                )
        except (RuntimeError, ValueError) as err:
            raise IpAdapterError(
                f"characters.ip_adapter: {self.files.folder}: the image encoder {self.files.encoder} "
                f"does not fit the adapter {self.files.weights}: {str(err).splitlines()[0]}"
            ) from None
        self._neutral = np.zeros_like(embeds)


def load_ip_adapter(pipe: Any, folder: Path, weights: str, encoder: str, scale: float) -> IpAdapter:
    """Load the adapter into `pipe` (before any processor of ours), proven to work, at scale 0."""
    files = check_files(Path(folder), weights, encoder)
    sub = Path(weights).parent.as_posix()
    # diffusers reads an encoder folder without '/' as inside the adapter's subfolder; ours is
    # always relative to the top folder.
    enc = encoder if "/" in encoder else f"./{encoder}"
    try:
        pipe.load_ip_adapter(
            str(files.folder),
            subfolder="" if sub == "." else sub,
            weight_name=Path(weights).name,
            image_encoder_folder=enc,
            local_files_only=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise IpAdapterError(
            f"characters.ip_adapter: {files.folder}: {weights} could not be loaded into this model "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    adapter = IpAdapter(pipe, files, scale)
    adapter.probe()
    pipe.set_ip_adapter_scale(0.0)  # the loader leaves 1.0: nothing is steered until a scene asks
    return adapter
