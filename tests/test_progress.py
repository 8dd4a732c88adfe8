"""On a terminal, `storyreel run` (the daemon, not only --once) draws a progress bar per story,
and log lines never land inside a bar."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from conftest import REPO, Setup, wait_for

pytestmark = pytest.mark.slow

_BAR = re.compile(r"\d+%\|")  # tqdm's "50%|█████     | 1/2"


class Terminal:
    """A pseudo-terminal as the daemon's stderr, read into memory as it writes."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        # A terminal 120 columns wide: a new pty is 0 x 0, and tqdm trims its bar to the width.
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.data = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                return
            if not chunk:
                return
            self.data.extend(chunk)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self.slave)
        self._reader.join(30)
        os.close(self.master)


def test_the_daemon_draws_a_bar_per_story_and_logs_above_it(setup: Setup) -> None:
    term = Terminal()
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "--config", str(setup.config)],
        cwd=REPO,
        env={**env, "TERM": "xterm"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=term.slave,
    )
    try:
        wait_for(lambda: "ready" in term.text(), what="the daemon to be ready")
        for name in ("first", "second"):
            setup.drop(f"{name}.json", {"scenes": ["a lighthouse at dusk", "a boat in fog"]})
            wait_for(lambda n=name: setup.last_state(n) == "done", what=f"{name} done")  # type: ignore[misc]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        term.close()
    out = term.text()
    for name in ("first", "second"):  # tqdm's description is the story's name
        assert re.search(rf"{name}: 100%\|.*\| 2/2", out), f"no finished bar for {name}:\n{out[-3000:]}"
    # What a terminal shows on each line is what follows its last carriage return. A log line
    # printed past tqdm would sit on the bar's own line: "first:  50%|███  | 1/2 [...]2026-… scene".
    for line in out.replace("\r\n", "\n").split("\n"):
        shown = line.rsplit("\r", 1)[-1]
        if "scene started" in shown or "scene finished" in shown or "published" in shown:
            assert not _BAR.search(shown), f"a log line drawn into a bar: {shown!r}"


def test_no_bar_when_stderr_is_not_a_terminal(setup: Setup, tmp_path: Path) -> None:
    setup.drop("plain.json", {"scenes": ["a lighthouse at dusk"]})
    done = setup.run_once()
    assert done.returncode == 0, done.stderr
    assert not _BAR.search(done.stderr), "a progress bar in a log file"
