"""A share that stops answering never freezes the daemon: a real sshfs mount holding the inbox and
the outbox, its sshd frozen with SIGSTOP (every call on the mount hangs in the kernel) while a
story renders, then continued with SIGCONT. Servers and mounts: tests/shares.py.

The test plays systemd: the daemon's notify socket is the test's, with a watchdog period of a few
seconds, and each datagram is stamped by the kernel as it is sent. One daemon run is shared by
the assertions (a module fixture): the freeze while a story renders and publishes, then a SIGTERM
while frozen.
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from test_shares import on_share

from conftest import Daemon, Setup, check_published, story, storyreel, wait_for
from shares import SftpShare, require, sftp_share

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("frozen_share")]

# WATCHDOG_USEC, in seconds: WatchdogSec= of a unit that expects pings this often. (A late ping
# is logged with where the loop's thread was: daemon/system/stall.py.)
PERIOD = 4.0
FROZEN_PERIODS = 3  # how long the share stays frozen once the daemon says it is waiting
SCENES = 5
STOP_LIMIT = 30.0  # well inside the unit's TimeoutStopSec=120s (systemd/storyreel.service)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; not in the socket module


class Manager:
    """systemd's end of the notify socket: every datagram, with the kernel's time it was sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except TimeoutError:
                continue
            ((_, _, stamp),) = ancdata
            sec, nsec = struct.unpack("qq", stamp[:16])
            self.messages.append((sec + nsec / 1e9, data.decode()))

    def pings(self, start: float, end: float) -> list[float]:
        return [t for t, m in list(self.messages) if "WATCHDOG=1" in m.split("\n") and start <= t <= end]

    def statuses(self, since: float) -> list[str]:
        return [
            line
            for t, m in list(self.messages)
            if t >= since
            for line in m.split("\n")
            if line.startswith("STATUS=")
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def gaps(pings: list[float], start: float, end: float) -> list[float]:
    """The pauses between pings over [start, end], its ends included: a silence at either end counts."""
    times = [start, *pings, end]
    return [b - a for a, b in itertools.pairwise(times)]


def current(s: Setup) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads((s.state / "current.json").read_text())
    except (OSError, ValueError):
        return {}
    return value


def outbox_not_answering(reason: object) -> bool:
    """The waiting reason names the outbox among the folders not answering."""
    return any("outbox " in part and "not answering" in part for part in str(reason).split("; "))


def records(s: Setup) -> set[str]:
    """Scenes finished on local disk (the spool's work folders), by file name."""
    return {p.name for p in (s.state / "spool" / "queue").glob("*/work/records/scene_*.json")}


def within(predicate: Any, seconds: float) -> bool:
    """Whether `predicate` comes true within `seconds`: a test that fails goes on, to measure."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def timed(s: Setup, *args: str) -> tuple[Any, float]:
    t0 = time.monotonic()
    out = storyreel(*args, "--config", str(s.config), timeout=60)
    return out, time.monotonic() - t0


@dataclass
class Run:
    s: Setup
    frozen_gaps: list[float] = field(default_factory=list)  # between pings, while the share was frozen
    frozen_seconds: float = 0.0
    said_waiting: str = ""  # what `storyreel status` said meanwhile
    statuses: list[str] = field(default_factory=list)  # STATUS= while frozen
    made_while_frozen: set[str] = field(default_factory=set)  # scenes finished while frozen
    answers: dict[str, Any] = field(default_factory=dict)  # command -> (completed, seconds)
    paused_seen: bool = False
    stop_seconds: float = 0.0  # from SIGTERM to the process's own end (gone, or a zombie)
    stuck_at_stop: int = 0  # its threads the kernel still held then (stuck on the frozen mount)
    reaped_seconds: float = 0.0  # from the share's answer to the exit status
    stop_code: int | None = None
    stop_gaps: list[float] = field(default_factory=list)
    log: str = ""


def freeze_while_rendering(s: Setup, d: Daemon, share: SftpShare, manager: Manager, run: Run) -> None:
    """Phase 1: frozen from scene 2 of "a" until the daemon has said waiting for several periods;
    meanwhile status, cancel (of the queued "b"), pause and resume answer."""
    wait_for(lambda: s.last_state("a") == "processing" and len(s.status("a")) >= 3, "a at scene 2", daemon=d)
    wait_for(lambda: s.last_state("b") == "queued", "b queued", daemon=d)
    with share.server.frozen():
        t0 = time.time()
        before = records(s)
        # The inbox is on the same mount and may be found first; the outbox is, at its next write.
        within(lambda: outbox_not_answering(current(s).get("waiting")), FROZEN_PERIODS * PERIOD)
        out, seconds = timed(s, "status")
        run.answers["status"] = (out, seconds)
        run.said_waiting = out.stdout
        out, seconds = timed(s, "cancel", "b")
        run.answers["cancel"] = (out, seconds)
        within(lambda: time.time() - t0 > FROZEN_PERIODS * PERIOD, FROZEN_PERIODS * PERIOD + 1)
        run.made_while_frozen = records(s) - before
        out, seconds = timed(s, "pause")
        run.answers["pause"] = (out, seconds)
        run.paused_seen = within(lambda: current(s).get("paused"), 2 * PERIOD)
        out, seconds = timed(s, "resume")
        run.answers["resume"] = (out, seconds)
        within(lambda: not current(s).get("paused"), 2 * PERIOD)
        t1 = time.time()
    run.frozen_seconds = t1 - t0
    run.frozen_gaps = gaps(manager.pings(t0, t1), t0, t1)
    run.statuses = manager.statuses(t0)
    wait_for(lambda: s.last_state("a") == "done", "a done once the share answers", daemon=d)
    wait_for(lambda: s.last_state("b") == "cancelled", "b cancelled once the share answers", daemon=d)


def ended_itself(pid: int) -> bool:
    """Whether the process has done its part of exiting: gone, or a zombie (its main thread ended,
    the kernel holding it for a thread still in an uninterruptible call on the mount)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stop_while_frozen(s: Setup, d: Daemon, share: SftpShare, manager: Manager, run: Run) -> None:
    """Phase 2: "c" renders, the share freezes, the daemon says waiting, SIGTERM: it ends itself
    (exit status 0) soon, the share still frozen; the kernel lets the process go once the share
    answers (a FUSE call its server has taken is an uninterruptible wait: nothing ends it)."""
    s.drop("c.json", story(3, "c"))
    wait_for(lambda: s.last_state("c") == "processing", "c processing", daemon=d)
    with share.server.frozen():
        t0 = time.time()
        within(lambda: "not answering" in str(current(s).get("waiting")), FROZEN_PERIODS * PERIOD)
        signalled = time.monotonic()
        d.signal(signal.SIGTERM)
        within(lambda: ended_itself(d.proc.pid), STOP_LIMIT)
        run.stop_seconds = time.monotonic() - signalled
        t1 = time.time()
        run.stuck_at_stop = len(list(Path(f"/proc/{d.proc.pid}/task").glob("*")))
        answered = time.monotonic()
    try:
        run.stop_code = d.wait(timeout=STOP_LIMIT)
    except subprocess.TimeoutExpired:
        run.stop_code = None
    run.reaped_seconds = time.monotonic() - answered
    run.stop_gaps = gaps(manager.pings(t0, t1), t0, t1)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[Run]:
    require("sftp")
    root = tmp_path_factory.mktemp("frozen-share")
    with sftp_share(root / "sftp") as share:
        mount = (share.on_mount("inbox"), share.on_mount("outbox"))
        s = on_share(root, tiny_dir, mount, (share.on_server("inbox"), share.on_server("outbox")))
        manager = Manager(root / "notify.sock")
        result = Run(s)
        now = time.time()
        s.drop("a.json", story(SCENES, "a"), mtime=now - 2)
        s.drop("b.json", story(1, "b"), mtime=now - 1)
        env = {"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": str(int(PERIOD * 1e6))}
        d = s.start(env=env, faults={"slow_step": 0.5})
        try:
            freeze_while_rendering(s, d, share, manager, result)
            stop_while_frozen(s, d, share, manager, result)
        finally:
            if d.proc.poll() is None:
                d.proc.kill()
                d.wait()
            manager.close()
            result.log = d.output()
        print(
            f"\nfrozen {result.frozen_seconds:.1f}s: longest ping gap {max(result.frozen_gaps):.2f}s "
            f"(watchdog {PERIOD:g}s); SIGTERM while frozen: exit {result.stop_code} "
            f"in {result.stop_seconds:.2f}s ({result.stuck_at_stop} threads held by the kernel, "
            f"reaped {result.reaped_seconds:.2f}s after the share answered), "
            f"longest gap {max(result.stop_gaps):.2f}s"
        )
        yield result


def test_the_watchdog_is_pinged_all_through_a_freeze(run: Run) -> None:
    assert run.frozen_gaps and max(run.frozen_gaps) <= PERIOD, (max(run.frozen_gaps), run.log[-3000:])


def test_status_says_waiting_because_the_outbox_is_not_answering(run: Run) -> None:
    said = run.said_waiting
    assert "waiting: " in said and outbox_not_answering(said), said
    assert any("waiting: " in x and outbox_not_answering(x) for x in run.statuses), run.statuses


def test_the_commands_answer_while_frozen(run: Run) -> None:
    for command, (out, seconds) in run.answers.items():
        assert out.returncode == 0, (command, out.stderr)
        assert seconds < PERIOD * 2, (command, seconds)
    assert run.paused_seen


def test_the_story_goes_on_on_local_disk(run: Run) -> None:
    assert len(run.made_while_frozen) >= 2, (
        f"scenes finished while the share was frozen: {run.made_while_frozen}"
    )


def test_after_the_freeze_the_story_publishes_once_complete(run: Run) -> None:
    s = run.s
    check_published(s, "a", SCENES)
    lines = s.status("a")
    states = [x["state"] for x in lines]
    assert states.count("done") == 1 and states[-1] == "done", states
    assert states[0] == "queued" and "failed" not in states, states
    scenes = [x["scene"] for x in lines if x["state"] == "processing"]
    assert scenes == sorted(scenes) and set(scenes) == set(range(1, SCENES + 1)), scenes
    times = [x["time"] for x in lines]
    assert times == sorted(times), "the sidecar's lines in the order they were said"
    waiting = [x for x in lines if x["state"] == "waiting"]
    assert waiting and "not answering" in waiting[0]["error"], lines
    assert [x["state"] for x in s.status("b")] == ["queued", "cancelled"], s.status("b")
    assert not (s.outbox / "b").exists()


def test_sigterm_while_frozen_exits_0_in_time(run: Run) -> None:
    """The daemon ends itself within the limit, the share still frozen, pinging until then; its
    exit status is 0, given as soon as the kernel lets the stuck threads go."""
    assert run.stop_seconds < STOP_LIMIT, run.log[-3000:]
    assert run.stop_code == 0, run.log[-3000:]
    assert run.reaped_seconds < 2 * PERIOD, run.reaped_seconds
    assert max(run.stop_gaps) <= PERIOD, run.stop_gaps


def test_no_thread_piles_up_on_a_stuck_folder(run: Run) -> None:
    """Threads that do I/O on a folder are at most two (one working, one looking), whatever the
    retries: each one stuck is logged, with how many are stuck on that folder."""
    stuck = [json.loads(line) for line in run.log.splitlines() if '"share not answering"' in line]
    assert stuck, "a stuck call is logged"
    assert all(event["stuck_threads"] <= 2 for event in stuck), stuck
