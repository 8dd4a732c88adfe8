"""A stop under Ray is a warm stop, every time: ten stops at seeded random moments.

One story of STORY_SCENES scenes, `[workers] engine = "ray"` with two CPU workers on a private
instance, the daemon in a session of its own. Ten runs of the daemon (TRIALS: four in make
test), each ended by SIGTERM or SIGINT sent to its whole process group (what systemd and a
terminal's Ctrl-C do), at a moment drawn from a seeded generator:
    starting     after its first start-up STATUS=, before READY=1 (the notify socket says which)
    idle         ready, the queue paused: nothing to do
    scene        a worker busy with a scene of the story
    restarting   a worker busy with a scene was killed (SIGKILL) and Ray is restarting it
Every run must exit 0 and leave no process behind (every process the daemon starts carries
the test's mark in its environment, Ray's included); a run that stopped the story says
"interrupted by stop; resumes at scene N" and the next run starts at scene N. Then one last run
finishes it: done once, every scene in the manifest once, the outputs whole.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from raytools import MARK, NotifySocket, marked

from conftest import Daemon, Setup, check_published, story, wait_for

# A group of its own: the module's trials run one after another, on one worker of make test.
pytestmark = pytest.mark.xdist_group("ray_stops")

if not os.environ.get("CI"):  # make test and CI install the [ray] extra: there, a missing Ray fails
    pytest.importorskip("ray")

RAY = {"engine": "ray", "count": 2, "gpus_per_worker": 0}
SEED = 21
# The ten: `STORYREEL_RAY_STOPS=10 pytest tests/test_ray_stops.py -s` (about six minutes on
# 2 cores: each trial starts Ray and two actors). make test runs the first four, one per moment.
MOMENTS = [
    "starting",
    "idle",
    "scene",
    "restarting",
    "starting",
    "idle",
    "scene",
    "scene",
    "restarting",
    "restarting",
]
TRIALS = int(os.environ.get("STORYREEL_RAY_STOPS", "4"))
STORY_SCENES = 14
GONE_SECONDS = 60.0  # how long the daemon's processes may take to be gone after it exits


def _busy(s: Setup) -> list[dict[str, Any]]:
    import json

    try:
        rows = json.loads((s.state / "current.json").read_text("utf-8")).get("workers") or []
    except (OSError, ValueError):
        return []
    return [w for w in rows if w.get("state") == "busy" and w.get("pid")]


def _stop_at(
    moment: str, rng: random.Random, s: Setup, daemon: Daemon, notify: NotifySocket, mark: int
) -> None:
    """Wait for the moment, then a random part of a second more."""
    if moment == "starting":
        wait_for(
            lambda: any(m.startswith("STATUS=") for m in notify.since(mark)),
            "a start-up STATUS=",
            daemon=daemon,
        )
        rng_sleep(rng, 1.5)
        assert "READY=1" not in notify.since(mark), "READY came before the stop: not a start-up moment"
        return
    wait_for(lambda: "READY=1" in notify.since(mark), "READY=1", daemon=daemon)
    if moment == "idle":
        wait_for(lambda: s.last_state("long") == "paused", "the story paused", daemon=daemon)
        rng_sleep(rng, 1.0)
        return
    rows = wait_for(lambda: _busy(s), "a worker busy with a scene", daemon=daemon)
    if moment == "scene":
        rng_sleep(rng, 0.8)
        return
    since = len(daemon.events())
    os.kill(rng.choice(rows)["pid"], signal.SIGKILL)
    daemon.wait_event("ray worker died", since)
    rng_sleep(rng, 0.3)


def _leftovers(tag: str) -> list[tuple[int, str]]:
    """What is still alive GONE_SECONDS after the daemon exited (then killed, for the next trial)."""
    try:
        wait_for(lambda: not marked(tag), "no process left", timeout=GONE_SECONDS)
        return []
    except AssertionError:
        left = marked(tag)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
        return left


def rng_sleep(rng: random.Random, most: float) -> None:
    """The random part of a moment (not a wait for anything: the moment itself)."""
    import time

    time.sleep(rng.uniform(0, most))


def test_ten_stops_at_random_moments_exit_0_and_the_story_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    rng = random.Random(SEED)
    moments = MOMENTS[:TRIALS]
    rng.shuffle(moments)
    s = Setup(tmp_path / "stops", tiny_dir, workers=RAY)
    s.drop("long.json", story(STORY_SCENES, "long"))
    faults = {"slow_step": 0.6}  # a scene lasts a second or two: a stop lands inside one
    results, resume_at = [], None
    for trial, moment in enumerate(moments):
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGINT
        pause = s.inbox / "PAUSE"
        if moment == "idle":
            pause.touch()
        tag = f"stops-{uuid.uuid4().hex[:8]}"
        notify = NotifySocket()
        try:
            lines_before = len(s.status("long"))
            daemon = s.start(env={MARK: tag, "NOTIFY_SOCKET": notify.path}, faults=faults, session=True)
            _stop_at(moment, rng, s, daemon, notify, 0)
            daemon.signal_group(sig)
            code = daemon.wait()
        finally:
            notify.close()
            pause.unlink(missing_ok=True)
        left = _leftovers(tag)
        lines = s.status("long")[lines_before:]
        started = [line["scene"] for line in lines if line["state"] == "processing"]
        if resume_at is not None and started:
            assert started[0] == resume_at, (trial, moment, started, resume_at)
            resume_at = None
        stopped = [
            line
            for line in lines
            if line["state"] == "queued" and "interrupted by stop" in line.get("reason", "")
        ]
        if stopped:
            resume_at = int(stopped[-1]["reason"].rsplit(" ", 1)[1])
        results.append((moment, signal.Signals(sig).name, code, left))
    print("stops:", results)
    assert [(r[2], r[3]) for r in results] == [(0, [])] * len(moments), results

    # The last run: the story ends done, once, whole.
    tag = f"stops-{uuid.uuid4().hex[:8]}"
    daemon = s.start(env={MARK: tag}, faults=faults)
    daemon.wait_for(lambda: s.last_state("long") == "done", "long done")
    assert daemon.stop() == 0
    wait_for(lambda: not marked(tag), "no process of the last run left", timeout=GONE_SECONDS)
    lines = s.status("long")
    assert [line["state"] for line in lines].count("done") == 1, lines
    manifest = check_published(s, "long", STORY_SCENES)
    assert [sc["scene"] for sc in manifest["scenes"]] == list(range(1, STORY_SCENES + 1))
