"""Characters at the generator: the consistency machinery on one pipeline, portraits, reference scenes.

What pipeline/images/consistency/ provides, wired into the SDXL generator (sdxl.py):

1. at load, in this order (each later step would be undone by an earlier one done after it):
   the pipeline placed and fused (sdxl_load.prepare), then the IP-Adapter through diffusers'
   `load_ip_adapter` when `[characters] ip_adapter` is set (and `pipe.to(device)` again: the
   loader puts the adapter's layers on the CPU), then `SharedAttention` last; the generator's
   memory savers save the processors after this (memory.MemorySaver);
2. a `PortraitRequest`: the portrait rendered with its trajectory recorded, or a bundle's picture
   noised step by step; with the adapter, its picture's embeddings go into the reference;
3. a `SceneRequest` with references: the scene's pipeline call inside `references_in_view`; one
   without is the plain call (with the adapter's neutral embeddings at scale 0 when one is loaded,
   which computes exactly what the call computes without the adapter).

With `consistency = "off"` nothing is installed and nothing here changes a pipeline call.

torch.compile (CUDA only: `[image] compile`) compiles the UNet with our processors in it, idle.
A compiled graph is only ever run idle (plain scenes, portraits, warm-up); reference passes and
scenes with references run the UNet eagerly (`eager`), so no graph is traced through the capture
and share modes, whose Python state and growing key lengths would make Dynamo recompile or break
the graph at every mode switch.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pipeline.images.conditioning import Conditioning
from pipeline.images.consistency.attention import SharedAttention
from pipeline.images.consistency.ip_adapter import IpAdapter, IpAdapterError, load_ip_adapter
from pipeline.images.consistency.record import TextConditioning, record_portrait, reference_from_picture
from pipeline.images.consistency.reference import Reference
from pipeline.images.consistency.replay import StepEnd, references_in_view
from pipeline.images.device import DeviceOps
from pipeline.images.model import SdxlPipeline
from pipeline.images.seam import PortraitRequest, SceneRequest
from pipeline.settings import ConfigError, Settings

REFERENCE_PASS = "every step of every scene"  # no cache of reference keys/values across scenes


@contextlib.contextmanager
def eager(unet: Any) -> Iterator[None]:
    """The UNet's own forward inside, even if `unet.compile()` was called; compiled again after.

    `torch.nn.Module.compile` (torch 2.13, nn/modules/module.py) keeps the compiled callable in
    `_compiled_call_impl` and `__call__` uses it when it is set: unset for the block, put back.
    """
    compiled = getattr(unet, "_compiled_call_impl", None)
    if compiled is None:
        yield
        return
    unet._compiled_call_impl = None
    try:
        yield
    finally:
        unet._compiled_call_impl = compiled


class Characters:
    """The consistency machinery installed on one pipeline, or nothing (consistency off)."""

    def __init__(self, pipe: SdxlPipeline, settings: Settings, device: DeviceOps) -> None:
        """Load the adapter (when configured), then install the shared attention, last.

        A configured adapter folder that cannot be used stops start-up: ConfigError (exit 2),
        naming the folder and what is wrong with it.
        """
        c = settings.characters
        self.on = c.consistency == "on"
        self.ip: IpAdapter | None = None
        self.shared: SharedAttention | None = None
        if not self.on:
            return
        if c.ip_adapter:
            try:
                self.ip = load_ip_adapter(
                    pipe, Path(c.ip_adapter), c.ip_adapter_file, c.ip_adapter_encoder, c.ip_adapter_scale
                )
            except IpAdapterError as err:
                raise ConfigError(str(err)) from None
            pipe.to(device.device)
        self.shared = SharedAttention(pipe.unet)

    @property
    def fixed_processors(self) -> bool:
        """The adapter's processors must stay: every call of an adapted UNet needs them."""
        return self.ip is not None

    def describe(self) -> dict[str, Any]:
        return {
            "consistency": "on" if self.on else "off",
            "shared_layers": len(self.shared.layers) if self.shared is not None else 0,
            "reference_pass": REFERENCE_PASS,
            "ip_adapter": self.ip.describe() if self.ip is not None else None,
        }

    # -- scenes --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scene(self, pipe: SdxlPipeline, req: SceneRequest, step_end: StepEnd) -> Iterator[dict[str, Any]]:
        """The keyword arguments a scene's pipeline call adds (its step-end callback among them)."""
        if not req.references:
            yield {"callback_on_step_end": step_end, **self.plain_kwargs(req.guidance)}
            return
        if self.shared is None:
            raise ValueError("a scene with character references, on a worker with consistency off")
        with (
            eager(pipe.unet),
            references_in_view(
                pipe,
                self.shared,
                req.references,
                width=req.width,
                height=req.height,
                steps=req.steps,
                guidance=req.guidance,
                on_step_end=step_end,
                ip=self.ip,
            ) as extra,
        ):
            yield extra

    def plain_kwargs(self, guidance: float) -> dict[str, Any]:
        """What a plain call adds: the adapter's neutral embeddings (scale 0), else nothing."""
        return self.ip.plain_kwargs(guidance) if self.ip is not None else {}

    # -- portraits -----------------------------------------------------------------------------------
    def portrait(
        self, pipe: SdxlPipeline, req: PortraitRequest, cond: Conditioning, step_end: StepEnd
    ) -> tuple[torch.Tensor | None, PIL.Image.Image | None, Reference]:
        """(latents to decode, or the picture itself; the reference, without adapter embeddings)."""
        if not self.on:
            raise ValueError("a portrait asked of a worker with consistency off")
        text = TextConditioning(cond.prompt_embeds, cond.negative_embeds, cond.pooled, cond.negative_pooled)
        size = {"width": req.width, "height": req.height, "steps": req.steps}
        if req.picture is not None:
            with PIL.Image.open(io.BytesIO(req.picture)) as opened:
                picture = opened.convert("RGB")
            ref = reference_from_picture(pipe, req.character, picture, text, seed=req.seed, **size)
            return None, picture, ref
        latents, ref = record_portrait(
            pipe,
            req.character,
            text,
            seed=req.seed,
            guidance=req.guidance,
            extra=self.plain_kwargs(req.guidance) or None,
            on_step_end=step_end,
            **size,
        )
        return latents, None, ref

    def with_picture(self, ref: Reference, image: PIL.Image.Image) -> Reference:
        """With the adapter, the portrait's picture encoded once: its embeddings travel with it."""
        if self.ip is None:
            return ref
        return replace(ref, image_embeds=self.ip.encode(image))


def made_with(req: SceneRequest | PortraitRequest, ref: Reference | None) -> dict[str, Any]:
    """What an image's record says of the characters in it (nothing for a plain scene)."""
    if isinstance(req, PortraitRequest):
        assert ref is not None
        return {
            "portrait": {"character": req.character, "source": ref.source, "reference_sha256": ref.digest}
        }
    if not req.references:
        return {}
    return {
        "references": [
            {"character": r.character, "source": r.source, "reference_sha256": r.digest}
            for r in req.references
        ]
    }
