"""How one story's run ended, as a value, and the one rule that turns an exception into one.

    Done      published: the outputs, and the pace for estimated starts
    Failed    the story's fault (a bad story, a scene that never fits in memory, one that keeps
              killing its workers), or a bug in storyreel: it ends `failed` with the reason
    Halted    stopped between scenes: cancelled, paused, or a warm stop; it resumes later
    Waiting   the world's fault (a full disk, a share gone, the Ray cluster lost): retried
    GpuFatal  the CUDA context is poisoned: the process exits for systemd to restart it

The recorder (daemon/run/recorder.py) turns each into ledger moves.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.queue.stories import problem_text
from daemon.system.errors import os_error_text
from pipeline.errors import EngineUnavailable, GpuFatalError, SceneKillsWorkers, SceneOutOfMemory
from pipeline.render import Stopped
from pipeline.story import StoryError

# Errors that are not the story's fault: wait and try again.
INFRA_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.ESTALE,
        errno.ENOTCONN,
        errno.EROFS,
        errno.ENODEV,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ETIMEDOUT,
        errno.ENXIO,
        errno.ECONNABORTED,
        errno.ECONNRESET,
    }
)


@dataclass(frozen=True)
class Done:
    scenes: int
    outputs: dict[str, Any] = field(default_factory=dict)
    pace: float | None = None  # seconds per scene made in this try


@dataclass(frozen=True)
class Failed:
    scene: int
    scenes: int
    error: str
    internal: bool = False  # a bug in storyreel, not a problem with the story: logged with its traceback


@dataclass(frozen=True)
class Halted:
    scenes: int


@dataclass(frozen=True)
class Waiting:
    reason: str
    scene: int = 0
    scenes: int = 0


@dataclass(frozen=True)
class GpuFatal:
    error: str
    scenes: int


Outcome = Done | Failed | Halted | Waiting | GpuFatal


def infra_reason(err: BaseException) -> str | None:
    """Why `err` is the world's fault (its errno or its kind), from the error alone; None if it is not."""
    if isinstance(err, EngineUnavailable):  # the Ray cluster or its head is gone
        return str(err)
    for exc in (err, err.__cause__, err.__context__):
        if isinstance(exc, OSError) and exc.errno in INFRA_ERRNOS:
            return os_error_text(exc)
    return None


def classify(err: Exception, scene: int, scenes: int, world: Callable[[], str | None]) -> Outcome:
    """The outcome of a run that raised `err` at `scene` of `scenes`.

    `world()` looks at the folders the story writes to (outbox, state: there, with space left)
    and says what is wrong with them, if anything: an error nobody recognises is the world's
    fault while they are broken, and a bug (Failed, internal) otherwise.
    """
    if isinstance(err, Stopped):
        return Halted(scenes)
    if isinstance(err, GpuFatalError):
        return GpuFatal(str(err), scenes)
    if isinstance(err, StoryError):
        return Failed(scene, scenes, problem_text(err))
    if isinstance(err, SceneOutOfMemory | SceneKillsWorkers):
        return Failed(scene, scenes, str(err))
    reason = infra_reason(err) or world()
    if reason is not None:
        return Waiting(reason, scene, scenes)
    return Failed(scene, scenes, f"internal error: {type(err).__name__}: {err}", internal=True)
