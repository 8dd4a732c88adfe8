"""The GPU visit of issue 14 in one command: five parts, each in its own process and time budget, one table.

    bench/device_check.sh                     (on the device: installs the carried wheels, then runs this)
    python bench/device_check.py [--out DIR] [--work DIR] [--budget SECONDS] [--parts sdxl,oom,...]

On CUDA (full mode) it shows, within the budget (default 450 s):
  1. SDXL base 1.0's architecture, random weights, fp16, 1024×768, 30 steps: s/image, it/s, VAE decode s,
     peak VRAM for eager SDPA, + channels_last, fp16 vs fp32-upcast VAE, and storyreel's defaults
     (channels_last + torch.compile during warm-up, compile time apart; target ≤ 1.3 s/image);
  2. the daemon end to end: `storyreel run --once` as a real process over a 4-scene story, with the
     full-size random model saved and loaded through from_pretrained like real weights;
  3. a real OOM: the process's memory capped so the first rung fails, the ladder recovers;
  4. overlap: GPU utilisation sampled during a 6-scene story;
  5. repeatability: the 4-scene story again in a fresh process, PNGs compared byte for byte.
Without CUDA it runs a reduced version (tiny model, 64×48, 2 steps) that checks the visit itself works.

Each part runs as a child process with its own time limit, and writes its findings as it goes, so a hung
compile, an OOM or a CUDA error in one part loses none of the others. The compile row runs last and
gets whatever time is left. Results: one table on stdout, and under $OUT (default bench/out/device_check)
device_check.md (the table), device_check.json (every figure) and device_check.log (all the logs).
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
ORDER = ["sdxl", "oom", "daemon", "repeat", "compile"]  # compile last: its time is the least predictable
CAPS = {  # seconds per child; None = whatever is left
    "full": {"sdxl": 120, "oom": 75, "daemon": 150, "repeat": 80, "compile": None},
    "reduced": {"sdxl": 120, "oom": 120, "daemon": 240, "repeat": 180, "compile": 60},
}
MIN_PART_S = 20  # below this a part is skipped rather than started
RESERVE_S = 8  # kept for writing the results
GRACE_S = 15  # a child is told to finish this long (at most a quarter of its budget) before it is killed
TABLE = [("1", "sdxl"), ("1", "compile"), ("2", "daemon"), ("3", "oom"), ("4", "overlap"), ("5", "repeat")]
TITLES = {
    "sdxl": "SDXL rows",
    "compile": "storyreel defaults (compile)",
    "daemon": "daemon: storyreel run --once, 4 scenes",
    "oom": "OOM ladder under a memory cap",
    "overlap": "overlap: 6-scene story, GPU sampled",
    "repeat": "repeatability: story twice",
}
COLS = ["#", "part", "result", "s/image", "it/s", "VAE decode s", "peak VRAM GiB", "warm-up s", "notes"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "bench/out/device_check")
    )
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "storyreel-device-check")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all parts together")
    ap.add_argument("--mode", choices=["auto", "full", "reduced"], default="auto", help="auto: full on CUDA")
    ap.add_argument("--parts", default=",".join(ORDER), help="which children to run, in the usual order")
    ap.add_argument("--caps", default="", help="override time caps, e.g. compile=300,sdxl=60 (seconds)")
    ap.add_argument(
        "--daemon-compile",
        choices=["off", "auto", "on"],
        default="off",
        help="[image] compile for the daemon runs (off: compile is measured in part 1 only)",
    )
    ap.add_argument("--child", choices=ORDER, help=argparse.SUPPRESS)
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
    mode = dt.FULL if args.mode == "full" else dt.REDUCED
    report = dt.Report(args.work / f"{args.child}.json")
    ctx = dt.Ctx(mode, args.work, report, args.deadline, args.daemon_compile)
    inject_fault(args.child, report)
    try:
        dp.PARTS[args.child](ctx)
    except Exception as err:
        traceback.print_exc()
        for part in dp.REPORTS[args.child]:
            if report.data["parts"].get(part, {}).get("status") in (None, "running"):
                where = report.data["phase"]
                report.part(part, "failed", f"{type(err).__name__} while {where}: {str(err)[:300]}")
        return 1
    return 0


# -- the parent: budgets, children, the table --------------------------------------------------------
def run_child(name: str, args: argparse.Namespace, mode: str, budget: float) -> tuple[int | None, float]:
    log = args.work / f"{name}.log"
    cmd = [sys.executable, "-u", __file__, "--child", name, "--mode", mode, "--work", str(args.work)]
    grace = min(GRACE_S, budget / 4)  # time to stop a daemon and write what it has
    cmd += ["--deadline", str(time.time() + budget - grace), "--daemon-compile", args.daemon_compile]
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


def collect(name: str, args: argparse.Namespace, code: int | None, seconds: float) -> dict[str, Any]:
    path = args.work / f"{name}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        data = {"env": {}, "phase": "starting (no report written)", "parts": {}}
    since = time.time() - data.get("phase_since", time.time())
    for part in dp.REPORTS[name]:
        entry = data["parts"].setdefault(part, {"rows": []})
        if entry.get("status") in (None, "running"):
            if code is None:
                why = f"timed out after {seconds:.0f} s, {since:.0f} s into: {data['phase']}"
            else:
                last = dt.last_log_line(args.work / f"{name}.log")
                why = f"child exited {code} during: {data['phase']}; {last}"
            entry.update(status="failed", message=why)
        entry["seconds"] = round(seconds, 1)
        entry.setdefault("figures", {})
    return data


def fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def measured_row(num: str, name: str, r: dict[str, Any], entry: dict[str, Any]) -> list[str]:
    """One speed row of part 1; the compile row carries its part's verdict and message."""
    note = f"VAE {r['vae']}, image std {r['image_std']:.0f}"
    if r["vae_nan_fp32_retry"]:
        note += ", fp16 NaN -> fp32 retry"
    status = "failed" if dp.row_problem(r) else "ok"
    if name == "compile":
        status, note = entry["status"], f"{entry.get('message', '')}; {note}"
    cells = [r["s/image"], r["it/s"], r["decode s"], r.get("peak VRAM GiB"), r["warm-up s"]]
    return [num, r["row"], status, *map(fmt, cells), note]


def table_rows(parts: dict[str, dict[str, Any]]) -> list[list[str]]:
    rows = []
    for num, name in TABLE:
        entry = parts.get(name)
        if entry is None:
            continue
        figures, status, message = entry.get("figures", {}), entry["status"], entry.get("message", "")
        measured = entry.get("rows", [])
        rows += [measured_row(num, name, r, entry) for r in measured]
        if measured and status in ("ok", "missed"):
            continue  # the rows say it all
        s_img = figures.get("gen_s_median") if name in ("daemon", "overlap") else None
        peak = figures.get("capped_peak_gib") if name == "oom" else None
        rows.append([num, TITLES[name], status, fmt(s_img), "-", "-", fmt(peak), "-", message])
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
    versions = ", ".join(
        f"{k} {env.get(k)}" for k in ("torch", "cuda", "diffusers", "transformers", "python")
    )
    head = (
        f"storyreel device check, {meta['date']}: {env.get('device', 'device unknown')}; {versions}\n"
        f"{meta['mode']}; wall {meta['wall_s']:.0f} s of a {meta['budget_s']:.0f} s budget"
        + (f"\nnvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else "")
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
    with open(args.out / "device_check.log", "w", encoding="utf-8") as log:
        for path in sorted(args.work.glob("*.log")):
            log.write(f"===== {path.name}\n")
            data = path.read_text("utf-8", errors="replace")
            log.write(data if len(data) < 4 << 20 else "[...]\n" + data[-(4 << 20) :])
    return text


def nvidia_smi() -> str | None:
    """The card as the driver names it, with the driver version, or None where there is none."""
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip() or None
    return None


def main() -> int:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        return child(args)
    t0 = time.time()
    deadline = t0 + args.budget
    mode = args.mode
    if mode == "auto":
        import torch

        mode = "full" if torch.cuda.is_available() else "reduced"
    if mode == "reduced":
        # One CPU thread per process: on a loaded 2-core machine OpenMP's spin-waiting makes a tiny
        # image ~40× slower with two threads than with one. Children and daemons inherit it.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    for stale in args.work.glob("*.json"):
        stale.unlink()
    for stale in args.work.glob("*.log"):
        stale.unlink()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "mode": (dt.FULL if mode == "full" else dt.REDUCED).label,
        "full": mode == "full",
        "budget_s": args.budget,
        "wall_s": 0.0,
        "daemon_compile": args.daemon_compile,
    }
    env: dict[str, Any] = {"nvidia_smi": nvidia_smi()}
    parts: dict[str, dict[str, Any]] = {}
    wanted = [p for p in ORDER if p in args.parts.split(",")]
    caps = {**CAPS[mode], **{k: float(v) for k, v in (c.split("=") for c in args.caps.split(",") if c)}}
    print(f"device check: {meta['mode']}; parts {', '.join(wanted)}; budget {args.budget:.0f} s", flush=True)
    for name in wanted:
        left = deadline - time.time() - RESERVE_S
        cap = caps[name]
        budget = left if cap is None else min(cap, left)
        if left < MIN_PART_S:
            for part in dp.REPORTS[name]:
                parts[part] = {
                    "status": "skipped",
                    "message": f"no time left ({max(0, left):.0f} s)",
                    "rows": [],
                }
            continue
        code, seconds = run_child(name, args, mode, budget)
        data = collect(name, args, code, seconds)
        for key, value in data["env"].items():
            env.setdefault(key, value)
        parts.update(data["parts"])
        for part in dp.REPORTS[name]:
            print(
                f"[{part}] {parts[part]['status']} in {seconds:.0f} s: {parts[part]['message']}", flush=True
            )
        meta["wall_s"] = time.time() - t0
        write_outputs(args, env, parts, meta)
    compare_overlap(parts)
    meta["wall_s"] = time.time() - t0
    print("\n" + write_outputs(args, env, parts, meta), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
