"""Many workers, one queue: does the queue empty N times faster on N workers?

Ray with CPU workers, each holding a GPU stand-in (a fixed time per image, handed to the actors
through the engine's own generator-factory seam), for 1, 2 and 4 workers. Stories run one after
another as the daemon runs them (render_story per story, the pool's lookahead giving idle
workers the next stories' scenes); the CPU half (finishing, clips, film, sheet, ZIP) is real.
Prints per worker count: stories/hour and story latency beside the ideal (workers / time per
image), their ratio (target >= 0.9 at 4 workers), and the worker-side gap from the last image of
story k to the first image of story k+1 (about 0, or negative when k+1 was started ahead).

    .venv/bin/python bench/ray_scale.py [--workers 1 2 4] [--stories 4] [--scenes 8] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.images.seam import GeneratedImage, SceneKey, SceneRequest
from pipeline.prompts import plan_scenes
from pipeline.render import CpuPool, QuietEvents, StoryJob, render_story
from pipeline.render.scenes import scene_request
from pipeline.settings import Settings
from pipeline.story import Story


class StandIn:
    """The GPU stand-in, made in each Ray actor by the factory: an image after exactly `seconds`."""

    def __init__(self, settings: Settings, seconds: float) -> None:
        self.seconds = seconds

    def describe(self) -> dict[str, Any]:
        return {"model": "fixed-time stand-in", "device": "stand-in", "seconds": self.seconds}

    def warm_up(self, phase: Any = None) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, req: SceneRequest, on_step: Any = None) -> GeneratedImage:
        start = time.time()
        image = Image.new("RGB", (req.width, req.height), (req.seed % 256, 90, 160))
        time.sleep(max(0.0, self.seconds - (time.time() - start)))
        return GeneratedImage(image, {"total": self.seconds}, {"start": start, "end": time.time()})


def settings_for(root: Path, workers: int) -> Settings:
    s = Settings()
    s.paths.state = root / "state"
    s.model.warmup = False
    s.image.width, s.image.height, s.image.steps = 64, 48, 2
    s.video.fps, s.video.preset = 8, "ultrafast"
    s.workers.engine, s.workers.gpus_per_worker, s.workers.count = "ray", 0, workers
    return s


def run(workers: int, stories: int, scenes: int, seconds: float) -> dict[str, float]:
    from pipeline.images.ray_pool import RayWorkers

    with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as tmp:
        root = Path(tmp)
        settings = settings_for(root, workers)
        jobs = [
            StoryJob(
                f"s{k}",
                Story.model_validate({"seed": k, "scenes": [f"story {k} scene {i}" for i in range(scenes)]}),
                b"{}",
                root / f"s{k}",
                claim=f"{k:08d}",
                sequence=k,
            )
            for k in range(stories)
        ]
        running = {"k": 0}

        def lookahead() -> Iterator[tuple[SceneKey, SceneRequest]]:
            for job in jobs[running["k"] + 1 :]:
                for plan in plan_scenes(job.story, job.name, settings):
                    yield SceneKey(job.sequence or 0, job.claim, plan.number), scene_request(plan, settings)

        pool = RayWorkers(settings, partial(StandIn, seconds=seconds), lookahead=lookahead)
        latencies, images = [], []
        try:
            with CpuPool(settings) as cpu:
                t0 = time.perf_counter()
                for k, job in enumerate(jobs):
                    running["k"] = k
                    started = time.perf_counter()
                    manifest = render_story(job, settings, pool, QuietEvents(), cpu)
                    latencies.append(time.perf_counter() - started)
                    images.append([sc["generation"] for sc in manifest["scenes"]])
                total = time.perf_counter() - t0
        finally:
            pool.close()
    gaps = [
        min(g["start"] for g in images[k + 1]) - max(g["end"] for g in images[k]) for k in range(stories - 1)
    ]
    latency = sum(latencies) / len(latencies)
    return {"total": total, "latency": latency, "gap": max(gaps), "min_gap": min(gaps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--stories", type=int, default=4)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.0, help="stand-in seconds per image")
    args = ap.parse_args()
    n, s, t = args.stories, args.scenes, args.seconds
    print(f"{n} stories x {s} scenes, {t:g} s per image (stand-in), Ray CPU workers, 64x48 clips\n")
    print(
        "| workers | stories/h | ideal | ratio | story latency s | ideal s | ratio "
        "| gap k->k+1 s (max / min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for w in args.workers:
        r = run(w, n, s, t)
        per_hour, ideal_per_hour = n / r["total"] * 3600, w / (s * t) * 3600
        ideal_latency = math.ceil(s / w) * t
        print(
            f"| {w} | {per_hour:.0f} | {ideal_per_hour:.0f} | {per_hour / ideal_per_hour:.2f} "
            f"| {r['latency']:.2f} | {ideal_latency:.2f} | {ideal_latency / r['latency']:.2f} "
            f"| {r['gap']:+.3f} / {r['min_gap']:+.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
