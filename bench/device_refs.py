"""Part 6 of the GPU visit: what keeping characters the same costs, 0, 1 and 2 references.

bench/consistency.py's rows on SDXL base 1.0's architecture with random weights (full: fp16,
1024×768, on CUDA) or the tiny model (reduced: 64×48, 2 steps, CPU; measures nothing). Each row
makes the same scene's denoising with that many character references in view (a reference pass
per reference per step, as the daemon does: no cache), best of `repeats` after a warm-up scene.

The issue's targets, judged on an H100 only (on another card: measured, named, not judged): one
reference at most 2.1x the plain scene's denoising time, every row within 24 GiB of VRAM at
1024×768. The ratio is per denoising step (every step costs the same), so the full rows run
REFS_STEPS steps, not 30, to fit the visit; peak memory does not depend on the step count.
"""

from __future__ import annotations

from typing import Any

from device_tools import Ctx, build_pipe, torch_env

ROWS = ("plain scene (0 references)", "1 reference", "2 references")
REFS_STEPS = 10
TARGET_RATIO = 2.1  # one reference over the plain scene
TARGET_PEAK_GIB = 24.0
TARGET_CARD = "H100"


def verdict(rows: list[dict[str, Any]], device_name: str, full: bool) -> tuple[str, str]:
    """The part's status and what it says, from the rows measured."""
    by = {r["row"]: r for r in rows}
    one = by.get("1 reference")
    if one is None:
        return "failed", f"only {len(rows)} of {len(ROWS)} rows measured"
    peaks = [r["peak GiB"] for r in rows if r.get("peak GiB") is not None]
    text = f"1 reference {one['ratio']:.2f}x, 2 references {by.get('2 references', {}).get('ratio', 0):.2f}x"
    text += f" the plain scene's denoising; peak {max(peaks):.1f} GiB" if peaks else "; peak not measured"
    if not full:
        return "ok", "reduced run, not judged: " + text
    if TARGET_CARD not in device_name:
        return "not judged", f"targets (≤ {TARGET_RATIO}x, ≤ {TARGET_PEAK_GIB:g} GiB) are for an H100; {text}"
    met = one["ratio"] <= TARGET_RATIO and bool(peaks) and max(peaks) <= TARGET_PEAK_GIB
    return ("ok" if met else "missed"), f"targets ≤ {TARGET_RATIO}x, ≤ {TARGET_PEAK_GIB:g} GiB: " + (
        "met; " if met else "MISSED; "
    ) + text


def part_refs(ctx: Ctx) -> None:
    import consistency

    m = ctx.mode
    device = torch_env(ctx.report)
    ctx.report.phase("consistency rows: building the model")
    pipe = build_pipe(m, device)
    steps, repeats = (REFS_STEPS, 2) if m.full else (m.steps, 1)

    def on_row(r: dict[str, Any]) -> None:
        note = f"{r['ratio']:.2f}x the plain scene's denoising ({steps} steps, best of {repeats})"
        row = {"row": r["row"], "s/image": r["s/scene"], "peak VRAM GiB": r["peak GiB"], "ratio": r["ratio"]}
        ctx.report.row("refs", {**row, "note": note})
        ctx.report.phase(f"consistency rows: {r['row']} done")

    ctx.report.phase("consistency rows: two portraits, then 0, 1, 2 references")
    result = consistency.run(
        model="sdxl" if m.full else "tiny",
        size=(m.width, m.height),
        steps=steps,
        repeats=repeats,
        device=str(device.device),
        rows=ROWS,
        pipe=pipe,
        on_row=on_row,
    )
    status, message = verdict(result["rows"], device.name, m.full)
    meta = result["meta"]
    message += f"; portrait {meta['portrait_s']:.2f} s, a reference {meta['reference_mb']:.1f} MB"
    ctx.report.part("refs", status, message, card=device.name, **meta)
