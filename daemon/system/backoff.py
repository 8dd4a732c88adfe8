"""The one back-off: low, 2·low, 4·low … capped at high, for whatever waits on the world.

Used by the queue (a full disk, a share gone: `daemon.queue.gate`) and by the inbox (a file
another client holds locked: `daemon.inbox.settle`).
"""

from __future__ import annotations

from collections.abc import Callable


def backoff_seconds(failures: int, low: float, high: float) -> float:
    """The wait after `failures` failures in a row (0: the first wait is `low`)."""
    return min(high, low * (2 ** min(failures, 30)))


class Backoff:
    """Failures in a row and when the next try is due, on a monotonic clock."""

    def __init__(self, low: float, high: float, clock: Callable[[], float]) -> None:
        self.low, self.high, self.clock = low, high, clock
        self.failures = 0
        self.retry_at = 0.0

    def failed(self) -> float:
        """One more failure: returns how long to wait before the next try."""
        delay = backoff_seconds(self.failures, self.low, self.high)
        self.failures += 1
        self.retry_at = self.clock() + delay
        return delay

    def reset(self) -> None:
        self.failures = 0
        self.retry_at = 0.0

    def retry_now(self) -> None:
        """The next try is due at once (what failed is back); the count of failures stays."""
        self.retry_at = 0.0

    def due(self) -> bool:
        return self.clock() >= self.retry_at

    def remaining(self) -> float:
        return self.retry_at - self.clock()
