"""What the worker loop listens to while it waits or while a story renders.

Waker         the self-pipe the loop sleeps on (signals, watch events poke it)
StopRequest   a warm stop asked for by a signal
StatusEvents  render events -> the ledger (status lines), systemd pings, a progress bar,
              and the worker's housekeeping between scenes and denoising steps
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
from collections.abc import Callable
from typing import Any

import structlog

from daemon.ledger import Ledger
from daemon.notify import Notifier
from daemon.spool import Claim
from daemon.states import State
from pipeline.prompts import ScenePlan
from pipeline.render import WorkFolder
from pipeline.render.records import read_record

log = structlog.get_logger("storyreel")


class Waker:
    """A self-pipe the main loop sleeps on. Poking it is one os.write: safe from signal
    handlers (which must not take locks, as threading.Event does) and from any thread.
    `listen` adds another fd that wakes it the same way (the commands' doorbell)."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._others: list[int] = []

    @property
    def listening(self) -> bool:
        """Whether something besides this process wakes it (else the loop polls for it)."""
        return bool(self._others)

    def listen(self, fd: int) -> None:
        self._others.append(fd)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending anyway
            os.write(self._w, b"!")

    def wait(self, timeout: float) -> None:
        for fd in select.select([self._r, *self._others], [], [], timeout)[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(fd, 4096):
                    pass

    def close(self) -> None:
        for fd in self._others:
            os.close(fd)
        self._others.clear()


class StopRequest:
    """A warm stop: asked for by the signal handler, reported once by the main thread.

    `requested` is a plain attribute the handler sets: no lock involved, so the
    handler can never deadlock against the code it interrupted.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.requested = False
        self._notifier = notifier
        self._noted = False

    def note(self, busy: bool) -> bool:
        """Tell systemd and the log, the first time the request is seen; True if this call did."""
        if not self.requested or self._noted:
            return False
        self._noted = True
        self._notifier.stopping()
        log.info("stop requested, finishing the scene in progress" if busy else "stop requested")
        return True


class StatusEvents:
    """Render events -> status lines (through the ledger), systemd pings, logs and a progress bar.

    `housekeeping` is the worker's turn without running a story (claim new drops,
    read controls, finish pending endings); it runs between scenes and between
    denoising steps, so a drop gets its "queued" line however long the story in
    progress takes. `should_stop` asks the worker whether to stop after this scene.
    """

    def __init__(
        self,
        claim: Claim,
        ledger: Ledger,
        notifier: Notifier,
        stop: StopRequest,
        *,
        housekeeping: Callable[[], None],
        should_stop: Callable[[], bool],
        on_scene_done: Callable[[], None],
        progress: bool,
    ) -> None:
        self.claim = claim
        self.ledger = ledger
        self.notifier = notifier
        self.stop = stop
        self.housekeeping = housekeeping
        self._should_stop = should_stop
        self.on_scene_done = on_scene_done  # a finished scene: deaths before it were not the story's doing
        self.scene = 0
        self.made = 0  # scenes finished in this try (the pace for estimated starts)
        self.bar: Any = None
        self.progress = progress
        self._thread = threading.get_ident()

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        c = self.claim
        self.scene = plan.number
        eta = None if eta_seconds is None else round(eta_seconds, 1)
        self.ledger.move(c, State.PROCESSING, plan.number, total, eta_seconds=eta)
        log.info("scene started", story=c.name, seq=c.seq, scene=plan.number, scenes=total, seed=plan.seed)
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=c.name, unit="scene", file=sys.stderr, initial=plan.number - 1)

    def scene_finished(self, plan: ScenePlan, total: int) -> None:
        self.made += 1
        self.on_scene_done()
        self.ledger.scene_finished(self.claim, read_record(WorkFolder(self.claim.work), plan))
        log.info("scene finished", story=self.claim.name, seq=self.claim.seq, scene=plan.number, scenes=total)
        if self.bar is not None:
            self.bar.update(1)

    def step(self, step: int, total: int) -> None:
        self.notifier.watchdog()  # from the denoising loop itself: a hung GPU stops the pings
        if self.stop.note(busy=True):
            self.ledger.stopping()
        self._housekeeping()

    def should_stop(self) -> bool:
        self._housekeeping()
        return self._should_stop()

    def _housekeeping(self) -> None:
        """Never lets a problem there reach the denoising loop: the story in progress goes on.

        Only on the worker's own thread: a generator that reported steps from another
        thread must not touch the spool while the worker does."""
        if threading.get_ident() != self._thread:
            return
        try:
            self.housekeeping()
        except Exception:
            log.exception("housekeeping failed while a story renders", story=self.claim.name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
