"""Does the GPU wait for the CPU? A story's wall time, overlapped vs serial.

A stand-in generator takes a fixed time per image (the GPU); finishing, PNG
writing and the Ken Burns clip run on the CPU pool while the next image is made.
Target: overlapped wall time <= sum(generation) + one scene's CPU work + 5 %.

    .venv/bin/python bench/overlap.py [--scenes 6] [--gen-seconds 3.0] [--width 1024 --height 768]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.images.seam import GeneratedImage, SceneRequest
from pipeline.prompts import plan_scenes
from pipeline.render import QuietEvents, SoundSetup, StoryJob, render_story
from pipeline.render.records import finish_scene
from pipeline.render.scenes import scene_request
from pipeline.settings import Settings
from pipeline.story import Story


class FixedTimeGenerator:
    """Stands in for the GPU: a photo-like image after exactly `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    def describe(self) -> dict[str, Any]:
        return {"source": "fixed-time stand-in", "seconds": self.seconds}

    def warm_up(self, phase: Any = None) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, req: SceneRequest, on_step: Any = None) -> GeneratedImage:
        t0 = time.perf_counter()
        rng = np.random.default_rng(req.seed)
        y, x = np.mgrid[0 : req.height, 0 : req.width].astype(np.float32)
        base = 128 + 60 * np.sin(x / 37.0 + req.seed) * np.cos(y / 23.0)
        img = np.clip(base[:, :, None] + rng.normal(0, 12, (req.height, req.width, 3)), 0, 255).astype(
            np.uint8
        )
        image = Image.fromarray(img)
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - t0)))
        self.calls += 1
        return GeneratedImage(image=image, timings={"total": self.seconds}, info={})


def settings_for(args: argparse.Namespace, root: Path) -> Settings:
    s = Settings()
    s.paths.state = root
    s.image.width, s.image.height = args.width, args.height
    s.outputs.film = False  # measured on its own: it runs once, after the last scene
    s.outputs.contact_sheet = False
    return s


def serial(job: StoryJob, settings: Settings, gen: FixedTimeGenerator) -> float:
    t0 = time.perf_counter()
    for sub in ("out/images", "out/clips", "records"):
        (job.work / sub).mkdir(parents=True, exist_ok=True)
    for plan in plan_scenes(job.story, job.name, settings):
        finish_scene(job, plan, gen.generate(scene_request(plan, settings)), settings, SoundSetup(None))
    return time.perf_counter() - t0


def one_cpu_scene(job: StoryJob, settings: Settings) -> float:
    plan = plan_scenes(job.story, job.name, settings)[0]
    generated = FixedTimeGenerator(0).generate(scene_request(plan, settings))
    for sub in ("out/images", "out/clips", "records"):
        (job.work / sub).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    finish_scene(job, plan, generated, settings, SoundSetup(None))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=6)
    ap.add_argument("--gen-seconds", type=float, default=3.0)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=768)
    args = ap.parse_args()
    story = Story.model_validate({"seed": 1, "scenes": [f"scene {i}" for i in range(args.scenes)]})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = settings_for(args, root)
        cpu = one_cpu_scene(StoryJob("cpu", story, b"{}", root / "cpu"), settings)
        t_serial = serial(
            StoryJob("serial", story, b"{}", root / "serial"), settings, FixedTimeGenerator(args.gen_seconds)
        )
        gen = FixedTimeGenerator(args.gen_seconds)
        t0 = time.perf_counter()
        render_story(StoryJob("overlap", story, b"{}", root / "overlap"), settings, gen, QuietEvents())
        t_overlap = time.perf_counter() - t0
    total_gen = args.scenes * args.gen_seconds
    target = (total_gen + cpu) * 1.05
    print(
        f"\n{args.scenes} scenes, {args.width}x{args.height}, {settings.video.seconds_per_scene:g}s clips "
        f"at {settings.video.fps} fps, generator {args.gen_seconds:.2f}s/image, CPU work {cpu:.2f}s/scene\n"
    )
    print("| run | wall s | vs sum(generation) |")
    print("|---|---:|---:|")
    print(f"| serial (generate, then finish+clip) | {t_serial:.2f} | {t_serial / total_gen:.2f}x |")
    print(f"| overlapped (storyreel) | {t_overlap:.2f} | {t_overlap / total_gen:.2f}x |")
    print(f"| target: sum(gen) + one scene's CPU + 5% | {target:.2f} | {target / total_gen:.2f}x |")
    print(f"\nspeed-up {t_serial / t_overlap:.2f}x; target {'MET' if t_overlap <= target else 'MISSED'}")
    if cpu > args.gen_seconds:
        print(
            "note: one scene's CPU work is slower than one image here, so the CPU, not the GPU, sets the pace"
        )


if __name__ == "__main__":
    main()
