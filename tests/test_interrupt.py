"""Ctrl-C on a terminal: SIGINT reaches the daemon's whole process group, helpers included.

The README promises a warm stop: the scene in progress is finished, the daemon exits 0, and the
story resumes on the next start. A helper (ffmpeg) that the same Ctrl-C reaches must not turn
that into a failed story.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, Setup, check_published, wait_for

pytestmark = pytest.mark.slow


def test_sigint_to_the_process_group_mid_encode_is_a_warm_stop(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("keeper.json", {"title": "The keeper", "scenes": ["the cliff", "the lamp", "the sea"]})
    release = tmp_path / "release"
    faulty = [sys.executable, str(REPO / "tests" / "faulty.py"), json.dumps({"hold_encode": str(release)})]
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*faulty, "run", "--config", str(s.config)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
    try:
        # Scene 1's clip is being encoded: ffmpeg is running, waiting for the next frame.
        wait_for(lambda: "FAULT holding encode" in log_path.read_text(), what="the first encode")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the daemon and its children
        release.touch()
        assert proc.wait(timeout=300) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    states = [line["state"] for line in s.status("keeper")]
    assert "failed" not in states, log_path.read_text()
    assert states[-1] != "done", "the stop came before the last scene: the story must still be unfinished"

    rerun = s.run_once()
    assert rerun.returncode == 0, rerun.stderr
    check_published(s, "keeper", 3)
