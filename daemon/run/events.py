"""What the daemon hears while a story renders (pipeline.render.RenderEvents): `StatusEvents`.

Render events become status lines (through the ledger), systemd pings, log lines and a
progress bar; between scenes and between denoising steps the loop's turn runs here (claim new
drops, read the controls, finish pending endings), and `should_stop` asks whether to stop after
the scene in progress.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from daemon.queue.claim import Claim
from daemon.queue.ledger import Ledger
from daemon.queue.states import State
from daemon.system.notify import Notifier
from daemon.system.wake import StopRequest
from pipeline.prompts import ScenePlan
from pipeline.render import WorkFolder
from pipeline.render.records import read_record

log = structlog.get_logger("storyreel")


@dataclass
class StatusEvents:
    """Render events -> status lines (through the ledger), systemd pings, logs and a progress bar.

    `housekeeping` is the loop's turn (daemon/loop.py); it runs between scenes and between
    denoising steps, so a drop gets its "queued" line however long the story in progress
    takes. `stop_asked` asks the loop whether to stop after this scene.
    """

    claim: Claim
    ledger: Ledger
    notifier: Notifier
    stop: StopRequest
    housekeeping: Callable[[], None]
    stop_asked: Callable[[], bool]
    on_scene_done: Callable[[], None]  # a finished scene: deaths before it were not the story's doing
    progress: bool = False
    scene: int = field(default=0, init=False)  # the scene in progress
    made: int = field(default=0, init=False)  # scenes finished in this try (the pace for estimated starts)
    bar: Any = field(default=None, init=False)
    _thread: int = field(default_factory=threading.get_ident, init=False)

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        c = self.claim
        self.scene = plan.number
        eta = None if eta_seconds is None else round(eta_seconds, 1)
        self.ledger.move(c, State.PROCESSING, plan.number, total, eta_seconds=eta)
        made = {"picture": plan.picture} if plan.picture else {"seed": plan.seed}  # its own, or a seed's
        log.info("scene started", story=c.name, seq=c.seq, scene=plan.number, scenes=total, **made)
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
            self.ledger.activity.stopping()
        self._housekeeping()

    def turn(self) -> None:
        """While the story waits on something else (its publishing): pings, and the loop's turn."""
        self.notifier.watchdog()
        if self.stop.note(busy=True):
            self.ledger.activity.stopping()
        self._housekeeping()

    def should_stop(self) -> bool:
        self._housekeeping()
        return self.stop_asked()

    def _housekeeping(self) -> None:
        """Never lets a problem there reach the denoising loop: the story in progress goes on.

        Only on the loop's own thread: a generator that reported steps from another
        thread must not touch the spool while the loop does."""
        if threading.get_ident() != self._thread:
            return
        try:
            self.housekeeping()
        except Exception:
            log.exception("housekeeping failed while a story renders", story=self.claim.name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
