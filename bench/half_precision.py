"""A GPU's default precision (fp16) against the CPU's fp32, on the tiny model, on the CPU.

    .venv/bin/python bench/half_precision.py [--images 8] [--width 128 --height 96 --steps 6]

The same scenes (seeds, prompts of one to three 77-token chunks) are made in fp32 and in fp16
(`model.dtype = "float16"`) through the daemon's own generator, over the tiny model's VAE and
over a copy made to overflow in fp16 (`tiny.overflow_in_fp16`). Per row: how far the fp16
pictures are from the fp32 ones (max and mean |difference| per 8-bit channel), how often the
decode was retried in fp32, and whether a picture came out black. No timings: fp16 on a CPU
is emulated, and its speed says nothing of a GPU's (bench/sdxl.py, on the device). What this
can and cannot say about a GPU is in bench/README.md ("fp16 on the CPU").
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.images.sdxl import SdxlGenerator
from pipeline.images.seam import SceneRequest
from pipeline.images.tiny import build_tiny_pipeline
from pipeline.settings import Settings, settings_from_dict

PROMPTS = ["a lighthouse at dusk", "a quiet harbour, boats, gulls, " * 4, "rain over the old town, " * 9]


@dataclass
class Row:
    name: str
    pictures: list[np.ndarray]
    retries: int
    vae_dtype: str


def settings(model: Path, dtype: str, upcast: str, args: argparse.Namespace) -> Settings:
    tiny = {"source": "tiny", "device": "cpu", "tiny_dir": str(model), "warmup": False, "dtype": dtype}
    image = {"width": args.width, "height": args.height, "steps": args.steps, "vae_upcast": upcast}
    return settings_from_dict({"model": tiny, "image": image}, model.parent)


def run(name: str, s: Settings, args: argparse.Namespace) -> Row:
    gen = SdxlGenerator(s)
    pictures, retries, vae_dtype = [], 0, str(gen.describe()["vae_dtype"])
    for i in range(args.images):
        req = SceneRequest(
            prompt=PROMPTS[i % len(PROMPTS)],
            negative="blurry",
            seed=100 + i,
            width=args.width,
            height=args.height,
            steps=args.steps,
            guidance=6.0,
        )
        out = gen.generate(req)
        pictures.append(np.asarray(out.image.convert("RGB"), dtype=np.int16))
        retries += bool(out.info["vae_nan_fp32_retry"])
    gen.close()
    return Row(name, pictures, retries, vae_dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, overflowing = Path(tmp) / "tiny", Path(tmp) / "tiny-overflowing"
        build_tiny_pipeline(plain)
        build_tiny_pipeline(overflowing, vae_overflows_in_fp16=True)
        base = run("fp32 (the CPU's default)", settings(plain, "float32", "auto", args), args)
        over = run("overflowing VAE: fp32", settings(overflowing, "float32", "auto", args), args)
        rows = [
            (base, base),
            (run("fp16, VAE upcast auto", settings(plain, "float16", "auto", args), args), base),
            (run("fp16, VAE in fp16 (upcast off)", settings(plain, "float16", "off", args), args), base),
            (over, over),
            (run("overflowing VAE: fp16, auto", settings(overflowing, "float16", "auto", args), args), over),
        ]
    size = f"{args.width}x{args.height}"
    print(f"\ntiny model on the CPU, {size}, {args.steps} steps, {args.images} images (1-3 prompt chunks)\n")
    print("| run | VAE dtype | max abs diff vs its fp32 | mean abs diff | fp32 retries | black |")
    print("|---|---|---:|---:|---:|---:|")
    for row, ref in rows:
        diffs = [np.abs(a - b) for a, b in zip(row.pictures, ref.pictures, strict=True)]
        black = sum(p.std() < 1 for p in row.pictures)
        print(
            f"| {row.name} | {row.vae_dtype} | {max(int(d.max()) for d in diffs)} | "
            f"{np.mean([d.mean() for d in diffs]):.3f} | {row.retries}/{args.images} | {black} |"
        )


if __name__ == "__main__":
    main()
