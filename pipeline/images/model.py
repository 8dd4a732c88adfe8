"""Finding and loading the SDXL weights, offline, with an actionable error when they are absent.

storyreel never downloads: a daemon that fetches 7 GB at start-up, or silently from a
different revision, is a daemon nobody can reason about. Weights come from the local
Hugging Face cache, from a folder, or are the built-in tiny model, and all three go through
the same `StableDiffusionXLPipeline.from_pretrained` call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from transformers.utils import logging as transformers_logging

from pipeline.errors import ModelNotFound
from pipeline.images.device import DeviceOps
from pipeline.images.tiny import build_tiny_pipeline
from pipeline.settings import Settings

# A diffusers StableDiffusionXLPipeline. Typed Any because its components (unet, vae, ...) and most
# methods are registered at run time, invisible to mypy, which would flag every use.
SdxlPipeline: TypeAlias = Any

WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
_VARIANT_FILE = re.compile(r"\.fp16[.-]")


@dataclass(frozen=True)
class ModelLocation:
    """Where the weights were found: what describe() reports, so a manifest pins the exact model."""

    source: str
    folder: Path | None  # None for a pipeline built in memory
    revision: str | None  # the snapshot's commit hash for hub models
    variant: str | None


def _is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith(".")


# What `hf download` needs to fetch: configs, tokenizers and the fp16 weights, nothing else
# (the repository also holds single-file checkpoints and ONNX exports, many GB more).
DOWNLOAD_FILES = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*",
    "tokenizer_2/*",
    "*/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "text_encoder/model.fp16.safetensors",
    "text_encoder_2/model.fp16.safetensors",
)


def _download_hint(repo_id: str, revision: str | None) -> str:
    """The command in the README, with this process's HF_HOME: fill it elsewhere, copy it here."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f'"{f}"' for f in DOWNLOAD_FILES)
    return (
        "To get them, on a machine with network access run\n"
        f"    HF_HOME={hf_constants.HF_HOME} hf download {repo_id}{rev} --include {include}\n"
        "(older huggingface_hub: `huggingface-cli download` with the same arguments), then copy that\n"
        f"folder to {hf_constants.HF_HOME} here, or set HF_HOME (or HF_HUB_CACHE) for the daemon to\n"
        "where the cache lives, or set model.source to a folder holding the model in diffusers layout\n"
        "(pipe.save_pretrained). The fp16 files serve GPU and CPU alike; the fp32 files\n"
        "(same names without .fp16) are used on CPU when present."
    )


def _has_weights(component: Path, variant: str | None) -> bool:
    files = [f.name for f in component.glob("*.safetensors")]
    if variant == "fp16":
        return any(_VARIANT_FILE.search(f) for f in files)
    return any(not _VARIANT_FILE.search(f) for f in files)


def pick_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """fp16 files for an fp16 model (half the disk read), full ones for fp32; else whichever exists."""
    order: list[str | None] = ["fp16", None] if dtype == torch.float16 else [None, "fp16"]
    for variant in order:
        if all(_has_weights(folder / c, variant) for c in WEIGHTED):
            return variant
    missing = [c for c in WEIGHTED if not any(_has_weights(folder / c, v) for v in order)]
    raise ModelNotFound(f"{folder}: no safetensors weights for {', '.join(missing)}")


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    try:
        return Path(snapshot_download(repo_id=repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"model {repo_id!r} (revision {revision or 'main'}) is not in the local Hugging Face cache "
            f"at {hf_constants.HF_HUB_CACHE} (nor is there a folder {Path(repo_id).absolute()}): "
            f"{type(err).__name__}. storyreel never downloads weights.\n" + _download_hint(repo_id, revision)
        ) from None


def locate_model(settings: Settings, dtype: torch.dtype) -> ModelLocation:
    """Resolve model.source to a folder on disk, building the tiny model on first use."""
    source = settings.model.source
    if source == "tiny":
        folder = settings.tiny_dir
        if not (folder / "model_index.json").is_file():
            build_tiny_pipeline(folder)
        return ModelLocation(source, folder, None, None)
    folder = Path(source).expanduser()
    if folder.is_dir():
        if not (folder / "model_index.json").is_file():
            raise ModelNotFound(f"{folder}: not a diffusers model folder (no model_index.json)")
        return ModelLocation(source, folder, None, pick_variant(folder, dtype))
    if not _is_hub_id(source):
        raise ModelNotFound(
            f"model.source {source!r}: no such folder ({folder.absolute()}). Copy the model there "
            "(diffusers layout, as written by save_pretrained), or name a hub id such as "
            "'stabilityai/stable-diffusion-xl-base-1.0' that is in the local Hugging Face cache."
        )
    snapshot = _hub_snapshot(source, settings.model.revision)
    try:
        variant = pick_variant(snapshot, dtype)
    except ModelNotFound as err:
        raise ModelNotFound(
            f"model {source!r} is only partly in the cache: {err}\n"
            + _download_hint(source, settings.model.revision)
        ) from None
    return ModelLocation(source, snapshot, snapshot.name, variant)


def quiet_libraries() -> None:
    """Progress bars are for terminals; under systemd they are journal noise (we log progress ourselves)."""
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    # "Token indices sequence length is longer than ... 77": we count tokens on purpose (long
    # prompts are encoded in chunks, and the manifest records the counts), so it is noise.
    transformers_logging.set_verbosity_error()


def from_folder(location: ModelLocation, dtype: torch.dtype) -> SdxlPipeline:
    assert location.folder is not None
    kwargs: dict[str, Any] = {"variant": location.variant} if location.variant else {}
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(
            location.folder,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            add_watermarker=False,  # no invisible-watermark dependency; frames are our own
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ModelNotFound(
            f"{location.folder}: the model could not be loaded ({type(err).__name__}: {err}). "
            "It is incomplete or not an SDXL model; fetch it again (see the README)."
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_located(settings: Settings, device_ops: DeviceOps) -> tuple[SdxlPipeline, ModelLocation]:
    """Load the configured model in the device's dtype (still on the CPU; the generator places it)."""
    quiet_libraries()
    location = locate_model(settings, device_ops.dtype)
    return from_folder(location, device_ops.dtype), location


def load_pipeline(settings: Settings, device_ops: DeviceOps) -> SdxlPipeline:
    return load_located(settings, device_ops)[0]
