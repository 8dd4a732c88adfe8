"""One loop turn with thousands of valid stories queued.

    python bench/queue_turn.py [--queued 5000] [--turns 2000] [--dir DIR]

A turn is what the daemon does every time it wakes, and also between denoising
steps while a story renders: claim settled drops, read the controls (state/pause.json,
state/control/, the share's PAUSE/NAME.cancel/NAME.retry), finish pending endings,
pick the next claim. It once began with `Spool.claims()` reading every
claim folder back from disk; this prints the cost of a turn now next to the cost of
that re-read (`old_claims` below: the old `Spool.claims`, verbatim), and then what a
pause costs with that many queued (a "paused" line in each story's sidecar, written
in slices of at most `BUDGET_IDLE` seconds a turn: daemon/loop.py).

The claim folders are written directly (not fsynced: this measures turns, not
claiming). Everything runs in one process, with the real Loop, Spool, Ledger
and InboxWatcher; no model is loaded (nothing is rendered).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.loop import Loop
from daemon.queue.claim import Claim, Identity
from daemon.report.status import status_report
from daemon.system.notify import Notifier
from pipeline.settings import settings_from_dict

STORY = {"title": "t", "scenes": ["a harbour at dawn", "gulls over the pier", "the ferry leaves"]}


def old_claims(queue: Path) -> list[Claim]:
    """`Spool.claims()` as it once was (git show b3ade4d:daemon/spool.py), run once per loop turn."""
    out = []
    for folder in sorted(p for p in queue.iterdir() if p.name.isdigit()):
        try:
            meta = json.loads((folder / "claim.json").read_text("utf-8"))
        except (OSError, ValueError):
            continue
        out.append(Claim(meta["seq"], meta["name"], Identity(**meta["identity"]), meta["claimed"], folder))
    return out


def make_queue(state: Path, n: int) -> None:
    queue = state / "spool" / "queue"
    queue.mkdir(parents=True)
    raw = json.dumps(STORY).encode()
    for seq in range(1, n + 1):
        folder = queue / f"{seq:08d}"
        folder.mkdir()
        identity = {"source": f"s{seq}.json", "size": len(raw), "mtime_ns": seq, "inode": seq, "dev": 1}
        meta = {"seq": seq, "name": f"s{seq}", "identity": identity, "claimed": "2026-11-27T00:00:00+00:00"}
        (folder / "claim.json").write_text(json.dumps(meta))
        (folder / "input.json").write_bytes(raw)
        (folder / "scenes").write_text("3\n")
    (state / "seq").write_text(f"{n}\n")


def micro(seconds: list[float]) -> dict[str, float]:
    us = sorted(x * 1e6 for x in seconds)
    return {
        "median": statistics.median(us),
        "p99": us[min(len(us) - 1, int(len(us) * 0.99))],
        "max": us[-1],
    }


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queued", type=int, default=5000)
    ap.add_argument("--turns", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the state (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        for sub in ("inbox", "outbox"):
            (root / sub).mkdir()
        settings = settings_from_dict(
            {"paths": {"inbox": "inbox", "outbox": "outbox", "state": "state"}}, root, "bench"
        )
        make_queue(settings.paths.state, args.queued)
        loop = Loop(settings, Notifier(None), make_generator=lambda s: None)  # type: ignore[arg-type,return-value]
        t0 = time.perf_counter()
        loop.spool.open()
        opened = time.perf_counter() - t0
        assert len(loop.spool) == args.queued
        loop.watcher.start()
        try:
            rows = measure(loop, settings.paths.state, args.turns)
        finally:
            loop.watcher.stop()
            loop.spool.close()
        status_s = min(timed(lambda: status_report(settings.paths.state, 10), 3))
    print(f"Loop turn with {args.queued} valid stories queued ({args.turns} turns; µs unless noted)\n")
    print("| what | median | p99 | max |")
    print("|---|---|---|---|")
    for label, stats in rows:
        print(f"| {label} | {stats['median']:.0f} | {stats['p99']:.0f} | {stats['max']:.0f} |")
    print(f"\nSpool.open (reads the {args.queued} claims once, at start): {opened * 1000:.0f} ms")
    print(f"`storyreel status` report (reads every claim; a separate process): {status_s * 1000:.0f} ms")
    return 0


def measure(loop: Loop, state: Path, turns: int) -> list[tuple[str, dict[str, float]]]:
    def turn() -> None:
        loop.turn()
        loop.gate.next_claim(loop.spool, stopping=False, paused=loop.steering.paused)

    turn()  # the watcher's first look
    rows = [("a loop turn now (turn + next_claim)", micro(timed(turn, turns)))]
    old = timed(lambda: old_claims(loop.spool.queue), max(5, turns // 100))
    rows.append(("the old re-read alone (Spool.claims as it once was)", micro(old)))
    # A pause: one "paused" line for each queued story, in budgeted slices, then resume; idle,
    # then with a story "rendering" (turns inside denoising steps get the smaller budget).
    pause = state / "pause.json"
    for when, running in (("idle", None), ("while a story renders", loop.spool.head())):
        loop.steering.running = running
        for label, change in (
            ("'paused' lines", lambda: pause.write_text('{"by": "bench", "since": "now"}')),
            ("'queued' lines on resume", lambda: pause.unlink()),
        ):
            change()
            slices: list[float] = []
            t0 = time.perf_counter()
            while True:
                slices += timed(turn, 1)
                if not loop.steering.lines_owed:
                    break
            total = time.perf_counter() - t0
            rows.append(
                (f"turns writing the {label}, {when}: {len(slices)} turns, {total:.1f} s", micro(slices))
            )
    loop.steering.running = None
    return rows


if __name__ == "__main__":
    sys.exit(main())
