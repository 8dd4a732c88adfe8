"""Says where the loop's thread is when the watchdog pings fall behind.

A systemd watchdog kill says only that the pings stopped. This thread looks at the time since
the last ping a few times per period; past half the period it logs, once per silence, how long
it has been and the loop thread's innermost frames: the journal then names what held the loop
(a call on a share that bypassed its lane, a long collection, a stuck driver) before systemd acts.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable

import structlog

from daemon.system.notify import Notifier, WatchdogThread

log = structlog.get_logger("storyreel")

FRAMES = 6  # the innermost frames of the loop's thread, in the warning


class StallWatch(WatchdogThread):
    name = "storyreel-stall"
    fraction = 1 / 8

    def __init__(self, notifier: Notifier, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(notifier)
        self._clock = clock
        self._loop_thread = threading.get_ident()  # made on the loop's thread
        self._said_for: float | None = None  # the ping whose silence was reported

    def tick(self) -> None:
        last, period = self.notifier.last_ping, self.notifier.watchdog_interval_seconds
        if last is None or last == self._said_for or self._clock() - last <= period / 2:
            return
        self._said_for = last
        frame = sys._current_frames().get(self._loop_thread)
        where = traceback.format_stack(frame, limit=FRAMES) if frame is not None else []
        log.warning(
            "watchdog pings late",
            seconds=round(self._clock() - last, 2),
            watchdog_seconds=period,
            where="".join(where).strip(),
        )
