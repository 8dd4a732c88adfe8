"""The poison-story rule: a story that keeps killing the process is given up, not retried forever.

A try is marked `running` in the claim's attempts.json when it begins and cleared when it ends in
any orderly way, so a try found still running at the next start died. A fatal signal leaves its
traceback in state/fault.log (faulthandler): the log grew, a crash. Nothing could be recorded
(SIGKILL, power cut, the OOM killer): unexplained. A finished scene is progress and clears both
counts. `daemon.max_attempts` crashes in a row fail the story; unexplained deaths only at three
times that, since a kill from outside is rarely the story's doing.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from daemon.queue.claim import Attempts, Claim


def count_death(a: Attempts, fault_log_grew: bool) -> Attempts:
    """The attempts after a start that found the last try still running (it died), or as they were."""
    if not a.running:
        return a
    if fault_log_grew:
        return replace(a, crashes=a.crashes + 1)
    return replace(a, unexplained=a.unexplained + 1)


def give_up(a: Attempts, limit: int, fault_log: Path) -> str | None:
    """Why the story is given up (its `failed` line), or None while it may be tried again."""
    if a.crashes >= limit:
        return (
            f"the daemon crashed {a.crashes} times in a row while making this story (fatal signal or "
            f"GPU error; see {fault_log}); giving up on it"
        )
    if a.unexplained >= 3 * limit:
        return (
            f"the daemon was killed {a.unexplained} times in a row while making this story, with no "
            "scene finished in between (out of host memory?); giving up on it"
        )
    return None


class PoisonRule:
    def __init__(self, fault_log: Path, limit: int) -> None:
        self.fault_log = fault_log
        self.limit = limit

    def _fault_log_size(self) -> int:
        try:
            return self.fault_log.stat().st_size
        except OSError:
            return 0

    def begin_try(self, claim: Claim) -> tuple[Attempts, str | None]:
        """Count how the last try ended; returns the attempts and why to give up (None: go on)."""
        before = claim.attempts()
        a = count_death(before, self._fault_log_size() > before.fault_mark)
        reason = give_up(a, self.limit, self.fault_log)
        if reason is not None:
            return a, reason
        a = replace(a, running=True, fault_mark=self._fault_log_size())
        claim.save_attempts(a)
        return a, None

    def end_try(self, claim: Claim, crashed: bool = False) -> None:
        """The try ended without the process dying (`crashed`: the GPU failed, it exits now)."""
        with contextlib.suppress(OSError):
            a = claim.attempts()
            claim.save_attempts(replace(a, running=False, crashes=a.crashes + int(crashed)))

    def progressed(self, claim: Claim) -> None:
        """A scene finished: deaths before it were not this story's doing."""
        claim.save_attempts(Attempts(running=True, fault_mark=self._fault_log_size()))
