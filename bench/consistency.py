"""What keeping characters the same costs: seconds per scene and peak memory for 0, 1 and 2 references.

Each row makes the same scene (denoising only: the VAE decode is the same in every row) with
0, 1 or 2 character references in view, on the fly (a reference pass per reference per step)
and cached (each reference's keys/values kept from the first scene on). The ratio column is
the row's denoising time over the plain scene's: the issue's targets, on a GPU at 1024×768 and
30 steps, are <= 2.1 for one reference and <= 1.3 cached, and everything within 24 GB.

    .venv/bin/python bench/consistency.py                       # the tiny model, 64×48, 4 steps
    .venv/bin/python bench/consistency.py --model sdxl          # SDXL base 1.0's architecture, random
                                                                # weights: 1024×768, 30 steps on CUDA
    .venv/bin/python bench/consistency.py --model sdxl --size 128x96 --steps 2 --dtype bfloat16

`run(...)` returns the table as data, for a GPU visit to call. Off CUDA the numbers only show
that the benchmark runs (and peak memory is not measured there: "-").
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/sdxl.py, when run from anywhere

from pipeline.images.consistency.attention import SharedAttention
from pipeline.images.consistency.record import TextConditioning, initial_noise, latent_shape, record_portrait
from pipeline.images.consistency.reference import Reference
from pipeline.images.consistency.replay import KVCache, references_in_view
from pipeline.images.device import GIB, DeviceOps
from pipeline.images.model import SdxlPipeline, quiet_libraries

GUIDANCE = 6.0
SCENE = "a harbour at dawn, two people on the quay, fishing boats, gulls"
CAST = {
    "Mara": "a woman in her sixties, silver braid, yellow raincoat",
    "Tom": "a tall fisherman with a red beard, navy sweater",
}
# (label, references, cache: None | "device" | "host", stop the reference pass after its last shared layer)
ROWS: list[tuple[str, int, str | None, bool]] = [
    ("plain scene (0 references)", 0, None, True),
    ("1 reference", 1, None, True),
    ("2 references", 2, None, True),
    ("1 reference, cached on the device", 1, "device", True),
    ("2 references, cached on the device", 2, "device", True),
    ("1 reference, cached in host memory", 1, "host", True),
    ("1 reference, whole reference pass", 1, None, False),
]


def build(model: str, device: torch.device, dtype: torch.dtype) -> SdxlPipeline:
    from diffusers import EulerDiscreteScheduler

    if model == "tiny":
        from pipeline.images.tiny import tiny_pipeline

        pipe = tiny_pipeline().to(device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        from sdxl import random_sdxl

        pipe = random_sdxl(device, dtype)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(pipe: SdxlPipeline, prompt: str, device: torch.device) -> TextConditioning:
    pe, npe, po, npo = pipe.encode_prompt(
        prompt=prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt="blurry",
    )
    return TextConditioning(pe, npe, po, npo)


class Bench:
    def __init__(self, pipe: SdxlPipeline, ops: DeviceOps, width: int, height: int, steps: int) -> None:
        self.pipe, self.ops = pipe, ops
        self.width, self.height, self.steps = width, height, steps
        self.shared = SharedAttention(pipe.unet)
        self.text = encode(pipe, SCENE, ops.device)
        self.refs: list[Reference] = []
        t0 = time.perf_counter()
        for i, (who, looks) in enumerate(CAST.items()):
            _, ref = record_portrait(
                pipe,
                who,
                encode(pipe, f"{who}, {looks}", ops.device),
                seed=100 + i,
                width=width,
                height=height,
                steps=steps,
                guidance=GUIDANCE,
            )
            self.refs.append(ref)
        self.portrait_s = (time.perf_counter() - t0) / len(CAST)

    def scene(self, refs: list[Reference], cache: KVCache | None, stop_early: bool) -> float:
        pipe, ops = self.pipe, self.ops
        noise = initial_noise(11, latent_shape(pipe, self.width, self.height), pipe.unet.dtype, ops.device)
        call = {
            **self.text.pipe_kwargs(),
            "latents": noise,
            "width": self.width,
            "height": self.height,
            "num_inference_steps": self.steps,
            "guidance_scale": GUIDANCE,
            "output_type": "latent",
            "return_dict": False,
        }
        ops.synchronize()
        t0 = time.perf_counter()
        if refs:
            with references_in_view(
                pipe,
                self.shared,
                refs,
                width=self.width,
                height=self.height,
                steps=self.steps,
                guidance=GUIDANCE,
                cache=cache,
                stop_early=stop_early,
            ) as extra:
                pipe(**call, **extra)
        else:
            pipe(**call)
        ops.synchronize()
        return time.perf_counter() - t0

    def row(self, n_refs: int, cached: str | None, stop_early: bool, repeats: int) -> dict[str, Any]:
        refs = self.refs[:n_refs]
        cache = KVCache(max_bytes=1 << 62, host=cached == "host") if cached else None
        self.scene(refs, cache, stop_early)  # warm-up (and, cached, the pass that fills the cache)
        self.ops.empty_cache()
        self.ops.reset_peak()
        times = [self.scene(refs, cache, stop_early) for _ in range(repeats)]
        peak = self.ops.peak_memory_bytes()
        return {
            "s/scene": min(times),  # best of N: this box is shared; a GPU's runs barely differ
            "peak GiB": peak / GIB if peak else None,
            "cache GiB": cache.bytes / GIB if cache is not None else None,
        }


def _with_torch_grad_off(fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapped


@_with_torch_grad_off
def run(
    model: str = "tiny",
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    repeats: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    rows: Sequence[str] | None = None,
    pipe: SdxlPipeline | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every row (or those named in `rows`), as data:
    {"meta": {...}, "rows": [{"row", "s/scene", "ratio", "peak GiB", ...}]}.

    `pipe`: a pipeline already built (the GPU visit's); `on_row` is told each row as it is measured
    (its ratio against the plain scene, the first row), so a run cut short keeps what it had.
    """
    quiet_libraries()
    ops = DeviceOps(device)
    cuda = ops.device.type == "cuda"
    full = cuda and model == "sdxl"
    width, height = size or ((1024, 768) if full else (256, 192) if model == "sdxl" else (64, 48))
    steps = steps or (30 if full else 4)
    repeats = repeats or (3 if cuda else 2)
    torch_dtype = getattr(torch, dtype) if dtype else ops.dtype
    t0 = time.perf_counter()
    pipe = pipe if pipe is not None else build(model, ops.device, torch_dtype)
    built = time.perf_counter() - t0
    bench = Bench(pipe, ops, width, height, steps)
    chosen = [r for r in ROWS if rows is None or r[0] in rows]
    if not chosen or chosen[0][1] != 0:
        raise ValueError("the rows start with the plain scene: every ratio is against it")
    measured = []
    for label, n_refs, cached, stop_early in chosen:
        result = {"row": label, **bench.row(n_refs, cached, stop_early, repeats=repeats)}
        result["ratio"] = result["s/scene"] / (measured[0] if measured else result)["s/scene"]
        measured.append(result)
        print(f"  {label}: {result['s/scene']:.3f} s/scene", flush=True)
        if on_row is not None:
            on_row(result)
    meta = {
        "model": model,
        "device": ops.name,
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "size": f"{width}x{height}",
        "steps": steps,
        "repeats": repeats,
        "build_s": built,
        "portrait_s": bench.portrait_s,
        "shared_layers": len(bench.shared.layers),
        "reference_mb": bench.refs[0].nbytes / 1e6,
        "representative": full,
    }
    return {"meta": meta, "rows": measured}


def _unet_for_flops(model: str) -> Any:
    """The UNet alone, weights on the meta device for SDXL (counting needs shapes, not numbers)."""
    if model == "tiny":
        from pipeline.images.tiny import _unet

        return _unet()
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from sdxl import SDXL_UNET

    with init_empty_weights():
        return UNet2DConditionModel(**SDXL_UNET)


@_with_torch_grad_off
def flop_ratios(
    model: str = "sdxl", size: tuple[int, int] = (1024, 768), tokens: int = 77
) -> dict[str, float]:
    """Each row's UNet FLOPs per step over a plain scene's, counted by torch's FlopCounterMode.

    Runs anywhere in seconds (SDXL on the meta device: no weights, no memory): what the GPU
    timings should come near where the UNet is compute-bound, as SDXL at 1024×768 is.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.images.consistency.attention import CaptureComplete

    unet = _unet_for_flops(model)
    device = next(unet.parameters()).device
    shared = SharedAttention(unet)
    cfg = unet.config
    width, height = size
    x = torch.zeros(2, cfg.in_channels, height // 8, width // 8, device=device)
    text = torch.zeros(2, tokens, cfg.cross_attention_dim, device=device)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {
        "text_embeds": torch.zeros(2, pooled, device=device),
        "time_ids": torch.zeros(2, 6, device=device),
    }
    t = torch.tensor(999, device=device)

    def count(fn: Any) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return int(counter.get_total_flops())

    def reference_pass(stop: bool) -> int:
        def one() -> None:
            with shared.capturing(stop) as got:
                with contextlib.suppress(CaptureComplete):
                    unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)
                captured.update(got)

        return count(one)

    def scene(n: int) -> int:
        def one() -> None:
            shared.load([captured] * n)
            with shared.sharing():
                unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added)

        return count(one)

    captured: dict[str, Any] = {}
    plain = count(lambda: unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added))
    early, whole = reference_pass(True), reference_pass(False)
    s1, s2 = scene(1), scene(2)
    kv_bytes = 2 * sum(k.numel() + v.numel() for k, v in captured.values())  # fp16, both guidance halves
    return {
        "plain TFLOP/step": plain / 1e12,
        "1 reference": (early + s1) / plain,
        "2 references": (2 * early + s2) / plain,
        "1 reference, cached": s1 / plain,
        "2 references, cached": s2 / plain,
        "1 reference, whole reference pass": (whole + s1) / plain,
        "reference keys/values per step, fp16 MB": kv_bytes / 1e6,
    }


def print_flops(model: str, size: tuple[int, int], ratios: dict[str, float]) -> None:
    print(
        f"\nUNet FLOPs per step, {model} at {size[0]}×{size[1]} "
        "(torch FlopCounterMode; a count, not a timing):"
    )
    for key, value in ratios.items():
        print(f"  {key:<42} {value:8.3f}")


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(result: dict[str, Any]) -> None:
    m = result["meta"]
    note = (
        ""
        if m["representative"]
        else "   (not the GPU target setting: shows the bench runs, measures nothing)"
    )
    print(
        f"\n{m['model']} on {m['device']}, {m['dtype']}, {m['size']}, {m['steps']} steps, best of "
        f"{m['repeats']}; {m['shared_layers']} shared layers; a reference is {m['reference_mb']:.2f} MB; "
        f"portrait (once per character) {m['portrait_s']:.3f} s{note}"
    )
    cols = ["s/scene", "ratio", "peak GiB", "cache GiB"]
    width = max(len(r["row"]) for r in result["rows"])
    print(f"{'row':<{width}}  " + "  ".join(f"{c:>10}" for c in cols))
    for r in result["rows"]:
        print(f"{r['row']:<{width}}  " + "  ".join(f"{fmt(r.get(c)):>10}" for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sdxl"], default="tiny")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu", "mps"])
    ap.add_argument("--size", default=None, help="WxH (default: 1024x768 for sdxl on CUDA)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: fp16 on CUDA)")
    ap.add_argument(
        "--flops-only", action="store_true", help="only count FLOPs (SDXL at --size, default 1024x768)"
    )
    args = ap.parse_args()
    size = tuple(int(x) for x in args.size.split("x")) if args.size else None
    if not args.flops_only:
        print_table(run(args.model, size, args.steps, args.repeats, args.device, args.dtype))  # type: ignore[arg-type]
    flop_size = size or (1024, 768)
    print_flops("sdxl", flop_size, flop_ratios("sdxl", flop_size))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
