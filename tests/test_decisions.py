"""The daemon's decisions, as tables: each rule is a pure function, so every row is one case.

held_by    the gate: why no story may start now (daemon/queue/gate.py)
classify   what a run that raised became (daemon/run/outcome.py)
decide     what a cancel or retry request does (daemon/queue/steering.py)
the poison rule: deaths counted at a start, and when a story is given up (daemon/run/poison.py)
the back-off (daemon/system/backoff.py)
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from daemon.queue.claim import Attempts, Claim, Identity
from daemon.queue.controls import Request
from daemon.queue.gate import held_by
from daemon.queue.steering import Decision, decide
from daemon.run.outcome import Failed, GpuFatal, Halted, Outcome, Waiting, classify
from daemon.run.poison import count_death, give_up
from daemon.system.backoff import Backoff, backoff_seconds
from pipeline.errors import EngineUnavailable, GpuFatalError, SceneKillsWorkers, SceneOutOfMemory
from pipeline.render import Stopped
from pipeline.story import StoryError
from pipeline.video.encode import EncoderStopped

GATE = ["stopping", "paused", "ending_pending", "backing_off", "outbox_gone"]


@pytest.mark.parametrize(
    ("holds", "reason"),
    [
        ((), None),
        (("stopping",), "stopping"),
        (("paused",), "paused"),
        (("ending_pending",), "an ending is pending"),
        (("backing_off",), "backing off"),
        (("outbox_gone",), "the outbox is gone"),
        (("paused", "backing_off", "outbox_gone"), "paused"),  # the first reason is said
        (("ending_pending", "outbox_gone"), "an ending is pending"),
        (tuple(GATE), "stopping"),
    ],
)
def test_the_gate(holds: tuple[str, ...], reason: str | None) -> None:
    assert held_by(**{k: k in holds for k in GATE}) == reason


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", "outbox/x.status.jsonl")


def _chained_eio() -> Exception:
    try:
        raise OSError(errno.EIO, "Input/output error", "clips/scene_001.mp4")
    except OSError as err:
        try:
            raise RuntimeError("ffmpeg died") from err
        except RuntimeError as outer:
            return outer


WORLD_OK: Any = lambda: None  # noqa: E731 - the folders are fine
WORLD_GONE: Any = lambda: "/srv/outbox is not available"  # noqa: E731


@pytest.mark.parametrize(
    ("err", "world", "outcome"),
    [
        (Stopped(), WORLD_OK, Halted(3)),
        (GpuFatalError("sticky CUDA error"), WORLD_OK, GpuFatal("sticky CUDA error", 3)),
        (StoryError(["scenes.0: bad", "seed: bad"]), WORLD_OK, Failed(2, 3, "scenes.0: bad; seed: bad")),
        (SceneOutOfMemory("out of memory"), WORLD_OK, Failed(2, 3, "out of memory")),
        (
            SceneKillsWorkers("took down its worker 3 times"),
            WORLD_OK,
            Failed(2, 3, "took down its worker 3 times"),
        ),
        (_enospc(), WORLD_OK, Waiting("No space left on device (outbox/x.status.jsonl)", 2, 3)),
        (_chained_eio(), WORLD_OK, Waiting("Input/output error (clips/scene_001.mp4)", 2, 3)),
        (EngineUnavailable("lost the Ray cluster"), WORLD_OK, Waiting("lost the Ray cluster", 2, 3)),
        (ValueError("bug"), WORLD_GONE, Waiting("/srv/outbox is not available", 2, 3)),
        (
            OSError(errno.EACCES, "Permission denied"),
            WORLD_GONE,
            Waiting("/srv/outbox is not available", 2, 3),
        ),
        (ValueError("bug"), WORLD_OK, Failed(2, 3, "internal error: ValueError: bug", internal=True)),
        (
            EncoderStopped("ffmpeg stopped"),
            WORLD_OK,
            Failed(2, 3, "internal error: EncoderStopped: ffmpeg stopped", internal=True),
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_outcome_classification(err: Exception, world: Any, outcome: Outcome) -> None:
    assert classify(err, 2, 3, world) == outcome


def _claim(ending: dict[str, Any] | None = None, request: str | None = None) -> Claim:
    when = "2026-01-01T00:00:00+00:00"
    return Claim(7, "s", Identity("s.json", 1, 1, 1), when, Path("/nowhere"), ending=ending, request=request)


def _req(action: str, share: bool = False) -> Request:
    by, ident = ("inbox/s." + action, "share:s.cancel@1:1") if share else ("ana", "box:1.json")
    return Request(action, "s", by, ident, Path("/nowhere"), share)


CANCEL, RETRY, SHARE_CANCEL = _req("cancel"), _req("retry"), _req("cancel", share=True)
QUEUED, DONE_BEFORE = _claim(), _claim(request="box:1.json")
ENDING = _claim({"state": "cancelled", "record": {"request": "box:1.json"}})
FAILED = {"state": "failed", "time": "t", "kept": __file__}  # its kept input exists
UNKNOWN = "no story named 's' is queued, running or ended; `storyreel status` lists them"


@pytest.mark.parametrize(
    ("req", "claim", "ended", "flags", "decision"),
    [
        # carried out before a crash took the process: consumed, nothing done again
        (RETRY, DONE_BEFORE, None, "", Decision("consume")),
        (CANCEL, None, {**FAILED, "request": "box:1.json"}, "", Decision("consume")),
        (CANCEL, ENDING, None, "", Decision("wait")),  # under way: its ending is being written
        (CANCEL, QUEUED, None, "running asked", Decision("wait")),  # asked already
        (CANCEL, QUEUED, None, "running", Decision("cancel running")),
        (CANCEL, QUEUED, None, "", Decision("cancel")),
        (RETRY, None, FAILED, "", Decision("retry")),
        (RETRY, None, {**FAILED, "state": "cancelled"}, "", Decision("retry")),
        (
            RETRY,
            None,
            {**FAILED, "state": "done"},
            "",
            Decision("refuse", "s is done; drop the file again to redo it"),
        ),
        (RETRY, QUEUED, None, "running", Decision("refuse", "s is running; nothing to retry")),
        (CANCEL, None, None, "", Decision("refuse", UNKNOWN)),
        # NAME.cancel dropped with NAME.json waits for the story to be claimed; from the box it does not
        (SHARE_CANCEL, None, None, "arriving", Decision("wait")),
        (CANCEL, None, None, "arriving", Decision("refuse", UNKNOWN)),
    ],
)
def test_steering(
    req: Request, claim: Claim | None, ended: dict[str, Any] | None, flags: str, decision: Decision
) -> None:
    running, asked, arriving = ("running" in flags), ("asked" in flags), ("arriving" in flags)
    assert (
        decide(req, "s", claim, ended, running=running, cancel_asked=asked, arriving=lambda: arriving)
        == decision
    )


@pytest.mark.parametrize(
    ("before", "grew", "after"),
    [
        (Attempts(), False, Attempts()),  # the last try ended in order: nothing to count
        (Attempts(running=True), True, Attempts(crashes=1, running=True)),  # the fault log grew: a crash
        (Attempts(running=True), False, Attempts(unexplained=1, running=True)),  # SIGKILL, power cut
        (Attempts(crashes=1, unexplained=2, running=True), True, Attempts(2, 2, True)),
    ],
)
def test_the_poison_rule_counts_deaths(before: Attempts, grew: bool, after: Attempts) -> None:
    assert count_death(before, grew) == after


@pytest.mark.parametrize(
    ("attempts", "limit", "gives_up"),
    [
        (Attempts(crashes=2), 3, None),
        (Attempts(crashes=3), 3, "crashed 3 times in a row"),
        (Attempts(unexplained=8), 3, None),  # a kill from outside is rarely the story's doing
        (Attempts(unexplained=9), 3, "killed 9 times in a row"),
        (Attempts(crashes=1), 1, "crashed 1 times in a row"),
    ],
)
def test_the_poison_rule_gives_up(attempts: Attempts, limit: int, gives_up: str | None) -> None:
    reason = give_up(attempts, limit, Path("state/fault.log"))
    assert (reason is None) == (gives_up is None)
    assert gives_up is None or (reason is not None and gives_up in reason and "giving up on it" in reason)


@pytest.mark.parametrize(
    ("failures", "delay"), [(0, 1.0), (1, 2.0), (2, 4.0), (4, 16.0), (5, 30.0), (1000, 30.0)]
)
def test_one_back_off(failures: int, delay: float) -> None:
    assert backoff_seconds(failures, 1.0, 30.0) == delay


def test_the_back_off_on_a_clock() -> None:
    now = [100.0]
    b = Backoff(1.0, 4.0, clock=lambda: now[0])
    assert b.due() and [b.failed(), b.failed(), b.failed(), b.failed()] == [1.0, 2.0, 4.0, 4.0]
    assert not b.due() and b.remaining() == 4.0
    b.retry_now()
    assert b.due() and b.failed() == 4.0  # what failed is back, but the count stays
    b.reset()
    assert b.due() and b.failed() == 1.0
