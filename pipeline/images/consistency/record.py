"""Making a reference: a portrait rendered once and recorded, or a bundle picture noised step by step.

A generated portrait is an ordinary `pipe(...)` call whose step-end callback keeps the latents
after every step; with the starting latents in front, that is the input of every step: exactly
what a reference pass replays. A bundle's picture of the character has no render to record, so
its trajectory is the picture's own latent noised to each step's level (x0 + sigma_i * noise, the
forward process that img2img and A1111's "reference-only" use): at every step the scene sees the
picture as the model sees a picture at that noise level. Inverting the picture into a trajectory
(DDIM/Euler inversion) was not chosen: with guidance it is approximate, costs a full extra pass,
and its errors grow with the step count, where the noised latent is exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from pipeline.images.consistency.reference import Reference, to_numpy
from pipeline.images.consistency.replay import StepEnd


@dataclass(frozen=True)
class TextConditioning:
    """The four SDXL text tensors of a prompt, as the pipeline takes them (`prompt_embeds=` ...).

    Prompt and negative must have the same token length (pad the shorter, as the generator's
    long-prompt encoder does); a reference's length need not match any scene's.
    """

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_pooled: torch.Tensor

    def pipe_kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_embeds,
            "pooled_prompt_embeds": self.pooled,
            "negative_pooled_prompt_embeds": self.negative_pooled,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "prompt_embeds": to_numpy(self.prompt_embeds),
            "negative_embeds": to_numpy(self.negative_embeds),
            "pooled": to_numpy(self.pooled),
            "negative_pooled": to_numpy(self.negative_pooled),
        }


def initial_noise(
    seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A seed's noise drawn on the CPU in fp32, as the generator draws a scene's: the same everywhere."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def latent_shape(pipe: Any, width: int, height: int) -> tuple[int, int, int, int]:
    scale = pipe.vae_scale_factor
    return (1, pipe.unet.config.in_channels, height // scale, width // scale)


class Recorder:
    """A step-end callback that keeps the latents going into each step, and the result."""

    def __init__(self, initial: torch.Tensor, then: StepEnd | None = None) -> None:
        self.initial = initial
        self.then = then
        self.latents: list[torch.Tensor] = []

    def __call__(self, pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if not self.latents:
            # The pipeline's own start: prepare_latents multiplies given latents by init_noise_sigma.
            self.latents.append(self.initial.to(kwargs["latents"].device) * pipe.scheduler.init_noise_sigma)
        if len(self.latents) != i + 1:
            raise RuntimeError(f"recording out of step: {len(self.latents)} latents at step {i}")
        self.latents.append(kwargs["latents"].detach().clone())
        return self.then(pipe, i, t, kwargs) if self.then is not None else kwargs


def record_portrait(
    pipe: Any,
    character: str,
    text: TextConditioning,
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    extra: dict[str, Any] | None = None,
    on_step_end: StepEnd | None = None,
) -> tuple[torch.Tensor, Reference]:
    """Render the portrait's latents (the caller decodes them) and its reference.

    `extra` is added to the pipeline call (e.g. the IP-Adapter's neutral embeddings when one is
    loaded: `IpAdapter.plain_kwargs`); the render is otherwise a plain scene's.
    """
    dtype = pipe.unet.dtype
    noise = initial_noise(seed, latent_shape(pipe, width, height), dtype, pipe.unet.device)
    recorder = Recorder(noise, on_step_end)
    out = pipe(
        **text.pipe_kwargs(),
        latents=noise,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="latent",
        return_dict=False,
        callback_on_step_end=recorder,
        **(extra or {}),
    )
    latents: torch.Tensor = out[0]
    trajectory = torch.cat(recorder.latents)
    ref = Reference(
        character=character,
        source="generated",
        width=width,
        height=height,
        steps=steps,
        dtype=str(dtype).removeprefix("torch."),
        latents=to_numpy(trajectory),
        **text.arrays(),
    )
    return latents, ref


def fit_picture(picture: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
    """A bundle's picture at the scenes' size: scaled to cover it and centre-cropped, never
    stretched (as a scene's own picture is fitted); this is the published portrait too."""
    rgb = PIL.ImageOps.exif_transpose(picture).convert("RGB")
    return PIL.ImageOps.fit(rgb, (width, height), method=PIL.Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def encode_picture(pipe: Any, picture: PIL.Image.Image, width: int, height: int) -> torch.Tensor:
    """The picture (already fitted to width×height) as a UNet-space latent, deterministically.

    The distribution's mode, not a sample (diffusers' img2img samples it with a generator): the
    same picture always gives the same latent. Scaled as diffusers 0.42's SDXL img2img
    `prepare_latents` does (latents_mean/std when the VAE config has them, else scaling_factor).
    """
    if picture.size != (width, height):
        raise ValueError(f"picture is {picture.size[0]}×{picture.size[1]}, expected {width}×{height}")
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(picture.convert("RGB"), height=height, width=width)
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latent = vae.encode(pixels).latent_dist.mode()
    if not bool(torch.isfinite(latent).all()):
        raise ValueError(
            f"the VAE's encoding of the picture is not finite in {vae.dtype} (keep the VAE in fp32)"
        )
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        m = torch.tensor(mean).view(1, -1, 1, 1).to(latent.device, latent.dtype)
        s = torch.tensor(std).view(1, -1, 1, 1).to(latent.device, latent.dtype)
        latent = (latent - m) * cfg.scaling_factor / s
    else:
        latent = latent * cfg.scaling_factor
    return latent.to(pipe.unet.dtype)


def reference_from_picture(
    pipe: Any,
    character: str,
    picture: PIL.Image.Image,
    text: TextConditioning,
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
) -> Reference:
    """A bundle picture as a reference: its latent noised to each step's sigma with the seed's noise."""
    x0 = encode_picture(pipe, picture, width, height).float()
    noise = initial_noise(seed, tuple(x0.shape), torch.float32, x0.device)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a private copy: state untouched
    scheduler.set_timesteps(steps, device=x0.device)
    sigmas = scheduler.sigmas.to(device=x0.device, dtype=torch.float32)
    if len(sigmas) != steps + 1:
        raise ValueError(f"scheduler {type(scheduler).__name__} has no sigma per step")
    trajectory = torch.cat([x0 + sigmas[i] * noise for i in range(steps)] + [x0])
    dtype = pipe.unet.dtype
    return Reference(
        character=character,
        source="picture",
        width=width,
        height=height,
        steps=steps,
        dtype=str(dtype).removeprefix("torch."),
        latents=to_numpy(trajectory.to(dtype)),
        **text.arrays(),
    )
