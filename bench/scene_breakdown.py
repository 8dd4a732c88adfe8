"""Where a scene's time goes, with the tiny model: the figures later speed work starts from.

    .venv/bin/python bench/scene_breakdown.py [--scenes 4] [--width 512 --height 384 --steps 10]

Phases: model load (from disk, through from_pretrained), prompt encoding, denoising,
VAE decode, finishing, PNG + clip, and the story's packaging (film, contact
sheet, manifest, ZIP). Run on the CPU here; the GPU box gets its own table from
bench/sdxl.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.images.sdxl import open_generator
from pipeline.render import StoryJob, render_story
from pipeline.settings import Settings
from pipeline.story import Story


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        s = Settings()
        s.paths.state = root / "state"
        s.model.source, s.model.device = "tiny", "cpu"
        s.image.width, s.image.height, s.image.steps = args.width, args.height, args.steps
        s.video.seconds_per_scene = args.seconds
        open_generator(s).close()  # build the tiny model once; the load below is then from disk
        t0 = time.perf_counter()
        gen = open_generator(s)
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen.warm_up()
        warm = time.perf_counter() - t0
        n = args.scenes
        story = Story.model_validate(
            {
                "seed": 1,
                "scenes": [f"scene {i}: a harbour town at dusk, people walking" for i in range(args.scenes)],
            }
        )
        t0 = time.perf_counter()
        manifest = render_story(StoryJob("bench", story, b"{}", root / "work"), s, gen)
        wall = time.perf_counter() - t0
        gen.close()
    timings = [sc["timings"] for sc in manifest["scenes"]]

    def med(key: str) -> float:
        return statistics.median(t.get(key, 0.0) for t in timings)

    per_scene = {
        "prompt encoding": med("encode"),
        "denoising": med("denoise"),
        "VAE decode": med("decode"),
        "finishing": med("finishing"),
        "PNG + Ken Burns clip": med("save_and_clip"),
    }
    scene_sum = sum(per_scene.values())
    gpu_busy = sum(t.get("total", 0.0) for t in timings)
    size = f"{args.width}x{args.height}"
    print(f"\ntiny model, CPU, {size}, {args.steps} steps, {args.seconds:g}s clips, {n} scenes\n")
    print("| phase | seconds | share of a scene |")
    print("|---|---:|---:|")
    print(f"| model load (from_pretrained, once) | {load:.3f} | |")
    print(f"| warm-up generation (once) | {warm:.3f} | |")
    for name, sec in per_scene.items():
        print(f"| {name} (median per scene) | {sec:.3f} | {sec / scene_sum:.0%} |")
    print(f"| story wall time, {n} scenes overlapped, with film, sheet, manifest, ZIP | {wall:.3f} | |")
    print(f"| of which the generator was idle (last clip, film, sheet, ZIP) | {wall - gpu_busy:.3f} | |")


if __name__ == "__main__":
    main()
