"""What the consistency tests share: the tiny pipeline loaded as the daemon loads it, and scenes.

A scene here is the generator's denoising call (`pipe(...)` with prompt embeddings and the
seed's CPU-drawn noise, latents out), with or without references in view; tests compare the
latents, which decode to the PNG bit for bit or not at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import EulerDiscreteScheduler

from pipeline.images.consistency.attention import SharedAttention
from pipeline.images.consistency.record import TextConditioning, initial_noise, latent_shape, record_portrait
from pipeline.images.consistency.reference import Reference
from pipeline.images.consistency.replay import references_in_view
from pipeline.images.model import ModelLocation, from_folder, quiet_libraries

W, H, STEPS, GUIDANCE = 64, 48, 4, 6.0
CPU = torch.device("cpu")


def load_tiny(tiny_dir: Path) -> Any:
    """Through `from_pretrained`, as pipeline/images/model.py loads it; Euler, as the generator sets."""
    quiet_libraries()
    pipe = from_folder(ModelLocation("tiny", tiny_dir, None, None), torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe


def text(pipe: Any, prompt: str, negative: str = "blurry") -> TextConditioning:
    with torch.no_grad():
        pe, npe, po, npo = pipe.encode_prompt(
            prompt=prompt,
            device=CPU,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
    return TextConditioning(pe, npe, po, npo)


def portrait(pipe: Any, who: str, prompt: str, seed: int, **kw: Any) -> tuple[torch.Tensor, Reference]:
    with torch.no_grad():
        return record_portrait(
            pipe,
            who,
            text(pipe, prompt),
            seed=seed,
            width=W,
            height=H,
            steps=kw.pop("steps", STEPS),
            guidance=kw.pop("guidance", GUIDANCE),
            **kw,
        )


def scene(
    pipe: Any,
    shared: SharedAttention | None,
    cond: TextConditioning,
    seed: int,
    refs: list[Reference] | None = None,
    guidance: float = GUIDANCE,
    extra: dict[str, Any] | None = None,
    **view: Any,
) -> torch.Tensor:
    """One scene's latents; `refs` in view when given (through `references_in_view`)."""
    noise = initial_noise(seed, latent_shape(pipe, W, H), torch.float32, CPU)
    call = {
        **cond.pipe_kwargs(),
        "latents": noise,
        "width": W,
        "height": H,
        "num_inference_steps": STEPS,
        "guidance_scale": guidance,
        "output_type": "latent",
        "return_dict": False,
        **(extra or {}),
    }
    with torch.no_grad():
        if not refs:
            return pipe(**call)[0]
        assert shared is not None
        with references_in_view(
            pipe, shared, refs, width=W, height=H, steps=STEPS, guidance=guidance, **view
        ) as more:
            return pipe(**call, **more)[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
