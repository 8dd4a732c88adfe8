"""Photographic finishing of a raw SDXL image: sharpen, contrast, brightness, grain.

SDXL base renders slightly soft and noise-free, which reads as "CG". A light
unsharp mask and a touch of luminance grain make it read as a photograph. The
grain is seeded from the scene seed, so finishing is as reproducible as the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.settings import FinishSettings


def finish(image: Image.Image, seed: int, settings: FinishSettings) -> Image.Image:
    out = image.convert("RGB")
    if settings.sharpen > 0:
        percent = round(settings.sharpen * 100)
        out = out.filter(
            ImageFilter.UnsharpMask(radius=settings.sharpen_radius, percent=percent, threshold=2)
        )
    if settings.contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(settings.contrast)
    if settings.brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(settings.brightness)
    if settings.grain > 0:
        out = add_grain(out, seed, settings.grain)
    return out


def add_grain(image: Image.Image, seed: int, strength: float) -> Image.Image:
    """Monochrome (luminance) Gaussian grain, like film, not per-channel colour noise."""
    pixels = np.asarray(image, dtype=np.float32)
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, strength, size=pixels.shape[:2]).astype(np.float32)
    pixels = pixels + noise[:, :, None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def finishing_record(settings: FinishSettings, seed: int) -> dict[str, Any]:
    return {**settings.model_dump(), "grain_seed": seed}
