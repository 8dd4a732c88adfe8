"""What a story's caller hears while it renders, and how it stops one between scenes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from pipeline.prompts import ScenePlan
from pipeline.video.encode import EncoderStopped


class Stopped(Exception):
    """A warm shutdown was asked for; finished scenes are kept, the story resumes later."""


class RenderEvents(Protocol):
    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None: ...
    def scene_finished(self, plan: ScenePlan, total: int) -> None: ...
    def step(self, step: int, total: int) -> None: ...  # also a heartbeat: (0, 0) while waiting
    def should_stop(self) -> bool: ...


class QuietEvents:
    """Events for library use: nothing reported, never stops."""

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        pass

    def scene_finished(self, plan: ScenePlan, total: int) -> None:
        pass

    def step(self, step: int, total: int) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@contextlib.contextmanager
def stop_explains(events: RenderEvents) -> Iterator[None]:
    """An encoder stopped by a signal while we are stopping was stopped by our own stop signal
    (one sent to every process, as some supervisors do): the story is interrupted and resumes
    later; it is never failed for it."""
    try:
        yield
    except EncoderStopped as err:
        if events.should_stop():
            raise Stopped() from err
        raise
