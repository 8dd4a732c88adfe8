"""What wakes the loop, and the warm stop a signal asks for.

Waker         the self-pipe the loop sleeps on (signals, watch events and the commands' doorbell poke it)
StopRequest   a warm stop asked for by a signal, reported once by the main thread
"""

from __future__ import annotations

import contextlib
import os
import select

import structlog

from daemon.system.notify import Notifier

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
