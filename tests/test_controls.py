"""Operators' controls through the real daemon, from the box (CLI) and from the share (files).

Scenes are held with conftest's `Setup.hold` (tests/faulty.py): until `release()` the scene
in progress does not finish, but the daemon keeps claiming and reading controls, as it
does while a slow GPU denoises. Every wait is on an event: a status line, a file, a log line.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from daemon.inbox.scan import control_of, scan_inbox

from conftest import Daemon, Setup, check_published, story, storyreel
from harness.mounts import mount_tmpfs

WAYS = ["box", "share"]


def states(s: Setup, name: str) -> list[str]:
    return [x["state"] for x in s.status(name)]


def current(s: Setup) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads((s.state / "current.json").read_text())
    except (OSError, ValueError):
        return {}
    return value


def ctl(s: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return storyreel(*args, "--config", str(s.config))


def start(s: Setup, faults: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Daemon:
    """A daemon (with `faults` armed); returns once its loop runs."""
    d = s.start(env=env, faults=faults)
    d.wait_for(lambda: current(s).get("pid") == d.proc.pid, "the daemon's first turn")
    return d


def kill_9(d: Daemon) -> None:
    d.proc.kill()
    d.wait()


def kept_bytes(s: Setup, name: str) -> bytes:
    return Path(s.status(name)[-1]["input_kept"]).read_bytes()


def share_file(s: Setup, name: str, mtime: float | None = None) -> Path:
    path = s.inbox / name
    path.write_text("")
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def pause(s: Setup, way: str) -> None:
    if way == "box":
        out = ctl(s, "pause")
        assert out.returncode == 0 and "paused" in out.stdout, out.stderr
    else:
        share_file(s, "PAUSE")


def resume(s: Setup, way: str) -> None:
    if way == "box":
        out = ctl(s, "resume")
        assert out.returncode == 0 and "resumed" in out.stdout, out.stderr
    else:
        held = ctl(s, "resume")  # the box cannot lift the share's pause: it says so
        assert held.returncode == 1 and "still paused by inbox/PAUSE" in held.stderr, held
        (s.inbox / "PAUSE").unlink()


def control(s: Setup, way: str, action: str, name: str, mtime: float | None = None) -> None:
    if way == "box":
        out = ctl(s, action, name)
        assert out.returncode == 0 and f"{action} requested" in out.stdout, out.stderr
    else:
        share_file(s, f"{name}.{action}", mtime)


class NotifySocket:
    """systemd's side of sd_notify: every datagram the daemon sends, collected on a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


# -- the command line alone (no daemon) ---------------------------------------------------


def test_commands_on_a_state_folder_without_a_daemon(tmp_path: Path) -> None:
    s = Setup(tmp_path, tmp_path / "no-model-needed")
    for action in ("cancel", "retry"):
        out = ctl(s, action, "ghost")
        assert out.returncode == 1 and "no story named 'ghost'" in out.stderr, out
        assert out.stderr.count("\n") == 1  # one line, no traceback
    out = ctl(s, "pause")
    assert out.returncode == 0 and "starts paused" in out.stdout, out
    again = ctl(s, "pause")
    assert again.returncode == 0 and "already paused by" in again.stdout
    status = ctl(s, "status").stdout
    assert "paused: by " in status and "(storyreel pause)" in status
    assert "holds when the daemon starts" in status
    out = ctl(s, "resume")
    assert out.returncode == 0 and out.stdout.strip() == "resumed"
    assert ctl(s, "resume").stdout.strip() == "not paused"
    assert not (s.state / "pause.json").exists()


def test_which_names_on_the_share_are_controls(tmp_path: Path) -> None:
    counted = {
        "PAUSE": ("pause", ""),
        "pause": ("pause", ""),
        "lighthouse.cancel": ("cancel", "lighthouse"),
        "Harbour Story.CANCEL": ("cancel", "Harbour Story"),
        "a.b.retry": ("retry", "a.b"),
    }
    ignored = [".hidden.cancel", ".cancel", "x.cancel.tmp", "x.retry~", "~$x.cancel", "PAUSE.txt", "README"]
    for name, found in counted.items():
        assert control_of(name) == found, name
    for name in [*ignored, "story.json", "notes.txt"]:
        assert control_of(name) is None, name
    for name in [*counted, *ignored, "story.json"]:
        (tmp_path / name).write_text("")
    (tmp_path / "folder.cancel").mkdir()  # a folder is never a control
    scan = scan_inbox(tmp_path)
    assert set(scan.controls) == set(counted) and set(scan.entries) == {"story.json"}


# -- through the daemon --------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
def test_pause_mid_story_holds_across_kill_9_then_resumes(tmp_path: Path, tiny_dir: Path, way: str) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("a.json", story(3, "a"))
    d = start(s, s.hold(scene="a scene 0 of"))
    d.wait_for(lambda: s.last_state("a") == "processing", "a at its first scene")
    # Feedback while a story renders: a drop is claimed, a broken one failed, while scene 1 is held.
    s.drop("b.json", story(1, "b"))
    s.drop("c.json", b'{"scenes": ["x"')
    d.wait_for(lambda: (s.last_state("b"), s.last_state("c")) == ("queued", "failed"), "b queued, c failed")
    assert s.status("a")[-1] == {**s.status("a")[-1], "state": "processing", "scene": 1}
    pause(s, way)
    d.wait_for(lambda: s.last_state("b") == "paused", "b's paused line")
    report = ctl(s, "status").stdout
    who = "(storyreel pause)" if way == "box" else "inbox/PAUSE"
    assert "paused: by " in report and who in report and " since " in report, report
    s.release()  # the scene in progress finishes; nothing new starts
    d.wait_for(lambda: s.last_state("a") == "paused", "a paused after its scene in progress")
    assert s.status("a")[-1]["scene"] == 1

    kill_9(d)
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        d = start(s, env={"NOTIFY_SOCKET": str(sock.path)})
        d.wait_for(lambda: current(s).get("paused"), "the restarted daemon paused")
        d.wait_for(lambda: any("STATUS=paused" in m and who in m and "since" in m for m in sock.messages))
    finally:
        sock.close()
    s.drop("d.json", story(1, "d"))  # claims go on while paused: the order is kept
    d.wait_for(lambda: states(s, "d") == ["queued", "paused"], "d queued, then paused")
    assert states(s, "a").count("paused") == 1 and states(s, "b").count("paused") == 1  # once, not per poll
    assert not [x for x in s.status("a") if x["state"] == "processing" and x["scene"] >= 2]
    report = ctl(s, "status").stdout
    assert [line.split()[:3] for line in report.splitlines() if "starts once resumed" in line] == [
        [f"{i}.", f"#{s.status(n)[-1]['seq']}", n] for i, n in enumerate("abd", 1)
    ], report

    resume(s, way)
    d.wait_for(lambda: all(s.last_state(n) == "done" for n in "abd"), "all done after resume")
    assert d.stop() == 0, d.output()
    check_published(s, "a", 3)
    assert states(s, "a") == ["queued", "processing", "paused", "queued", "processing", "processing", "done"]
    # Resumed, not redone:
    assert [x["scene"] for x in s.status("a") if x["state"] == "processing"] == [1, 2, 3]
    done = [s.status(n)[-1]["time"] for n in "abd"]
    assert done == sorted(done)
    assert not (s.state / "pause.json").exists() and not (s.inbox / "PAUSE").exists()


@pytest.mark.parametrize("way", WAYS)
def test_cancel_and_retry_across_kill_9(tmp_path: Path, tiny_dir: Path, way: str) -> None:
    s = Setup(tmp_path, tiny_dir)
    hold = s.hold(scene="r scene 0 of")
    now = time.time()
    for i, (name, n) in enumerate((("r", 2), ("q1", 1), ("q2", 1), ("d", 1))):
        s.drop(f"{name}.json", story(n, name), mtime=now - 10 + i)
    raw = {p.stem: p.read_bytes() for p in s.inbox.glob("*.json")}
    d = start(s, hold)
    busy = ["processing", "queued", "queued", "queued"]
    d.wait_for(lambda: [s.last_state(n) for n in ("r", "q1", "q2", "d")] == busy, "r running, 3 queued")

    control(s, way, "cancel", "q1")  # queued: ends at once, the running story goes on
    d.wait_for(lambda: s.last_state("q1") == "cancelled", "q1 cancelled")
    assert kept_bytes(s, "q1") == raw["q1"]
    assert s.last_state("r") == "processing"

    kill_9(d)
    control(s, way, "cancel", "q2")  # the daemon is down: the request waits for it
    d = start(s, hold)  # r resumes at scene 1, held again
    d.wait_for(lambda: s.last_state("q2") == "cancelled", "q2 cancelled after the restart")
    d.wait_for(lambda: states(s, "r").count("processing") == 2, "r resumed at scene 1")

    control(s, way, "cancel", "r")  # running: after its scene in progress
    d.logged("cancel requested, stopping after the scene in progress")
    assert s.last_state("r") == "processing"
    s.release()
    d.wait_for(lambda: (s.last_state("r"), s.last_state("d")) == ("cancelled", "done"), "r cancelled")
    last = s.status("r")[-1]
    assert (last["scene"], last["scenes"]) == (1, 2) and kept_bytes(s, "r") == raw["r"]
    for name in ("q1", "q2", "r"):
        assert not (s.outbox / name).exists() and not (s.outbox / f"{name}.zip").exists()  # nothing published
    kept = {name: Path(s.status(name)[-1]["input_kept"]) for name in ("q1", "r")}

    kill_9(d)
    t = time.time()
    control(s, way, "retry", "q1", mtime=t - 5)  # cancelled, queued: back in the queue, same name
    control(s, way, "retry", "r", mtime=t - 4)  # cancelled while running
    refused = {
        ("retry", "d"): "d is done; drop the file again",
        ("cancel", "ghost"): "no story named 'ghost'",
        ("cancel", "d"): "d already ended done",
    }
    for i, ((action, name), message) in enumerate(refused.items()):
        if way == "box":
            out = ctl(s, action, name)
            assert out.returncode == 1 and message in out.stderr and out.stderr.count("\n") == 1, out
        else:
            share_file(s, f"{name}.{action}", t - 3 + i)
    d = start(s)
    d.wait_for(lambda: (s.last_state("q1"), s.last_state("r")) == ("done", "done"), "retried: done")
    if way == "share":
        d.wait_for(lambda: sorted(p.name for p in s.inbox.iterdir()) == [], "every control file consumed")
        report = ctl(s, "status").stdout
        for (action, name), message in refused.items():
            assert f"inbox/{name}.{action}: {message}" in report, report
    assert d.stop() == 0, d.output()
    assert states(s, "q1") == ["queued", "cancelled", "queued", "processing", "done"]
    assert states(s, "r")[-5:] == ["cancelled", "queued", "processing", "processing", "done"]
    assert states(s, "d") == ["queued", "processing", "done"]  # the refusals changed nothing
    check_published(s, "q1", 1)
    check_published(s, "r", 2)
    seq = {n: json.loads((s.outbox / n / "manifest.json").read_text())["sequence"] for n in ("d", "q1", "r")}
    assert seq["d"] < seq["q1"] < seq["r"]  # re-entered at the end of the queue, in request order
    assert all(p.read_bytes() == raw[n] for n, p in kept.items())  # the earlier input_kept stays true
    assert not any((s.state / "control").glob("*"))


@pytest.mark.parametrize("way", WAYS)
def test_retry_failed_after_kill_9(tmp_path: Path, tiny_dir: Path, way: str) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("f.json", story(2, "f"))
    raw = (s.inbox / "f.json").read_bytes()
    d = s.start(faults={"oom": 3})  # every rung of the CPU ladder fails once
    d.wait_for(lambda: s.last_state("f") == "failed", "f failed")
    assert "out of memory" in s.status("f")[-1]["error"].lower() and kept_bytes(s, "f") == raw
    kill_9(d)
    d = start(s)
    control(s, way, "retry", "f")
    d.wait_for(lambda: s.last_state("f") == "done", "f done after retry")
    assert d.stop() == 0, d.output()
    assert states(s, "f") == ["queued", "processing", "failed", "queued", "processing", "processing", "done"]
    check_published(s, "f", 2)
    assert not (s.inbox / "f.retry").exists()
    out = ctl(s, "retry", "f")
    assert out.returncode == 1 and "f is done; drop the file again to redo it" in out.stderr


HOOK = """#!/bin/sh
# A hook for tests; what it does depends on the story's name.
dir="$1"
was=gone
if [ -f "$dir/hang.pid" ] && grep -qv '^Z' "/proc/$(cat "$dir/hang.pid")/stat" 2>/dev/null; then was=alive; fi
echo "start $STORYREEL_NAME hang:$was" >> "$dir/journal"
env | grep '^STORYREEL_' | sort > "$dir/$STORYREEL_NAME.env"
case "$STORYREEL_NAME" in
  hang) sleep 600 & echo $! > "$dir/hang.child"; echo $$ > "$dir/hang.pid"; exec sleep 600 ;;
  fail) echo "boom: the webhook said 500" >&2; exit 3 ;;
esac
echo "end $STORYREEL_NAME" >> "$dir/journal"
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent (PID 1 of a container may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def log_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_hooks_that_succeed_fail_hang_and_are_missing(tmp_path: Path, tiny_dir: Path) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text(HOOK)
    hook.chmod(0o755)
    box = tmp_path / "hooked"
    box.mkdir()
    argv = [str(hook), str(box)]
    s = Setup(tmp_path / "one", tiny_dir, hooks={"on_done": argv, "on_failed": argv, "timeout_seconds": 20.0})
    now = time.time()
    s.drop("bad.json", b"not json at all", mtime=now - 4)
    for i, name in enumerate(("hang", "ok", "fail")):
        s.drop(f"{name}.json", story(1, name), mtime=now - 3 + i)
    result = s.run_once()  # --once waits for the hooks of its stories before it exits
    assert result.returncode == 0, result.stderr[-3000:]
    assert [s.last_state(n) for n in ("bad", "hang", "ok", "fail")] == ["failed", "done", "done", "done"]

    # One at a time per hook, in the order the stories ended; the hung one killed with its group first.
    journal = (box / "journal").read_text().splitlines()
    assert [line for line in journal if "bad" not in line] == [
        "start hang hang:gone",
        "start ok hang:gone",
        "end ok",
        "start fail hang:gone",
    ], journal
    assert "end bad" in journal  # on_failed: a thread and queue of its own
    assert not alive(int((box / "hang.pid").read_text())) and not alive(int((box / "hang.child").read_text()))

    env = dict(line.split("=", 1) for line in (box / "ok.env").read_text().splitlines())
    assert env["STORYREEL_STATE"] == "done" and env["STORYREEL_ERROR"] == ""
    assert Path(env["STORYREEL_ZIP"]) == s.outbox / "ok.zip" and Path(env["STORYREEL_ZIP"]).is_file()
    assert json.loads(Path(env["STORYREEL_MANIFEST"]).read_text())["story"] == "ok"
    assert env["STORYREEL_OUTBOX"] == str(s.outbox)
    failed = dict(line.split("=", 1) for line in (box / "bad.env").read_text().splitlines())
    assert failed["STORYREEL_STATE"] == "failed" and "not valid JSON" in failed["STORYREEL_ERROR"]
    assert (
        failed["STORYREEL_ZIP"] == ""
        and Path(failed["STORYREEL_INPUT_KEPT"]).read_bytes() == b"not json at all"
    )

    logs = log_lines(result.stderr)
    hung = next(x for x in logs if x["event"] == "hook timed out and was killed")
    assert hung["story"] == "hang" and hung["timeout_seconds"] == 20.0
    # Never holding up the queue: the stories after it were done while it hung.
    assert s.status("fail")[-1]["time"] < hung["timestamp"].replace("Z", "+00:00")
    bad = next(x for x in logs if x["event"] == "hook failed")
    assert bad["story"] == "fail" and bad["exit_code"] == 3 and "boom: the webhook said 500" in bad["output"]
    assert any(x["event"] == "hook ran" and x["story"] == "ok" for x in logs)

    missing = Setup(tmp_path / "two", tiny_dir, hooks={"on_done": [str(tmp_path / "no-such-hook")]})
    missing.drop("m.json", story(1, "m"))
    result = missing.run_once()
    assert result.returncode == 0, result.stderr[-3000:]
    check_published(missing, "m", 1)
    gone = next(x for x in log_lines(result.stderr) if x["event"] == "hook could not start")
    assert gone["story"] == "m" and "No such file" in gone["error"] and "no-such-hook" in gone["error"]


def fill(folder: Path) -> Path:
    """Write until the filesystem says ENOSPC, down to the last page."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)
    return filler


def test_full_outbox_waits_then_bad_fails_and_good_is_done(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    mount_tmpfs(s.outbox, "2m", "the outbox")
    d: Daemon | None = None
    try:
        d = start(s)
        filler = fill(s.outbox)
        bad = b'{"scenes": [{"description": "a pier", "motion": "spin"}]}'
        now = time.time()
        s.drop("bad.json", bad, mtime=now - 2)
        s.drop("good.json", story(1, "good"), mtime=now - 1)
        queue = s.state / "spool" / "queue"
        d.wait_for(lambda: len(list(queue.iterdir())) == 2, "both claimed")
        d.wait_for(lambda: "No space left" in str(current(s).get("waiting")), "waiting on the full outbox")
        report = ctl(s, "status").stdout
        assert "waiting: cannot finish the ending of bad" in report and "No space left" in report, report
        assert "bad" in report and "ending failed" in report, report
        assert re.search(r"\s1\. #\d+\s+good\s+queued", report), report
        assert not s.status("bad") and not s.status("good")  # the outbox took nothing, not even a file
        assert not list(queue.glob("*/attempts.json"))  # good never started: bad's ending goes first

        filler.unlink()  # space comes back
        d.wait_for(lambda: (s.last_state("bad"), s.last_state("good")) == ("failed", "done"), "through")
        assert d.stop() == 0, d.output()
        assert states(s, "bad") == ["queued", "failed"] and "scenes.0.motion" in s.status("bad")[-1]["error"]
        assert kept_bytes(s, "bad") == bad
        assert states(s, "good") == ["queued", "processing", "done"]
        assert s.status("good")[0]["time"] > s.status("bad")[-1]["time"]  # in order, nothing stuck
        check_published(s, "good", 1)
        history = [json.loads(x) for x in (s.state / "history.jsonl").read_text().splitlines()]
        assert sorted(h["story"] for h in history) == ["bad", "good"]
        assert list(queue.iterdir()) == []
    finally:
        if d is not None and d.proc.poll() is None:
            d.proc.kill()
            d.wait()
        subprocess.run(["umount", str(s.outbox)], capture_output=True, timeout=60)


def seconds_in(text: str) -> float:
    """'(in 12.3s)', '(in 1m05s)', '(in 1h02m)' -> seconds, as status prints them."""
    m = re.search(r"\(in (?:(\d+)h)?(?:(\d+)m)?(?:([\d.]+)s)?\)", text)
    assert m, text
    h, mi, s = (float(x) if x else 0.0 for x in m.groups())
    return h * 3600 + mi * 60 + s


def test_status_shows_positions_and_estimated_starts(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("first.json", story(2, "first"))
    assert s.run_once().returncode == 0  # a story made: there is a pace to go by
    pace = json.loads((s.state / "history.jsonl").read_text().splitlines()[-1])["pace"]
    now = time.time()
    for i, (name, n) in enumerate((("x", 2), ("y", 1), ("z", 3))):
        s.drop(f"{name}.json", story(n, name), mtime=now - 5 + i)
    d = start(s, s.hold(scene="x scene 0 of"))
    busy = ("processing", "queued", "queued")
    d.wait_for(
        lambda: (s.last_state("x"), s.last_state("y"), s.last_state("z")) == busy, "x held, y, z queued"
    )
    report = ctl(s, "status").stdout
    s.release()
    queued = [line for line in report.splitlines() if "starts ~" in line]
    assert [line.split()[:3] for line in queued] == [
        ["1.", f"#{s.status('y')[-1]['seq']}", "y"],
        ["2.", f"#{s.status('z')[-1]['seq']}", "z"],
    ], report
    assert "queue: 3 stories (pace" in report and re.search(r"now +#\d+ +x +processing, scene 1/2", report)
    y_in, z_in = (seconds_in(line) for line in queued)
    # x has its scenes 1-2 to make (no ETA of its own yet), then y's one scene: each at the pace.
    assert abs(y_in - 2 * pace) <= 0.15 * pace + 1 and abs(z_in - y_in - pace) <= 0.15 * pace + 1, report
    d.wait_for(lambda: s.last_state("z") == "done", "all done")
    assert d.stop() == 0


def test_the_doorbell_wakes_the_loop_and_rings_into_nothing_else(tmp_path: Path) -> None:
    """The commands ring state/doorbell after writing a request; the daemon's loop sleeps on it."""
    from daemon.queue.controls import DOORBELL, open_doorbell, pause_from_box, ring, submit
    from daemon.system.wake import Waker

    ring(tmp_path)  # no daemon has run here: nothing to ring, no error
    (tmp_path / DOORBELL).write_text("not a fifo")
    ring(tmp_path)
    assert (tmp_path / DOORBELL).read_text() == "not a fifo"  # never written into
    wake = Waker()
    assert not wake.listening
    wake.listen(open_doorbell(tmp_path))  # replaces what is not a FIFO
    assert wake.listening and stat.S_ISFIFO((tmp_path / DOORBELL).stat().st_mode)
    for request in (lambda: pause_from_box(tmp_path, "ana"), lambda: submit(tmp_path, "cancel", "x", "ana")):
        request()
        started = time.monotonic()
        wake.wait(600)  # returns at once: the command rang
        assert time.monotonic() - started < 300
    wake.wait(0)  # drained: nothing left to wake it
    for _ in range(100_000):  # a full doorbell (64 KiB) never blocks a command
        ring(tmp_path)
    wake.close()
    ring(tmp_path)  # the daemon gone: ENXIO, ignored
