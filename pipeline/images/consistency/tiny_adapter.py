"""A random-weight IP-Adapter "plus" and CLIP vision encoder, saved in h94/IP-Adapter's layout.

So that the adapter path (folder checks, diffusers' `load_ip_adapter`, encoding, scale) runs for
real in tests without the 1 GB download. Files and key names are the published ones:

    FOLDER/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors   "image_proj.*" + "ip_adapter.*"
    FOLDER/models/image_encoder/config.json, model.safetensors   CLIPVisionModelWithProjection

The keys are the original IP-Adapter Resampler's (`layers.N.0.to_kv` ...), which diffusers'
loader renames on the way in; `original_key` is that renaming reversed (as diffusers' own tests
build such a file, `create_ip_adapter_plus_state_dict` in
tests/models/unets/test_models_unet_2d_condition.py, diffusers 0.42, Apache-2.0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

WEIGHTS = "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
ENCODER = "models/image_encoder"
VISION_HIDDEN = 32
QUERIES = 4  # image tokens per picture (16 in the real plus adapter)
SEED = 1

_LAYER_KEYS = {
    "ln0.weight": "0.norm1.weight",
    "ln0.bias": "0.norm1.bias",
    "ln1.weight": "0.norm2.weight",
    "ln1.bias": "0.norm2.bias",
    "attn.to_q.weight": "0.to_q.weight",
    "attn.to_out.0.weight": "0.to_out.weight",
    "ff.0.weight": "1.0.weight",
    "ff.0.bias": "1.0.bias",
    "ff.1.net.0.proj.weight": "1.1.weight",
    "ff.1.net.2.weight": "1.3.weight",
}


def original_key(key: str) -> str:
    """A diffusers IPAdapterPlusImageProjection key as the original Resampler names it."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None:
        return key  # latents, proj_in, proj_out, norm_out: the same in both
    if m.group(2) not in _LAYER_KEYS:
        raise KeyError(f"no original name known for {key}")
    return f"layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}"


def _image_proj(cross_attention_dim: int) -> dict[str, torch.Tensor]:
    proj = IPAdapterPlusImageProjection(
        embed_dims=VISION_HIDDEN,
        output_dims=cross_attention_dim,
        hidden_dims=VISION_HIDDEN,
        depth=4,  # what diffusers' loader builds for every plus adapter
        dim_head=64,  # the loader infers heads as to_q's width // 64
        heads=1,
        num_queries=QUERIES,
    )
    sd = proj.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("attn.to_k.weight"):
            v = sd[key.replace("to_k", "to_v")]
            out[
                original_key(key.replace("attn.to_k.weight", "attn.to_q.weight")).replace("to_q", "to_kv")
            ] = torch.cat([value, v])
        elif not key.endswith("attn.to_v.weight"):
            out[original_key(key)] = value
    return out


def _ip_layers(unet: Any) -> dict[str, torch.Tensor]:
    """to_k_ip/to_v_ip per cross-attention layer, numbered 1, 3, 5 ... in processor order."""
    out: dict[str, torch.Tensor] = {}
    key_id = 1
    blocks = list(unet.config.block_out_channels)
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(blocks))[int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(
            hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim
        ).state_dict()
        out[f"{key_id}.to_k_ip.weight"] = sd["to_k_ip.0.weight"]
        out[f"{key_id}.to_v_ip.weight"] = sd["to_v_ip.0.weight"]
        key_id += 2
    return out


def _encoder() -> CLIPVisionModelWithProjection:
    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=VISION_HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=VISION_HIDDEN,
        )
    )


def build_tiny_ip_adapter(folder: Path, unet: Any) -> Path:
    """Write the adapter for `unet` (its cross-attention layers) and the encoder into `folder`."""
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        tensors = {f"image_proj.{k}": v for k, v in _image_proj(unet.config.cross_attention_dim).items()}
        tensors.update({f"ip_adapter.{k}": v for k, v in _ip_layers(unet).items()})
        encoder = _encoder()
    (folder / WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    encoder.save_pretrained(folder / ENCODER, safe_serialization=True)
    return folder
