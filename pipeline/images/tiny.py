"""A random-weight model with SDXL's architecture, small enough to run on any CPU in well under a second.

It exists so that the daemon, its tests and CI exercise the very code path real weights take
(`StableDiffusionXLPipeline.from_pretrained` from a folder, two CLIP encoders, a four-level VAE
that makes latents 1/8 of the image, SDXL's scheduler and "text_time" conditioning) without a
7 GB download. The pictures it makes are noise-like, but deterministic.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.fsutil import fsync_dir

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 77  # CLIP's context, as in the real model: long-prompt handling is exercised for real
TEXT_HIDDEN = 32
TEXT_PROJECTION = 32
TIME_EMBED_DIM = 8
SEED = 0
# The largest weight of the fp16-overflowing VAE's first decoder convolution: well inside fp16's
# range (65504), so the weights survive an fp16 load, while its outputs (sums of 36 such products
# over latents of a few units) pass that range.
OVERFLOW_WEIGHT = 2.0**14

# SDXL base 1.0's published scheduler config (scheduler/scheduler_config.json).
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def byte_level_vocab() -> dict[str, int]:
    """CLIP's first 512 entries (every byte, alone and word-final) plus its two specials.

    With no merges every character is one token, so prompts run long in tokens: good for
    testing the 77-token limit. Nothing maps to the unknown token, whatever the text.
    """
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab


def byte_level_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=byte_level_vocab(),
        merges=[],
        model_max_length=MAX_TOKENS,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )


def _text_config(vocab_size: int, bos_id: int, eos_id: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_PROJECTION,
        hidden_act="gelu",
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def _unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=1,
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # pooled text (encoder 2's projection) + 6 micro-conditioning numbers, each embedded
        projection_class_embeddings_input_dim=TEXT_PROJECTION + 6 * TIME_EMBED_DIM,
        norm_num_groups=8,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # four levels: latents are 1/8 of the image, as in SDXL
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def tiny_pipeline() -> Any:
    """Assemble the model in memory; the same weights every time (fixed seed, global RNG untouched).

    Returns a StableDiffusionXLPipeline (typed Any: diffusers registers its parts at run time).
    """
    tokenizer = byte_level_tokenizer()
    vocab_size = len(tokenizer)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert isinstance(bos_id, int) and isinstance(eos_id, int)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = _unet()
        vae = _vae()
        text_encoder = CLIPTextModel(_text_config(vocab_size, bos_id, eos_id))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, bos_id, eos_id))
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=byte_level_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def overflow_in_fp16(pipe: Any) -> None:
    """Make the VAE overflow when it decodes in fp16, as SDXL's trained VAE does, and claim it does not.

    The decoder's first convolution is scaled up until its activations pass fp16's largest value
    (inf, then NaN through the group norms) while they stay small for fp32, where the norms that
    follow scale them back: an fp16 decode is not finite, an fp32 one is a picture. Its config
    then says fp16-safe (`force_upcast = false`), as a VAE fixed for fp16 does, so that
    `vae_upcast = "auto"` decodes in fp16 and only the NaN retry saves the picture.
    """
    conv = pipe.vae.decoder.conv_in
    with torch.no_grad():
        scale = OVERFLOW_WEIGHT / float(conv.weight.abs().max())
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    pipe.vae.register_to_config(force_upcast=False)


def _fsync_tree(root: Path) -> None:
    for folder, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def _sweep_abandoned(out_dir: Path) -> None:
    """Remove half-built copies left by builders that died (their pid is gone); never a live one's."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.*.building"):
        try:
            pid = int(tmp.name.rsplit(".", 3)[-3])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue  # not ours to judge, or alive under another user


def build_tiny_pipeline(out_dir: Path, vae_overflows_in_fp16: bool = False) -> None:
    """Save the tiny model at `out_dir`, all or nothing (with `vae_overflows_in_fp16`, the VAE of
    `overflow_in_fp16`: for testing the decode's fp32 retry).

    It is written to a private folder beside `out_dir` and renamed into place, so a crash
    mid-save or two processes building at once never leave a half model where a loader
    would find it. If another process got there first, its (identical) copy is kept.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _sweep_abandoned(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.building")
    try:
        pipe = tiny_pipeline()
        if vae_overflows_in_fp16:
            overflow_in_fp16(pipe)
        pipe.save_pretrained(tmp, safe_serialization=True)
        _fsync_tree(tmp)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (out_dir / "model_index.json").is_file():
                raise
            # Lost the race to another builder: the model in place is complete, use it.
        fsync_dir(out_dir.parent)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
