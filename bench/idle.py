"""What an idle daemon costs: CPU seconds and bytes written per idle hour, per watch mode.

An idle daemon should write nothing at all (its state files change only when something
happens) and, in inotify mode, should not wake on the polling interval. This starts the real
daemon (`storyreel run`, tiny model, warm-up off) over an empty inbox in each mode, lets it
settle, then reads /proc/PID/io and /proc/PID/stat across a window and scales to an hour.

    .venv/bin/python bench/idle.py [--seconds 60] [--poll 0.5]

Columns: `cpu s/h` (user+system), `write() bytes/h` (wchar: everything passed to write(2),
logs included), `disk bytes/h` (write_bytes: what reached the block layer), `wake-ups/h`
(voluntary context switches of all the daemon's threads: how often something woke it), and
the number of files whose mtime changed during the window under state/, the outbox (the
status page) and the metrics textfile's folder (`[metrics] textfile` is set).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def proc_io(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, value = line.split(":")
        out[key] = int(value)
    return out


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def mtimes(*roots: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for root in roots for p in root.rglob("*") if p.is_file()}


def wakeups(pid: int) -> int:
    """Voluntary context switches of every thread: each is a sleep that something ended."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                total += int(line.split()[1])
    return total


def write_config(root: Path, mode: str, poll: float, tiny: Path) -> Path:
    for sub in ("inbox", "outbox", "node"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    config = root / "config.toml"
    config.write_text(
        f"""[paths]
inbox = "{root / "inbox"}"
outbox = "{root / "outbox"}"
state = "{root / "state"}"

[model]
source = "tiny"
device = "cpu"
tiny_dir = "{tiny}"
warmup = false

[watch]
mode = "{mode}"
poll_seconds = {poll}

[metrics]
textfile = "{root / "node" / "storyreel.prom"}"
"""
    )
    return config


def measure(root: Path, mode: str, poll: float, seconds: float, tiny: Path) -> dict[str, float]:
    config = write_config(root / mode, mode, poll, tiny)
    log = open(root / f"{mode}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(config)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while '"ready"' not in (root / f"{mode}.log").read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{mode}: the daemon did not start; see {root / f'{mode}.log'}")
            time.sleep(0.2)
        time.sleep(max(10.0, 4 * poll))  # past start-up's own writes (the page's: every 3 s at most)
        watched = [root / mode / sub for sub in ("state", "outbox", "node")]
        io0, cpu0, m0, w0 = proc_io(proc.pid), proc_cpu(proc.pid), mtimes(*watched), wakeups(proc.pid)
        time.sleep(seconds)
        io1, cpu1, m1, w1 = proc_io(proc.pid), proc_cpu(proc.pid), mtimes(*watched), wakeups(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
    for path in sorted(k for k, v in m1.items() if m0.get(k) != v):
        print(f"{mode}: touched {path}", file=sys.stderr)
    per_hour = 3600.0 / seconds
    return {
        "cpu_s_per_h": (cpu1 - cpu0) * per_hour,
        "wchar_per_h": (io1["wchar"] - io0["wchar"]) * per_hour,
        "disk_per_h": (io1["write_bytes"] - io0["write_bytes"]) * per_hour,
        "wakeups_per_h": (w1 - w0) * per_hour,
        "files_touched": float(sum(1 for k, v in m1.items() if m0.get(k) != v)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="idle window measured per mode")
    ap.add_argument("--poll", type=float, default=0.5, help="watch.poll_seconds")
    args = ap.parse_args()
    from pipeline.images.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="storyreel-idle-", dir=os.environ.get("IDLE_DIR")) as tmp:
        root = Path(tmp)
        tiny = root / "tiny"
        build_tiny_pipeline(tiny)
        rows = {mode: measure(root, mode, args.poll, args.seconds, tiny) for mode in ("inotify", "polling")}
    print(f"idle daemon, {args.seconds:.0f} s window per mode, poll_seconds = {args.poll}")
    print("| mode | cpu s/h | write() bytes/h | disk bytes/h | wake-ups/h | files touched |")
    print("|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(
            f"| {mode} | {r['cpu_s_per_h']:.1f} | {r['wchar_per_h']:.0f} | {r['disk_per_h']:.0f}"
            f" | {r['wakeups_per_h']:.0f} | {r['files_touched']:.0f} |"
        )


if __name__ == "__main__":
    main()
