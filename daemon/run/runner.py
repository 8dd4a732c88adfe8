"""Running one story: its claim in, an outcome out (daemon/run/outcome.py).

    1. its "queued" line, if the claim's could not be written at claim time
    2. read and parse it from the spool (a bad story: Failed; a bundle: its listing and story.json)
    3. the poison rule: a story that keeps killing the process is given up (Failed)
    4. a bundle's files extracted into its work folder (after the poison rule: a picture that
       crashes a decoder is given up like any story that kills the process); render it, scene
       by scene, in its work folder (the loop's turn runs between scenes and steps); publish
       outbox/NAME/ and NAME.zip by rename, on the outbox's lane (daemon/system/share.py),
       the loop's turn going on meanwhile: a share that does not answer makes publishing
       wait, never the loop
    5. the try ends: whatever was raised is classified into an outcome

Nothing here writes the story's ending: the recorder does, from the outcome.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from daemon.inbox.folders import FolderGuard
from daemon.queue.claim import Claim
from daemon.queue.ledger import Ledger
from daemon.queue.steering import Steering
from daemon.queue.stories import load_claim, open_claim, problem_text
from daemon.run.events import StatusEvents
from daemon.run.outcome import Done, Failed, GpuFatal, Halted, Outcome, Waiting, classify
from daemon.run.poison import PoisonRule
from daemon.system.errors import os_error_text
from daemon.system.notify import Notifier
from daemon.system.share import NotAnswering, Share, Shares
from daemon.system.wake import StopRequest
from pipeline.eta import TailCost
from pipeline.images.seam import ImageWorkers
from pipeline.package import clean_stale_temps, publish
from pipeline.render import CpuPool, Stopped, StoryJob, render_story
from pipeline.settings import Settings
from pipeline.story import StoryError

log = structlog.get_logger("storyreel")

LOW_DISK_BYTES = 64 << 20  # less free than this on the outbox or state: the world's fault
TURN_SECONDS = 0.1  # while publishing: the loop's turn at least this often


@dataclass
class StoryRunner:
    settings: Settings
    ledger: Ledger
    notifier: Notifier
    stop: StopRequest
    steering: Steering
    poison: PoisonRule
    folders: FolderGuard  # the inbox and outbox as they were at start: publishing writes nowhere else
    workers: ImageWorkers
    pool: CpuPool
    housekeeping: Callable[[], None]  # the loop's turn, run between scenes and denoising steps
    shares: Shares | None = None  # the outbox's lane publishes (its own, when none is given)
    progress: bool = False  # a progress bar per story (a terminal)
    tail_cost: TailCost = field(default_factory=TailCost)  # what film, sheet and ZIP cost last time

    def __post_init__(self) -> None:
        shares = self.shares or Shares({"outbox": self.settings.paths.outbox})
        self.outbox: Share = shares["outbox"]

    def run(self, claim: Claim) -> Outcome:
        try:
            return self._run(claim)
        except OSError as err:  # its status or state could not be written: not the story's fault
            return Waiting(os_error_text(err))

    def _run(self, claim: Claim) -> Outcome:
        # 1. Its "queued" line, if it could not be written at claim
        self.ledger.announce(claim)

        # 2. The story, from the spool
        try:
            n = len(load_claim(claim, self.settings.limits).scenes)
        except StoryError as err:
            return Failed(0, 0, problem_text(err))

        # 3. The poison rule
        attempts, give_up = self.poison.begin_try(claim)
        if give_up:
            return Failed(0, n, give_up)

        # 4. Extract, render and publish, the loop's turn going on between scenes and steps
        events = StatusEvents(
            claim,
            self.ledger,
            self.notifier,
            self.stop,
            housekeeping=self.housekeeping,
            stop_asked=lambda: self.stop.requested or self.steering.holds(),
            on_scene_done=lambda: self.poison.progressed(claim),
            progress=self.progress,
        )
        log.info("story started", story=claim.name, seq=claim.seq, scenes=n, **asdict(attempts))
        self.steering.story_started(claim)
        started = time.monotonic()
        try:
            outputs = self._make(claim, events)
            pace = round((time.monotonic() - started) / events.made, 3) if events.made else None
            outcome: Outcome = Done(n, outputs, pace)
        except Exception as err:  # the daemon never dies of a story
            outcome = classify(err, events.scene, n, self._world_problem)
            if isinstance(outcome, Failed) and outcome.internal:
                log.exception("story failed with an internal error", story=claim.name, seq=claim.seq)
        finally:
            events.close()

        # 5. The try ended without the process dying
        if isinstance(outcome, Halted | Waiting | GpuFatal):
            self.poison.end_try(claim, crashed=isinstance(outcome, GpuFatal))
        return outcome

    def _make(self, claim: Claim, events: StatusEvents) -> dict[str, Any]:
        opened = open_claim(claim, self.settings.limits)  # a bundle's problem: a StoryError, failed
        job = StoryJob(
            claim.name, opened.story, opened.raw, claim.work, claim.tag, claim.seq, files=opened.files
        )
        render_story(job, self.settings, self.workers, events, self.pool, self.tail_cost)
        outbox = self.outbox

        def publishing() -> dict[str, Any]:
            clean_stale_temps(self.settings.paths.outbox, claim.name, claim.tag)
            return publish(
                job.out,
                job.zip_path,
                self.settings.paths.outbox,
                claim.name,
                claim.tag,
                check_outbox=lambda: self.folders.require("outbox"),
                folder=self.settings.outputs.folder,
                zip=self.settings.outputs.zip,
                progress=outbox.beat,
            )

        return self._published(outbox, outbox.submit(publishing, f"publishing {claim.name}"), events)

    def _published(self, outbox: Share, fut: Future[dict[str, Any]], events: StatusEvents) -> dict[str, Any]:
        """Publishing's result, the loop's turn going on meanwhile (controls, claims, the watchdog).

        Neither a pause nor a cancel stops a publish under way: what it renames into place would
        then be there under a story that says otherwise; they are done once it is through. A
        stop does, while the outbox does not answer: publishing is idempotent, and is done
        again at the next start."""
        while True:
            with contextlib.suppress(FutureTimeout):
                return fut.result(timeout=TURN_SECONDS)
            events.turn()
            if self.stop.requested and not outbox.answering:
                log.info("stopped while publishing waits for the outbox", story=events.claim.name)
                raise Stopped()

    def _world_problem(self) -> str | None:
        """What is wrong with the folders a story writes to, if anything: gone, full, not answering."""
        outbox = self.settings.paths.outbox
        try:
            problem = self.outbox.call(lambda: _space_problem(outbox), "a look at its free space")
        except NotAnswering as err:
            return str(err)
        return problem or _space_problem(self.settings.paths.state)


def _space_problem(folder: Path) -> str | None:
    """Gone, or nearly full; None when neither."""
    if not folder.is_dir():
        return f"{folder} is not available"
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < LOW_DISK_BYTES:
            return f"no space left on {folder}"
    return None
