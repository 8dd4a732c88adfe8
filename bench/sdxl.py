"""How fast is one SDXL image, and what does each speed-up buy? Random weights, real architecture.

Builds SDXL base 1.0's exact architecture (UNet 2.6 B, CLIP ViT-L and OpenCLIP bigG text
encoders, the 4-level VAE) from its published configs with random weights, so it needs no
download, and runs it through the same `SdxlGenerator` code path as the daemon. Random weights
do the same arithmetic as trained ones, so the timings transfer; the pictures are noise.

    .venv/bin/python bench/sdxl.py [--device auto] [--size 1024x768] [--steps 30] [--repeats 3]

On CUDA: 1024×768, 30 steps, every row (the compile row takes minutes to compile). On a CPU it
falls back to 256×192 and 2 steps with fewer rows, labelled "CPU, not representative": only a
check that the benchmark works, not a measure of anything a GPU box will see.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipeline.images.device import GIB, DeviceOps
from pipeline.images.model import ModelLocation, SdxlPipeline, quiet_libraries
from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.seam import SceneRequest
from pipeline.images.tiny import SDXL_SCHEDULER, byte_level_tokenizer
from pipeline.settings import Settings

CLIP_VOCAB = 49408  # the real embedding table; the byte-level tokenizer uses only its first 514 rows

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,  # 768 (ViT-L) + 1280 (bigG), concatenated
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 1280 pooled + 6 × 256 micro-conditioning
    "norm_num_groups": 32,
}
# text_encoder/config.json (CLIP ViT-L/14) and text_encoder_2/config.json (OpenCLIP ViT-bigG/14)
SDXL_TEXT_1: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_2: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
# vae/config.json
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def materialize(model: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Give a model built on the meta device real random weights, directly on `device`.

    Skips the per-layer init schemes (minutes of CPU for 3.5 B parameters): norms get 1/0,
    biases 0, everything else N(0, 0.02), which keeps activations finite through 70 blocks.
    """
    g = torch.Generator(device=device).manual_seed(0)
    for mod_name, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm | nn.GroupNorm)
        for p_name, param in list(module.named_parameters(recurse=False)):
            value = torch.empty(param.shape, device=device, dtype=dtype)
            if p_name == "bias":
                value.zero_()
            elif is_norm:
                value.fill_(1.0)
            else:
                value.normal_(0.0, 0.02, generator=g)
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            set_module_tensor_to_device(model, full, device, value=value, dtype=dtype)
    return model.to(device)  # buffers (position ids) were built for real on the CPU


def random_sdxl(device: torch.device, dtype: torch.dtype) -> SdxlPipeline:
    tokenizer = byte_level_tokenizer()
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    common = {
        "vocab_size": CLIP_VOCAB,
        "max_position_embeddings": 77,
        "pad_token_id": ids["eos_token_id"],
        **ids,
    }
    with init_empty_weights():
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
        te1 = CLIPTextModel(CLIPTextConfig(**SDXL_TEXT_1, **common))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2, **common))
    return StableDiffusionXLPipeline(
        vae=materialize(vae, device, dtype).eval(),
        text_encoder=materialize(te1, device, dtype).eval(),
        text_encoder_2=materialize(te2, device, dtype).eval(),
        tokenizer=tokenizer,
        tokenizer_2=byte_level_tokenizer(),
        unet=materialize(unet, device, dtype).eval(),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )


def count_params(pipe: SdxlPipeline) -> int:
    return sum(
        p.numel()
        for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
        for p in m.parameters()
    )


@dataclass
class Row:
    name: str
    image: dict[str, Any]  # overrides of [image] settings
    cuda_only: bool = False
    result: dict[str, Any] = field(default_factory=dict)


PLAIN = {"channels_last": "off", "fuse_qkv": "off", "compile": "off", "vae_upcast": "auto"}
ROWS = [
    Row("baseline: SDPA attention, fp32 VAE decode", PLAIN),
    Row("+ channels_last UNet", {**PLAIN, "channels_last": "on"}),
    Row("+ fused QKV projections", {**PLAIN, "fuse_qkv": "on"}),
    Row("VAE decode in fp16 (no upcast)", {**PLAIN, "vae_upcast": "off"}, cuda_only=True),
    Row("storyreel defaults: channels_last + torch.compile UNet", {}, cuda_only=True),
]


def reset(pipe: SdxlPipeline, dtype: torch.dtype) -> None:
    """Undo the previous row's load-time choices, so each row measures one thing (compile runs last)."""
    if getattr(pipe, "fusing_unet", False) or getattr(pipe, "fusing_vae", False):
        pipe.unfuse_qkv_projections()
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    pipe.unet.to(memory_format=torch.contiguous_format)
    if pipe.vae.dtype != dtype:  # a previous row upcast it
        pipe.vae.to(dtype=dtype)


def run_row(row: Row, pipe: SdxlPipeline, device: DeviceOps, args: argparse.Namespace) -> dict[str, Any]:
    reset(pipe, device.dtype)
    image = {"width": args.width, "height": args.height, "steps": args.steps, "guidance": 6.0, **row.image}
    settings = Settings.model_validate({"model": {"device": str(device.device)}, "image": image})
    gen = SdxlGenerator(
        settings, device=device, pipe=pipe, location=ModelLocation("random SDXL", None, None, None)
    )
    t0 = time.perf_counter()
    gen.warm_up()
    warm = time.perf_counter() - t0
    req = SceneRequest(
        "a lighthouse on a cliff at dusk, oil painting", "blurry", 1, args.width, args.height, args.steps, 6.0
    )
    runs = [gen.generate(req) for _ in range(args.repeats)]
    peak = max((r.info["peak_memory_bytes"] or 0) for r in runs)
    total = statistics.median(r.timings["total"] for r in runs)
    denoise = statistics.median(r.timings["denoise"] for r in runs)
    described = gen.describe()
    gen.close()
    gc.collect()
    return {
        "s/image": total,
        "it/s": args.steps / denoise,
        "decode s": statistics.median(r.timings["decode"] for r in runs),
        "peak VRAM GiB": peak / GIB if peak else None,
        "warm-up s": warm,
        "compile": described["compile"],
        "vae": described["vae_dtype"],
        # NaN/black-frame evidence: a retry in fp32 means the fp16 decode overflowed
        "vae_nan_fp32_retry": any(r.info["vae_nan_fp32_retry"] for r in runs),
        "image_std": float(np.asarray(runs[-1].image, dtype=np.float32).std()),
    }


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def print_table(rows: list[Row], device: DeviceOps, args: argparse.Namespace, label: str) -> None:
    cols = ["s/image", "it/s", "decode s", "peak VRAM GiB", "warm-up s", "vae"]
    name_w = max(len(r.name) for r in rows)
    print(
        f"\ndevice: {device.name}   {args.width}×{args.height}, {args.steps} steps, "
        f"median of {args.repeats} after warm-up   {label}"
    )
    print(f"{'row':<{name_w}}  " + "  ".join(f"{c:>13}" for c in cols))
    for r in rows:
        print(f"{r.name:<{name_w}}  " + "  ".join(f"{fmt(r.result.get(c)):>13}" for c in cols))
    for r in rows:
        if r.result.get("compile"):
            print(f"  compile ({r.result['compile']}) + warm-up of '{r.name}': {r.result['warm-up s']:.1f} s")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    ap.add_argument("--size", default=None, help="WxH (default 1024x768 on CUDA, 256x192 elsewhere)")
    ap.add_argument("--steps", type=int, default=None, help="default 30 on CUDA, 2 elsewhere")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 on CUDA, 1 elsewhere")
    ap.add_argument("--all-rows", action="store_true", help="also run the CUDA-only rows off CUDA")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    quiet_libraries()
    device = DeviceOps(args.device)
    cuda = device.device.type == "cuda"
    args.width, args.height = (int(x) for x in (args.size or ("1024x768" if cuda else "256x192")).split("x"))
    args.steps = args.steps or (30 if cuda else 2)
    args.repeats = args.repeats or (3 if cuda else 1)
    label = "" if cuda else "(CPU, not representative)"
    t0 = time.perf_counter()
    pipe = random_sdxl(device.device, device.dtype)
    print(
        f"built random SDXL base 1.0 ({count_params(pipe) / 1e9:.2f} B params, {device.dtype}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    rows = [r for r in ROWS if cuda or args.all_rows or not r.cuda_only]
    for row in rows:
        row.result = run_row(row, pipe, device, args)
        print(f"  {row.name}: {row.result['s/image']:.2f} s/image", flush=True)
    print_table(rows, device, args, label)


if __name__ == "__main__":
    main()
