"""The constants of a test run, and the ways to run one storyreel command or wait for a condition.

Waiting is on events: a file appears, a line is logged, a process exits. Timeouts here only
bound a hung test; none decides an outcome, so a heavily loaded machine makes a test slower,
never red.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import forked

if TYPE_CHECKING:
    from harness.daemons import Daemon

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
FAULTY = REPO / "tests" / "faulty.py"

# How long one wait may take before the test is called hung. Generous on purpose: it must
# never be what fails a test on a slow machine (pytest-timeout, 600 s, is the last guard).
HANG_SECONDS = 300.0

# Small enough for 2 CPU cores, big enough for a real VAE (latents are 1/8) and H.264 (even sizes).
SMALL = {
    "image": {"width": 64, "height": 48, "steps": 2},
    "video": {
        "fps": 8,
        "seconds_per_scene": 1.0,
        "fade_seconds": 0.25,
        "crossfade_seconds": 0.25,
        "preset": "ultrafast",
    },
    "watch": {"poll_seconds": 0.2, "settle_seconds": 0.3, "rescan_seconds": 1.0},
    "daemon": {"retry_min_seconds": 0.2, "retry_max_seconds": 1.0},
}


def story(n: int, tag: str = "", seed: int = 3) -> dict[str, object]:
    """A valid story of `n` scenes; `tag` names it and starts every scene description."""
    return {"title": tag, "seed": seed, "scenes": [f"{tag} scene {i} of a quiet harbour" for i in range(n)]}


def command(faults: dict[str, Any] | None = None) -> list[str]:
    """The storyreel command line: as shipped, or through tests/faulty.py with `faults` armed."""
    if faults:
        return [sys.executable, str(FAULTY), json.dumps(faults)]
    return [sys.executable, "-m", "daemon.cli"]


def storyreel(
    *args: str,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    faults: dict[str, Any] | None = None,
    timeout: float = HANG_SECONDS,
    cold: bool = False,
) -> subprocess.CompletedProcess[str]:
    """One storyreel command to its end, output captured. `storyreel run` is forked from the warm
    server (tests/forked.py) unless `cold`; the other commands import little and start cold."""
    if args[0] == "run" and not cold:
        return forked.run(
            list(args), cwd=cwd, env={**os.environ, **(env or {})}, faults=faults, timeout=timeout
        )
    return subprocess.run(
        [*command(faults), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(
    predicate: Callable[[], Any],
    what: str = "condition",
    *,
    timeout: float = HANG_SECONDS,
    daemon: Daemon | None = None,
) -> Any:
    """Poll a condition (files on disk have no event to wait on) until it holds.

    With `daemon`, its exit is the other event: waiting on a dead daemon fails at once.
    Polling backs off (20 ms up to 250 ms), so a long wait leaves the CPU to the daemon.
    """
    deadline, pause = time.monotonic() + timeout, 0.02
    while True:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            value = predicate()  # it may have exited right after making the condition true
            if value:
                return value
            code, log = daemon.proc.returncode, daemon.output()[-3000:]
            raise AssertionError(f"daemon exited ({code}) while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"hung: no {what} after {timeout}s")
        time.sleep(pause)
        pause = min(0.25, pause * 1.5)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
