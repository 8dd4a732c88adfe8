"""The GPU visit in one command: the parts of device_parts.PARTS, each in its own process and time cap.

    bench/device_check.sh                     (on the device: installs the carried wheels, then runs this)
    python bench/device_check.py [--out DIR] [--work DIR] [--budget SECONDS] [--parts preflight,sdxl,...]

On CUDA (full mode), within the budget (default 480 s), in this order:
  0. preflight: versions (python, torch, CUDA, triton, gcc, the card), every module imported, storyreel's
     metadata and console script, ffmpeg, one tiny torch.compile, in the first seconds;
  1. SDXL base 1.0's architecture, random weights, fp16, 1024×768, 30 steps: storyreel's defaults first
     (channels_last + torch.compile during warm-up; target ≤ 1.3 s/image, judged on an H100 only),
     then two- and three-chunk prompts on the compiled UNet (whether a scene recompiles after the
     warm-up at 77 and 154 tokens, against the systemd watchdog), then the eager rows;
  2. and 4. the daemon end to end, `storyreel run --once` as a real process over a 4-scene story and a
     6-scene one, the model loaded from disk like real weights, GPU utilisation sampled;
  3. a real OOM: the process's memory capped so the first rung fails, the ladder recovers;
  5. repeatability: the 4-scene story again in a fresh process, PNGs compared byte for byte (its
     character's reference portrait too);
  6. consistent characters: a scene's denoising with 0, 1 and 2 character references in view, on the
     same architecture (seconds, ratio to the plain scene, peak VRAM; targets judged on an H100 only).
Without CUDA it runs a reduced version (tiny model, 64×48, 2 steps) that checks the visit itself works;
in auto mode it refuses to, where nvidia-smi sees a GPU that torch does not.

Each part runs as a child process with its own time cap and writes its findings as it goes, so a hung
compile, an OOM or a CUDA error in one part loses none of the others. Results: one table on stdout,
and under $OUT (default bench/out/device_check) device_check.md (the table), device_check.json (every
figure) and device_check.log (every part's log, each capped so that the file stays under 16 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_parts as dp
import device_tools as dt

REPO = Path(__file__).resolve().parents[1]
MIN_PART_S = 20  # below this a part is skipped rather than started
RESERVE_S = 8  # kept for writing the results
GRACE_S = 15  # a child is told to finish this long (at most a quarter of its budget) before it is killed
LOG_CAP = {"part": 2 << 20, "total": 12 << 20}  # what comes back is at most 16 MiB a file
COLS = ["#", "part", "result", "s/image", "it/s", "VAE decode s", "peak VRAM GiB", "warm-up s", "notes"]
COLUMNS = ("s/image", "it/s", "decode s", "peak VRAM GiB", "warm-up s")  # a measured row's keys, in order
HEAD = ("python", "torch", "cuda", "triton", "diffusers", "transformers", "accelerate", "huggingface_hub")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench/out/device_check")
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "storyreel-device-check")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together")
    ap.add_argument("--mode", choices=["auto", "full", "reduced"], default="auto", help="auto: full on CUDA")
    ap.add_argument("--parts", default=",".join(p.name for p in dp.PARTS), help="children to run, in order")
    ap.add_argument("--skip", default="", help="entries to leave out, e.g. compile,recompile")
    ap.add_argument("--caps", default="", help="override time caps, e.g. sdxl=400,oom=60 (seconds)")
    ap.add_argument("--cap-scale", type=float, default=1.0, help="every cap times this (a slow machine)")
    ap.add_argument(
        "--daemon-compile",
        choices=["off", "auto", "on"],
        default="off",
        help="[image] compile for the daemon runs (off: compile is measured in part 1 only)",
    )
    ap.add_argument("--setup-log", type=Path, help="the install's log (device_check.sh), kept with the rest")
    ap.add_argument("--child", choices=list(dp.BY_NAME), help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return ap.parse_args()


# -- a child: one part -------------------------------------------------------------------------------
def inject_fault(name: str, report: dt.Report) -> None:
    """Test seam: DEVICE_CHECK_FAULT="sdxl:hang,oom:crash" makes those children misbehave."""
    faults = dict(f.split(":", 1) for f in os.environ.get("DEVICE_CHECK_FAULT", "").split(",") if ":" in f)
    if faults.get(name) == "hang":
        report.phase("injected hang")
        time.sleep(3600)
    if faults.get(name) == "crash":
        report.phase("injected crash")
        os._exit(3)


def child(args: argparse.Namespace) -> int:
    part = dp.BY_NAME[args.child]
    mode = dt.FULL if args.mode == "full" else dt.REDUCED
    report = dt.Report(args.work / f"{part.name}.json")
    skip = frozenset(filter(None, args.skip.split(",")))
    ctx = dt.Ctx(mode, args.work, report, args.deadline, args.daemon_compile, skip)
    inject_fault(part.name, report)
    try:  # as `storyreel run` does, before CUDA starts: time what the product runs with
        from pipeline.images.sdxl_load import configure_allocator

        configure_allocator(os.environ)
    except Exception as err:  # the preflight part reports the import itself
        print(f"allocator not configured: {type(err).__name__}: {err}", flush=True)
    try:
        part.run(ctx)
    except Exception as err:
        traceback.print_exc()
        for entry in part.entries:
            if report.data["parts"].get(entry.key, {}).get("status") in (None, "running"):
                where = report.data["phase"]
                report.part(entry.key, "failed", f"{type(err).__name__} while {where}: {str(err)[:300]}")
        return 1
    return 0


# -- the parent: budgets, children, the table --------------------------------------------------------
def run_child(name: str, args: argparse.Namespace, mode: str, budget: float) -> tuple[int | None, float]:
    log = args.work / f"{name}.log"
    cmd = [sys.executable, "-u", __file__, "--child", name, "--mode", mode, "--work", str(args.work)]
    grace = min(GRACE_S, budget / 4)  # time to stop a daemon and write what it has
    cmd += ["--deadline", str(time.time() + budget - grace), "--daemon-compile", args.daemon_compile]
    cmd += ["--skip", args.skip]
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = proc.wait(budget)
        except subprocess.TimeoutExpired:
            code = None
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the whole group: a daemon it started goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                    break
    return code, time.monotonic() - t0


def collect(part: dp.Part, args: argparse.Namespace, code: int | None, seconds: float) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((args.work / f"{part.name}.json").read_text("utf-8"))
    except (OSError, ValueError):
        data = {"env": {}, "phase": "starting (no report written)", "parts": {}}
    since = time.time() - data.get("phase_since", time.time())
    for e in part.entries:
        entry = data["parts"].setdefault(e.key, {"rows": []})
        if entry.get("status") in (None, "running"):
            kept = f"; {len(entry['rows'])} row(s) kept" if entry["rows"] else ""
            if code is None:
                why = f"timed out after {seconds:.0f} s, {since:.0f} s into: {data['phase']}{kept}"
            else:
                last = dt.last_log_line(args.work / f"{part.name}.log")
                why = f"child exited {code} during: {data['phase']}; {last}{kept}"
            entry.update(
                status="failed",
                message=(entry.get("message", "") + "; " if entry.get("message") else "") + why,
            )
        entry["seconds"] = round(seconds, 1)
        entry.setdefault("figures", {})
    return data


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table_rows(parts: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Every entry in PARTS order, by its number: its measured rows, else one line of its verdict."""
    entries = sorted((e for p in dp.PARTS for e in p.entries), key=lambda e: int(e.number))
    rows = []
    for e in entries:
        entry = parts.get(e.key)
        if entry is None:
            continue
        status, message, measured = entry["status"], entry.get("message", ""), entry.get("rows", [])
        for r in measured:
            own = "failed" if r.get("problem") else "ok"
            row_status, note = own, r.get("note", "")
            if len(measured) == 1:  # the entry's verdict is this row's
                row_status, note = status, f"{message}; {note}" if note else message
            rows.append([e.number, r["row"], row_status, *(fmt(r.get(c)) for c in COLUMNS), note])
        if measured and (len(measured) == 1 or status in ("ok", "missed", "not judged")):
            continue  # the rows say it all
        figures = entry.get("figures", {})
        s_img = figures.get("gen_s_median") if e.key in ("daemon", "overlap") else None
        peak = figures.get("capped_peak_gib") if e.key == "oom" else None
        rows.append([e.number, e.title, status, fmt(s_img), "-", "-", fmt(peak), "-", message])
    return rows


def compare_overlap(parts: dict[str, dict[str, Any]]) -> None:
    """The daemon's s/image next to the same settings measured alone: what the clip work costs the GPU."""
    alone = next((r for r in parts.get("sdxl", {}).get("rows", []) if r["row"] == "+ channels_last"), None)
    overlap = parts.get("overlap", {})
    daemon_s = overlap.get("figures", {}).get("gen_s_median")
    if alone and daemon_s and overlap.get("status") in ("ok", "missed"):
        ratio = daemon_s / alone["s/image"]
        overlap["message"] += (
            f"; s/image in the daemon {daemon_s:.2f} vs {alone['s/image']:.2f} alone ({ratio - 1:+.0%})"
        )


def render(env: dict[str, Any], parts: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    gcc = (env.get("gcc") or "missing").split()[-1]
    versions = ", ".join(f"{k} {env[k]}" for k in HEAD if env.get(k)) + f", gcc {gcc}"
    head = (
        f"storyreel device check, {meta['date']}: {env.get('device', 'device unknown')}; {versions}\n"
        f"{meta['mode']}; wall {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget; "
        f"the ≤ 1.3 s/image target is judged on an H100 only"
        + (f"\nnvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
        + (f"\nREFUSED: {meta['refused']}" if meta.get("refused") else "")
    )
    lines = ["| " + " | ".join(COLS) + " |", "|" + "|".join("---" for _ in COLS) + "|"]
    for row in table_rows(parts):
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in row) + " |")
    return head + "\n\n" + "\n".join(lines) + "\n"


def write_outputs(
    args: argparse.Namespace, env: dict[str, Any], parts: dict[str, Any], meta: dict[str, Any]
) -> str:
    text = render(env, parts, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "device_check.md").write_text(text, "utf-8")
    doc = {**meta, "env": env, "parts": parts, "table": text}
    (args.out / "device_check.json").write_text(json.dumps(doc, indent=1, default=str), "utf-8")
    logs = ([args.setup_log] if args.setup_log and args.setup_log.is_file() else []) + sorted(
        args.work.glob("*.log")
    )
    left = LOG_CAP["total"]
    with open(args.out / "device_check.log", "w", encoding="utf-8") as log:
        for path in logs:
            text_part = dt.capped_text(path, max(64 << 10, min(LOG_CAP["part"], left)))
            log.write(f"===== {path.name}\n{text_part}\n")
            left -= len(text_part.encode("utf-8"))
    return text


def decide_mode(args: argparse.Namespace, env: dict[str, Any]) -> str:
    """auto: full where torch sees CUDA (preflight says; else ask torch here), reduced otherwise."""
    if args.mode != "auto":
        return str(args.mode)
    cuda = env.get("cuda_available")
    if cuda is None:
        probe = "import torch; print(torch.cuda.is_available())"
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        cuda = out.stdout.strip() == "True"
    return "full" if cuda else "reduced"


def skip_all(part: dp.Part, parts: dict[str, Any], why: str) -> None:
    for e in part.entries:
        parts[e.key] = {"status": "skipped", "message": why, "rows": [], "figures": {}}


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    t0 = time.time()
    deadline = t0 + args.budget
    for stale in [*args.work.glob("*.json"), *args.work.glob("*.log")]:
        stale.unlink()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": "mode not decided yet",
        "full": None,
        "budget_s": args.budget,
        "wall_s": 0.0,
        "daemon_compile": args.daemon_compile,
    }
    env: dict[str, Any] = {}
    parts: dict[str, dict[str, Any]] = {}
    wanted = [p for p in dp.PARTS if p.name in args.parts.split(",")]
    overrides = {k: float(v) for k, v in (c.split("=") for c in args.caps.split(",") if c)}
    mode = "auto"
    print(f"device check: parts {', '.join(p.name for p in wanted)}; budget {args.budget:.0f} s", flush=True)
    for part in wanted:
        if part.name != "preflight" and mode == "auto":
            mode = decide_mode(args, env)
            meta.update(mode=(dt.FULL if mode == "full" else dt.REDUCED).label, full=mode == "full")
            if mode == "reduced":
                # One CPU thread per process: on a loaded 2-core machine OpenMP's spin-waiting makes a
                # tiny image ~40× slower with two threads than with one. Children and daemons inherit it.
                os.environ.setdefault("OMP_NUM_THREADS", "1")
        if env.get("refuse") and args.mode == "auto":
            meta["refused"] = env["refuse"]
            skip_all(part, parts, "refused: " + env["refuse"])
            continue
        left = deadline - time.time() - RESERVE_S
        cap = overrides.get(part.name, part.cap(mode == "full"))
        budget = left if cap is None else min(cap * args.cap_scale, left)
        if left < MIN_PART_S:
            skip_all(part, parts, f"no time left ({max(0, left):.0f} s)")
            continue
        code, seconds = run_child(part.name, args, "auto" if mode == "auto" else mode, budget)
        data = collect(part, args, code, seconds)
        env.update({k: v for k, v in data["env"].items() if k not in env or part.name == "preflight"})
        parts.update(data["parts"])
        for e in part.entries:
            entry = parts[e.key]
            print(f"[{e.key}] {entry['status']} in {seconds:.0f} s: {entry.get('message', '')}", flush=True)
        meta["wall_s"] = time.time() - t0
        write_outputs(args, env, parts, meta)
    compare_overlap(parts)
    meta["wall_s"] = time.time() - t0
    print("\n" + write_outputs(args, env, parts, meta), flush=True)
    return 2 if meta.get("refused") else 0


if __name__ == "__main__":
    sys.exit(main())
