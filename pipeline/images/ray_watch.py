"""The daemon's watch over its Ray driver child: start it, read it, restart it (a thread).

The thread reads every message the driver sends (so the driver never blocks on a full socket,
also while the daemon is idle), keeps the tickets' answers and the workers' rows, and starts a
new driver when the old one ended: after a back-off, or at once when the cluster's head answers
a TCP probe again (once a second; a connect, never a Ray call). The daemon's thread reads what
it keeps under `lock` (pipeline/images/ray_pool.py). States:

    starting   the first driver is connecting and loading models
    ready      every worker is up: scenes go out
    waiting    the cluster cannot be used (`reason` names it): tickets wait here

Only this side decides about the driver's life; the driver (pipeline/images/ray_child.py) only
says what it sees. A driver silent for ALIVE_SECONDS once ready (a Ray call hanging on a gone
head) is killed with its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from pipeline.images.ray_wire import EXIT_CLOSED, MODULE, dumps, head_answers, pair
from pipeline.images.seam import SceneKey, Ticket
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
ALIVE_SECONDS = 15.0
READ_SECONDS = 0.2  # the longest the thread waits for a message before it looks around
CLOSE_SECONDS = 60.0  # ray.shutdown() in the driver; then its group is killed


@dataclass(eq=False)
class RayTicket(Ticket):
    """A scene handed to the Ray engine: kept until its image is taken."""

    withdrawn: bool = False  # not to be started (a pause, a stop); sent again when submitted again
    answer: tuple[str, bytes] | None = None  # ("done", pickled image) or ("error", pickled error)


class DriverWatch:
    def __init__(self, settings: Settings, start: tuple[Any, ...], wake: Callable[[], None]) -> None:
        self.address = settings.workers.address
        self.where = f"the Ray cluster at {self.address}" if self.address else "the private Ray instance"
        self.start_message, self.wake = start, wake
        self.lock = threading.Condition()
        self.tickets: dict[SceneKey, RayTicket] = {}
        self.rows: list[dict[str, Any]] = []
        self.model: dict[str, Any] = {}
        self.state, self.reason = "starting", ""
        self.phases: list[str] = []  # for the daemon's thread to say (start-up)
        self.fatal: bytes | None = None
        self.closed = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.exits: list[int | None] = []
        self._failures = 0
        self._next_start = 0.0
        self._probe_at = 0.0
        self._heard = 0.0
        self._back = False
        self.thread = threading.Thread(target=self._run, name="ray-watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- under the lock, from either thread ----------------------------------------------------
    def send(self, *msg: Any) -> None:
        if self.conn is not None and self.state == "ready":
            with contextlib.suppress(OSError):  # the driver is going: the thread sees it end
                self.conn.send(msg)

    def send_ticket(self, ticket: RayTicket) -> None:
        self.send("submit", ticket.key, dumps(ticket.request), ticket.request.steps)

    def take_back(self) -> bool:
        """True once after the workers came back from a loss: the waiting story may go on now."""
        with self.lock:
            back, self._back = self._back, False
            return back

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.closed:
            if self.proc is None:
                if self._due():
                    with self.lock:
                        self._spawn()
                else:
                    time.sleep(READ_SECONDS)
                continue
            conn = self.conn
            assert conn is not None
            try:
                msg = conn.recv() if conn.poll(READ_SECONDS) else None
            except (EOFError, OSError):
                self._ended()
                continue
            with self.lock:
                if msg is not None:
                    self._heard = time.monotonic()
                    self._handle(msg)
                elif self.proc.poll() is not None:
                    self._ended()
                elif self.state == "ready" and time.monotonic() - self._heard > ALIVE_SECONDS:
                    log.warning("ray driver silent, killing it", seconds=ALIVE_SECONDS, pid=self.proc.pid)
                    self._kill()

    def _due(self) -> bool:
        now = time.monotonic()
        if now >= self._next_start:
            return True
        if not self.address or now < self._probe_at:
            return False
        self._probe_at = now + 1.0
        return head_answers(self.address, 0.2)

    def _spawn(self) -> None:
        ours, theirs = pair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, str(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            start_new_session=True,  # Ctrl-C to the terminal's group, and systemd's SIGTERM, are ours
        )
        theirs.close()
        self.conn = ours
        self._heard = time.monotonic()
        ours.send(self.start_message)
        log.info("ray driver started", pid=self.proc.pid, address=self.address or "private")

    def _handle(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            again = self.state == "waiting"
            self.state, self.reason, self.rows, self.model = "ready", "", msg[1], msg[2]
            self._failures = 0
            for ticket in sorted(self.tickets.values(), key=lambda t: t.key):
                if ticket.answer is None and not ticket.withdrawn:
                    self.send_ticket(ticket)
            if again:
                log.info("ray engine back", address=self.address or "private", open=len(self.tickets))
                self._back = True
                self.wake()
        elif kind in ("done", "error"):
            held = self.tickets.get(msg[1])
            if held is not None and held.answer is None:
                held.answer = (kind, msg[2])
        elif kind == "workers":
            self.rows = msg[1]
        elif kind == "phase":
            if self.state == "starting":
                self.phases.append(msg[1])
            else:  # a new driver after a loss: the daemon is READY already, this is only news
                log.info("ray driver", phase=msg[1])
        elif kind == "down":
            self._waiting(msg[1])
        elif kind == "fatal":
            self.fatal = msg[1]
        elif kind == "log":
            getattr(log, msg[1])(msg[2], **msg[3])
        self.lock.notify_all()

    def _waiting(self, reason: str) -> None:
        if self.state != "waiting" or not self.reason:
            log.warning("ray engine waiting", reason=reason)
        self.state, self.reason = "waiting", reason
        self.wake()

    def _ended(self) -> None:
        """The driver ended: say why (naming the cluster), and start the next one in a while."""
        proc, conn = self.proc, self.conn
        assert proc is not None and conn is not None
        try:
            rc: int | None = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = proc.wait()
        with self.lock:
            conn.close()
            self.proc = self.conn = None
            self.exits.append(rc)
            if self.closed:
                return
            if self.state != "waiting":
                self._waiting(f"lost {self.where}: its Ray driver ended (exit status {rc})")
            delay = BACKOFF_SECONDS[min(self._failures, len(BACKOFF_SECONDS) - 1)]
            self._failures += 1
            self._next_start = time.monotonic() + delay
            log.info("ray driver ended", status=rc, again_in=delay, reason=self.reason)
            self.lock.notify_all()

    def _kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the driver and what it started in its session

    # -- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Ask the driver to shut Ray down (its actors go with its job); kill it when its cluster
        is gone (ray.shutdown() would wait on the gone head) or when it takes too long."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)
        proc, conn = self.proc, self.conn
        if proc is None:
            return
        if self.state == "waiting" and self.address:
            self._kill()
        elif conn is not None:
            with contextlib.suppress(OSError):
                conn.send(("close",))
        try:
            rc = proc.wait(timeout=CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            self._kill()
            rc = proc.wait()
        if conn is not None:
            conn.close()
        self.proc = self.conn = None
        log.info("ray driver closed", status=rc, clean=rc == EXIT_CLOSED)
