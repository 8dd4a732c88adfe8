"""Talking to a folder that may hang (the inbox, the outbox): the one owner of every call there.

An NFS hard mount whose server went, an SMB server gone, a FUSE server frozen: every system call
on the mount blocks in the kernel, sometimes for minutes, and a thread stuck there cannot be
killed. So the daemon's main thread never calls such a folder itself. Each folder has a `Share`
with two lanes, each one daemon thread running its jobs in order:

    work   everything the daemon does there: status lines, publishing, the page, retention,
           claims and the originals they remove, the controls consumed, the inbox's scans
    probe  the one look that says whether the folder is still the mount it was at start
           (daemon/inbox/folders.py), so a long publish never delays it

A lane never gets a second thread: a folder costs at most two threads, however long it hangs and
however often its calls are retried. A job that has made no progress for `deadline` seconds
(jobs that take long, such as a publish, say they progress: `beat`) makes the folder *not
answering*: `reason()` says so in words, and it is logged once, with how many of its threads are
stuck. The loop treats that as any other fault of the world: `waiting`, with the reason, until
the stuck call returns. Waiting for a job (`wait`, `call`) is always deadline-guarded, and on
the main thread it pings the systemd watchdog meanwhile (`tick`); a call made while its lane is
stuck is answered at once with NotAnswering rather than queued behind it. Writes that must not
be lost (status lines, daemon/queue/sidecar.py) are queued and written in order once it answers.

Why not `concurrent.futures.ThreadPoolExecutor`: its worker threads are joined at interpreter
exit (an atexit hook), so one stuck in the kernel would hold up the process's exit on SIGTERM;
these are daemon threads, never joined.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
Clock = Callable[[], float]

log = structlog.get_logger("storyreel")

DEADLINE_SECONDS = 2.0  # no progress for this long: the folder is not answering
SLICE_SECONDS = 0.05  # a wait on the main thread pings the watchdog at least this often
QUEUE_LIMIT = 64  # jobs waiting on one lane; past it, callers are told the folder is not answering


class NotAnswering(OSError):
    """A folder's call made no progress within its deadline (or one before it is stuck there).

    errno ETIMEDOUT: the world's fault, like a full disk (daemon/run/outcome.py), retried with
    back-off. The call itself may still finish later: only the waiting was given up."""

    def __init__(self, reason: str, path: Path) -> None:
        super().__init__(errno.ETIMEDOUT, reason, str(path))

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class _Job:
    fn: Callable[[], Any]
    what: str
    future: Future[Any] = field(default_factory=Future)
    beat: float = 0.0  # when it last said it progresses (clock time); its start, at first


class Lane:
    """One daemon thread running jobs in order, started at the first job and never replaced."""

    def __init__(self, name: str, clock: Clock = time.monotonic, limit: int = QUEUE_LIMIT) -> None:
        self.name, self.clock, self.limit = name, clock, limit
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._running: _Job | None = None
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], T], what: str) -> Future[T] | None:
        """Queue `fn`; None when the queue is full (the lane is stuck, or far behind)."""
        job = _Job(fn, what)
        with self._cond:
            if len(self._jobs) >= self.limit:
                return None
            self._jobs.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify()
        return job.future

    def beat(self) -> None:
        """Said by the running job (on this lane's thread): it is getting on, not stuck."""
        job = self._running
        if job is not None:
            job.beat = self.clock()

    def stalled(self, deadline: float) -> tuple[str, float] | None:
        """What the running job is and how long it has gone without progress, if over `deadline`."""
        job = self._running
        if job is None:
            return None
        quiet = self.clock() - job.beat
        return (job.what, quiet) if quiet > deadline else None

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._jobs)

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                job = self._jobs.popleft()
                if not job.future.set_running_or_notify_cancel():
                    continue
                job.beat = self.clock()
                self._running = job
            try:
                job.future.set_result(job.fn())
            except BaseException as err:  # handed to whoever waits on it, never lost
                job.future.set_exception(err)
            finally:
                self._running = None


class Share:
    """One folder that may hang: its two lanes, and whether it answers (see the module docstring).

    `tick` runs while the main thread waits (the watchdog ping): the watchdog says the main loop
    is alive, so a wait on any other thread never feeds it."""

    def __init__(
        self,
        key: str,
        path: Path,
        *,
        deadline: float = DEADLINE_SECONDS,
        tick: Callable[[], object] = lambda: None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.key, self.path, self.deadline, self.tick, self.clock = key, path, deadline, tick, clock
        self.work = Lane(f"storyreel-{key}", clock)
        self.probe = Lane(f"storyreel-{key}-probe", clock)
        self._said: str | None = None  # the reason last logged
        self._since = 0.0  # when it stopped answering
        self._lock = threading.Lock()

    # -- whether it answers --------------------------------------------------------------
    def reason(self) -> str | None:
        """Why this folder is not answering, in words; None while it answers. Logged once per spell."""
        found = [(lane, stall) for lane in (self.work, self.probe) if (stall := lane.stalled(self.deadline))]
        reason = None
        if found:
            what, _ = found[0][1]
            reason = f"{self.key} {self.path} is not answering ({what}: no reply for over {self.deadline:g}s)"
        with self._lock:
            if (reason is None) != (self._said is None):
                self._log(reason, len(found), quiet=found[0][1][1] if found else 0.0)
            self._said = reason
        return reason

    def _log(self, reason: str | None, stuck: int, quiet: float) -> None:
        if reason is not None:
            self._since = self.clock() - quiet
            log.warning(
                "share not answering",
                folder=self.key,
                path=str(self.path),
                reason=reason,
                stuck_threads=stuck,
            )
        else:
            seconds = round(self.clock() - self._since, 1)
            log.info("share answering again", folder=self.key, path=str(self.path), after_seconds=seconds)

    @property
    def answering(self) -> bool:
        return self.reason() is None

    @property
    def busy(self) -> bool:
        """Work queued or running there: a call now would wait behind it."""
        return self.work.busy

    def stuck_threads(self) -> int:
        """This folder's threads that are in a call that has not returned for over the deadline."""
        return sum(lane.stalled(self.deadline) is not None for lane in (self.work, self.probe))

    def beat(self) -> None:
        """A long job on the work lane says it progresses (a file copied, a chunk written)."""
        self.work.beat()

    # -- calls -----------------------------------------------------------------------------
    def submit(self, fn: Callable[[], T], what: str) -> Future[T]:
        """`fn` queued on the work lane, in order; raises NotAnswering when its queue is full."""
        return self._queue(self.work, fn, what)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` on the work lane, waited for (see `wait`); NotAnswering at once while it is stuck."""
        return self._call(self.work, fn, what)

    def look(self, fn: Callable[[], T], what: str) -> T:
        """`fn()` on the probe lane, as `call` (a look that a long publish must not delay)."""
        return self._call(self.probe, fn, what)

    def wait(self, fut: Future[T], lane: Lane | None = None, patience: float | None = None) -> T:
        """The job's result, waited for while its lane makes progress; NotAnswering once it has
        made none for `deadline` (the job goes on: only the waiting stops). `patience`: wait no
        longer than that in all (then concurrent.futures.TimeoutError), progress or not."""
        lane = lane or self.work
        on_main = threading.current_thread() is threading.main_thread()
        give_up = None if patience is None else self.clock() + patience
        while True:
            try:
                return fut.result(timeout=SLICE_SECONDS if on_main else self.deadline / 4)
            except FutureTimeout:
                if give_up is not None and self.clock() >= give_up:
                    raise
            if on_main:
                self.tick()
            if lane.stalled(self.deadline) is not None:
                raise NotAnswering(self.reason() or f"{self.key} {self.path} is not answering", self.path)

    def _call(self, lane: Lane, fn: Callable[[], T], what: str) -> T:
        if lane.stalled(self.deadline) is not None:
            raise NotAnswering(self.reason() or f"{self.key} {self.path} is not answering", self.path)
        return self.wait(self._queue(lane, fn, what), lane)

    def _queue(self, lane: Lane, fn: Callable[[], T], what: str) -> Future[T]:
        fut = lane.submit(fn, what)
        if fut is None:
            reason = self.reason() or f"{self.key} {self.path} is not answering (too much queued)"
            raise NotAnswering(reason, self.path)
        return fut


class Shares:
    """The daemon's folders that may hang, by key ("outbox", "inbox"), each its own `Share`."""

    def __init__(
        self,
        folders: dict[str, Path],
        *,
        deadline: float = DEADLINE_SECONDS,
        tick: Callable[[], object] = lambda: None,
    ) -> None:
        self._shares = {key: Share(key, path, deadline=deadline, tick=tick) for key, path in folders.items()}

    def __getitem__(self, key: str) -> Share:
        return self._shares[key]

    def get(self, key: str) -> Share | None:
        return self._shares.get(key)

    def reasons(self) -> dict[str, str]:
        """What is not answering, in words, by key; empty while every folder answers."""
        return {key: reason for key, share in self._shares.items() if (reason := share.reason())}

    def stuck_threads(self) -> int:
        return sum(share.stuck_threads() for share in self._shares.values())
