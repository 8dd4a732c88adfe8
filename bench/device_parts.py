"""The parts of the GPU visit, and the one list (PARTS) that bench/device_check.py runs, in order.

Each part is a function of a `Ctx`, run in a child process of its own with its own time cap, that
records into `ctx.report`: a file rewritten after every change, so a part killed at its cap still
leaves what it had measured. A part fills one or more table entries; an entry's status is "ok" (ran,
and met its target where it has one), "missed" (ran, target not met), "not judged" (measured on a
card its target is not for), "failed" (an error, a check that did not hold, or out of time) or
"skipped".

Full mode (CUDA): SDXL base 1.0's architecture with random weights, fp16, 1024×768, 30 steps.
Reduced mode (no CUDA): the built-in tiny model at 64×48, 2 steps, tiny clips; it proves the visit
runs end to end and measures nothing.

Adding a part (the visit's later rows, e.g. seconds per scene and peak memory for 0, 1 and 2
reference images on the real SDXL architecture, or fp16 runs):
1. write `def part_refs(ctx: Ctx) -> None` (here or in a module of its own, like device_sdxl.py):
   build what it needs with `build_pipe(ctx.mode, torch_env(ctx.report))` or reuse the saved model
   (`model_folder(ctx)`), say what it is doing with `ctx.report.phase(...)`, add each measured row
   as it is measured with `ctx.report.row("refs", {"row": "1 reference", "s/image": …,
   "peak VRAM GiB": …, "note": …})` (the table's columns are the keys of device_check.COLUMNS),
   and end with `ctx.report.part("refs", status, message, **figures)`; mind `ctx.left()`;
2. add `Part("refs", part_refs, (Entry("refs", "6", "consistent characters: 0/1/2 references"),),
   cap_full=…, cap_reduced=…)` to PARTS below, where it should run (earlier = more likely to get
   its time). `--parts refs` runs it alone; `--caps refs=90` changes its cap; its reduced form
   runs in `make device-rehearsal` and tests/test_device_check.py, so the visit is tried here first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from device_preflight import part_preflight
from device_refs import part_refs
from device_sdxl import UNIT_WATCHDOG_S, part_sdxl
from device_tools import (
    Ctx,
    DaemonRun,
    Mode,
    UtilSampler,
    build_pipe,
    free_device_memory,
    image_check,
    last_log_line,
    model_folder,
    run_daemon,
    save_model,
    torch_env,
)

OOM_STEPS = 8  # peak memory does not depend on the step count; the ladder's slower rungs do
OVERLAP_MIN_BUSY = 0.95  # Σ generation / scene-loop wall time
OVERLAP_MIN_UTIL = 90.0  # mean sampled GPU utilisation over the scene loop, percent

STORY_A: dict[str, Any] = {
    "title": "Device check A",
    "seed": 7,
    "style": "oil painting, warm light",
    "characters": {"Mara": "a woman in her sixties, silver braid, yellow raincoat"},
    "scenes": [
        {"description": "Mara walks along a harbour wall at dawn, gulls overhead", "seconds": 2},
        {"description": "Fishing boats come in through fog, lanterns still lit", "seconds": 2},
        {"description": "Mara buys bread at a market stall, steam rising", "seconds": 2},
        {"description": "A lighthouse on the cliff at dusk, waves below", "seconds": 2},
    ],
}
STORY_B: dict[str, Any] = {  # default clip length (5 s at 24 fps): the CPU work the GPU must not wait for
    "title": "Device check B",
    "seed": 11,
    "scenes": [
        f"scene {i}: a city street in the rain at night, neon signs, people with umbrellas" for i in range(6)
    ],
}


# -- part 3: a real OOM ----------------------------------------------------------------------------
def _inject_decode_oom(pipe: Any) -> None:
    """Reduced mode's stand-in for a capped allocator: the VAE decode 'runs out' unless tiled."""
    import torch

    real = pipe.vae.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        if not pipe.vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (simulated on CPU)")
        return real(*args, **kwargs)

    pipe.vae.decode = decode


def part_oom(ctx: Ctx) -> None:
    """Cap the process's memory so the first rung fails; the ladder must finish the image and say how."""
    from pipeline.images.sdxl_load import configure_allocator

    configure_allocator(os.environ)  # as `storyreel run` does, before CUDA starts: the product's allocator
    import torch

    from pipeline.images.model import ModelLocation
    from pipeline.images.sdxl import SdxlGenerator
    from pipeline.images.seam import SceneRequest
    from pipeline.settings import Settings

    device = torch_env(ctx.report)
    ctx.report.env(allocator=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    m = ctx.mode
    ctx.report.phase("building the model")
    pipe = build_pipe(m, device)
    image = {
        "width": m.width,
        "height": m.height,
        "steps": OOM_STEPS if m.full else m.steps,
        "compile": "off",
    }
    settings = Settings.model_validate({"model": {"device": str(device.device)}, "image": image})
    gen = SdxlGenerator(
        settings, device=device, pipe=pipe, location=ModelLocation("random", None, None, None)
    )
    baseline = gen.describe()["memory_savers"]
    req = SceneRequest("a lighthouse on a cliff at dusk", "blurry", 3, m.width, m.height, image["steps"], 6.0)
    gib = 2**30
    figures: dict[str, Any] = {"baseline_savers": baseline}
    if m.full:
        ctx.report.phase("unconstrained image (peaks)")
        marks: dict[str, int] = {}

        def on_step(i: int, n: int) -> None:
            if i == n:
                marks["denoise"] = torch.cuda.max_memory_allocated()

        free = gen.generate(req, on_step)
        peak, denoise = int(free.info["peak_memory_bytes"]), marks["denoise"]
        resident = torch.cuda.memory_allocated()
        total = int(device.total_memory_bytes())
        # Decode the peak (SDXL's fp32 VAE at 1024×768): cap half-way into it. Else 3/4 of the working set.
        decode_led = peak - denoise > 256 << 20
        cap = denoise + (peak - denoise) // 2 if decode_led else resident + (peak - resident) * 3 // 4
        figures.update(
            peak_gib=peak / gib,
            denoise_peak_gib=denoise / gib,
            resident_gib=resident / gib,
            cap_gib=cap / gib,
        )
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(cap / total)
        how = (
            f"cap {cap / gib:.1f} GiB via set_per_process_memory_fraction({cap / total:.3f}); "
            f"unconstrained peak {peak / gib:.1f} GiB "
            f"(denoise {denoise / gib:.1f}, weights {resident / gib:.1f})"
        )
    else:
        _inject_decode_oom(pipe)
        how = "simulated on CPU: VAE decode raises OutOfMemoryError unless tiled"
    ctx.report.phase("capped image (the ladder)")
    t0 = time.perf_counter()
    try:
        capped = gen.generate(req)
    except Exception as err:  # SceneOutOfMemory when the ladder is exhausted, or anything unexpected
        ctx.report.part("oom", "failed", f"{how}; {type(err).__name__}: {str(err)[:300]}", **figures)
        return
    retries = int(capped.info["oom_retries"])
    figures.update(
        rung=retries,
        savers=capped.info["memory_savers"],
        oom_errors=capped.info["oom_errors"],
        capped_s=round(time.perf_counter() - t0, 2),
        capped_peak_gib=(capped.info["peak_memory_bytes"] or 0) / gib or None,
    )
    std = float(np.asarray(capped.image, dtype=np.float32).std())
    ctx.report.phase("lifting the cap: back to the baseline?")
    if m.full:
        torch.cuda.set_per_process_memory_fraction(1.0)
    else:
        del pipe.vae.decode  # the instance attribute goes; the class's decode is back
    after = gen.generate(req)
    back = after.info["oom_retries"] == 0 and after.info["memory_savers"] == baseline
    savers = ", ".join(capped.info["memory_savers"]) or "none"
    message = (
        f"{how}; rung 0 (baseline) failed, {retries} failure(s), recovered on rung {retries} ({savers}); "
        f"image std {std:.1f}; next image {'back on the baseline' if back else 'NOT back on the baseline'}"
    )
    ok = retries >= 1 and std >= 2.0 and back
    if retries == 0:
        message = f"{how}; the cap did not make the first rung fail (no OOM happened)"
    ctx.report.part("oom", "ok" if ok else "failed", message, **figures)


# -- parts 2 and 4: the daemon end to end, and overlap ------------------------------------------------
def _check_story(run: DaemonRun, name: str, scenes: int, mode: Mode) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    state = run.last_state(name)
    if state != "done":
        return [f"{name}: last state {state!r}" + (f": {run.error(name)}" if run.error(name) else "")], {}
    images = sorted((run.outbox / name / "images").glob("*.png"))
    if len(images) != scenes:
        problems.append(f"{name}: {len(images)} PNGs, expected {scenes}")
    problems += [p for img in images if (p := image_check(img, mode.width, mode.height))]
    manifest = run.manifest(name)
    model = manifest["model"]
    gens = [sc["generation"] for sc in manifest["scenes"]]
    retried = sum(bool(g.get("vae_nan_fp32_retry")) for g in gens)
    if retried:
        problems.append(f"{name}: {retried} scene(s) decoded NaN in fp16 and were retried in fp32")
    for key in ("device", "dtype", "compile"):
        if key not in model:
            problems.append(f"{name}: manifest model has no {key!r}")
    problems += _check_cast(run, name, manifest, mode)
    want_device, want_dtype = ("cuda", "float16") if mode.full else ("cpu", "float32")
    if not str(model.get("device", "")).startswith(want_device) or model.get("dtype") != want_dtype:
        problems.append(f"{name}: manifest says {model.get('device')} {model.get('dtype')}")
    totals = [sc["timings"]["total"] for sc in manifest["scenes"]]
    facts = {
        "storyreel_version": manifest.get("storyreel_version"),
        "device": model.get("device"),
        "dtype": model.get("dtype"),
        "compile": model.get("compile"),
        "compiled": model.get("compiled"),
        "vae_dtype": model.get("vae_dtype"),
        "gen_s_median": float(np.median(totals)) if totals else None,
        "gen_s_each": [round(t, 3) for t in totals],
    }
    return problems, facts


def _check_cast(run: DaemonRun, name: str, manifest: dict[str, Any], mode: Mode) -> list[str]:
    """A character a scene names: a portrait published, and those scenes made with its reference."""
    problems: list[str] = []
    for who, facts in (manifest.get("characters") or {}).items():
        if p := image_check(run.outbox / name / facts["file"], mode.width, mode.height):
            problems.append(f"{name}: portrait of {who}: {p}")
    for sc in manifest["scenes"]:
        if sc.get("characters_referenced", []) != sc.get("characters", []):
            problems.append(
                f"{name}: scene {sc['scene']} names {sc.get('characters')}, referenced "
                f"{sc.get('characters_referenced')}"
            )
    return problems


def _overlap(run: DaemonRun, name: str, sampler: UtilSampler, mode: Mode) -> tuple[str, str, dict[str, Any]]:
    starts = [datetime.fromisoformat(e["timestamp"]).timestamp() for e in run.events("scene started", name)]
    manifest = run.manifest(name)
    totals = [sc["timings"]["total"] for sc in manifest["scenes"]]
    if len(starts) != len(totals) or not starts:
        return "failed", f"{len(starts)} scene starts logged for {len(totals)} scenes", {}
    begin, end = starts[0], starts[-1] + totals[-1]
    busy = sum(totals) / (end - begin)
    inside = [u for t, u in sampler.samples if begin <= t <= end]
    figures: dict[str, Any] = {
        "sampler": sampler.backend,
        "samples": len(inside),
        "scene_loop_s": round(end - begin, 2),
        "generation_s": round(sum(totals), 2),
        "busy": round(busy, 3),
        "cpu_workers": os.cpu_count(),
    }
    text = (
        f"{len(totals)} scenes, Σ generation {sum(totals):.1f} s of a {end - begin:.1f} s scene loop "
        f"(busy {busy:.0%})"
    )
    if inside:
        arr = np.asarray(inside)
        figures.update(
            util_mean=float(arr.mean()), util_min=float(arr.min()), util_p10=float(np.percentile(arr, 10))
        )
        figures["util_below_50"] = float((arr < 50).mean())
        text += (
            f"; {sampler.backend}: GPU util mean {arr.mean():.0f}%, p10 {np.percentile(arr, 10):.0f}%, "
            f"min {arr.min():.0f}%, {figures['util_below_50']:.0%} of {len(inside)} samples under 50%"
        )
    else:
        text += f"; GPU utilisation not sampled (sampler: {sampler.backend})"
    if not mode.full:
        return "ok", "reduced run, not judged: " + text, figures
    met = busy >= OVERLAP_MIN_BUSY and bool(inside) and figures["util_mean"] >= OVERLAP_MIN_UTIL
    return ("ok" if met else "missed"), text, figures


def part_daemon(ctx: Ctx) -> None:
    """Parts 2 and 4: one `storyreel run --once` over story A (4 scenes) then B (6 scenes, sampled)."""
    model = model_folder(ctx)
    saved = save_model(model, ctx.mode, ctx.report)
    free_device_memory()  # the daemon, a separate process, needs the GPU next
    ctx.report.env(model=str(model), model_saved=saved)
    ctx.report.phase("storyreel run --once: story_a (4 scenes), story_b (6 scenes)")
    sampler = UtilSampler()
    try:
        run = run_daemon(
            ctx, ctx.work / "run1", model, {"story_a": STORY_A, "story_b": STORY_B}, "daemon_run1.log"
        )
    finally:
        sampler.stop()
    how = f"{run.how}; exit {run.code} after {run.seconds:.0f} s"
    if run.code is None:
        why = f"timed out after {run.seconds:.0f} s; last log: {last_log_line(run.log)}"
        ctx.report.part("daemon", "failed", why)
        ctx.report.part("overlap", "failed", "daemon run did not finish")
        return
    problems, facts = _check_story(run, "story_a", len(STORY_A["scenes"]), ctx.mode)
    if run.code != 0:
        problems.insert(0, f"exit code {run.code}: {last_log_line(run.log)}")
    n = run.notify
    watch = (
        f"READY after {n['ready_after_s']} s; {n['watchdog_pings']} watchdog pings, longest gap "
        f"{n['watchdog_max_gap_s']} s at {n['watchdog_max_gap_at_s']} s after READY "
        f"(unit allows {UNIT_WATCHDOG_S} s)"
    )
    text = (
        f"{how}; 4 PNGs finite, not uniform; manifest: {facts.get('device')}, {facts.get('dtype')}, "
        f"compile={facts.get('compile')} ({_compile_note(ctx)}), VAE {facts.get('vae_dtype')}, "
        f"storyreel {facts.get('storyreel_version')}; {watch}"
    )
    ctx.report.part("daemon", "failed" if problems else "ok", "; ".join(problems) or text, **facts, **n)
    if run.last_state("story_b") != "done":
        ctx.report.part("overlap", "failed", f"story_b ended {run.last_state('story_b')!r}")
        return
    status, text, figures = _overlap(run, "story_b", sampler, ctx.mode)
    b_problems, b_facts = _check_story(run, "story_b", len(STORY_B["scenes"]), ctx.mode)
    figures["gen_s_median"] = b_facts.get("gen_s_median")
    if b_problems:
        status, text = "failed", "; ".join(b_problems)
    ctx.report.part("overlap", status, text, **figures)


# -- part 5: repeatability ---------------------------------------------------------------------------
def part_repeat(ctx: Ctx) -> None:
    """Story A again in a fresh process: byte-identical PNGs, or how far apart and why."""
    from PIL import Image

    model = model_folder(ctx)
    ctx.report.env(model_saved=save_model(model, ctx.mode, ctx.report))
    free_device_memory()
    first = ctx.work / "run1" / "outbox" / "story_a" / "images"
    runs = []
    if not first.is_dir():  # part 2 did not get that far: make both runs here
        ctx.report.phase("first run of story_a")
        runs.append(run_daemon(ctx, ctx.work / "run1", model, {"story_a": STORY_A}, "daemon_run1.log"))
    ctx.report.phase("second run of story_a, fresh process")
    runs.append(run_daemon(ctx, ctx.work / "run2", model, {"story_a": STORY_A}, "daemon_run2.log"))
    second = ctx.work / "run2" / "outbox" / "story_a" / "images"
    for run in runs:
        if run.code != 0 or run.last_state("story_a") != "done":
            why = run.error("story_a") or last_log_line(run.log)
            ctx.report.part(
                "repeat", "failed", f"run exit {run.code}, story_a {run.last_state('story_a')!r}: {why}"
            )
            return
    # The scenes and the characters' reference portraits (story A names Mara: consistency is on).
    a = sorted([*first.glob("*.png"), *(first.parent / "characters").glob("*.png")])
    b = sorted([*second.glob("*.png"), *(second.parent / "characters").glob("*.png")])
    if [p.name for p in a] != [p.name for p in b] or not a:
        ctx.report.part("repeat", "failed", f"PNG sets differ: {len(a)} vs {len(b)}")
        return
    differ, worst = [], 0.0
    for pa, pb in zip(a, b, strict=True):
        if pa.read_bytes() != pb.read_bytes():
            differ.append(f"{pa.parent.name}/{pa.name}")
            with Image.open(pa) as ia, Image.open(pb) as ib:
                d = np.abs(np.asarray(ia, dtype=np.int16) - np.asarray(ib, dtype=np.int16))
            worst = max(worst, float(d.max()))
    clips = [
        p.name
        for p in sorted((second.parent / "clips").glob("*.mp4"))
        if p.read_bytes() != (first.parent / "clips" / p.name).read_bytes()
    ]
    figures = {"pngs": len(a), "pngs_differing": differ, "max_abs_diff": worst, "clips_differing": clips}
    if not differ:
        extra = (
            "; clips identical too" if not clips else f"; clips differ: {len(clips)} (encoder, not the GPU)"
        )
        same = f"{len(a)}/{len(a)} PNGs byte-identical across two processes{extra}; {_compile_note(ctx)}"
        ctx.report.part("repeat", "ok", same, **figures)
        return
    ctx.report.part(
        "repeat",
        "missed",
        f"{len(differ)}/{len(a)} PNGs differ across two processes (max |Δ| {worst:.0f} levels; "
        f"{_compile_note(ctx)}): "
        "nondeterministic GPU kernels (cuDNN/cuBLAS algorithm choice, atomics). Restoring it needs "
        "torch.use_deterministic_algorithms(True) + CUBLAS_WORKSPACE_CONFIG=:4096:8 + cudnn.benchmark=False "
        "(no storyreel setting for it yet; its cost is not measured here)",
        **figures,
    )


def _compile_note(ctx: Ctx) -> str:
    if ctx.daemon_compile == "off":
        return "daemon with [image] compile = off: compile is measured in part 1"
    return f"daemon with [image] compile = {ctx.daemon_compile}"


# -- the list -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One line of the table: `key` names it in device_check.json and in --skip; `number` is its "#"."""

    key: str
    number: str
    title: str  # the table's "part" cell when the entry has no measured rows of its own


@dataclass(frozen=True)
class Part:
    """One child process of the visit and the entries it fills. A cap of None: all the time left."""

    name: str  # for --parts and --caps, and the child's files (NAME.json, NAME.log)
    run: Callable[[Ctx], None]
    entries: tuple[Entry, ...]
    cap_full: float | None
    cap_reduced: float | None

    def cap(self, full: bool) -> float | None:
        return self.cap_full if full else self.cap_reduced


# In running order. Full-mode caps add up to more than the budget on purpose: parts usually end
# early and hand their time on; the compile row comes early, in part 1's child, with part 1's cap.
PARTS = (
    Part("preflight", part_preflight, (Entry("preflight", "0", "toolchain and packages"),), 60, 240),
    Part(
        "sdxl",
        part_sdxl,
        (
            Entry("compile", "1", "storyreel defaults (compile)"),
            Entry("recompile", "1", "longer prompts on the compiled UNet (no recompile)"),
            Entry("sdxl", "1", "SDXL eager rows"),
        ),
        290,
        330,
    ),
    Part(
        "daemon",
        part_daemon,
        (
            Entry("daemon", "2", "daemon: storyreel run --once, 4 scenes"),
            Entry("overlap", "4", "overlap: 6-scene story, GPU sampled"),
        ),
        110,
        240,
    ),
    Part("oom", part_oom, (Entry("oom", "3", "OOM ladder under a memory cap"),), 45, 120),
    Part("refs", part_refs, (Entry("refs", "6", "consistent characters: 0, 1, 2 references"),), 70, 120),
    Part("repeat", part_repeat, (Entry("repeat", "5", "repeatability: story twice"),), 50, 180),
)
BY_NAME = {p.name: p for p in PARTS}
