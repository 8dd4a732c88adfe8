"""The recorder: a story's outcome (daemon/run/outcome.py) into ledger moves, the one place.

    Done      -> done, with its outputs and pace; the world is well again
    Failed    -> failed, with the reason
    Halted    -> cancelled (asked for), queued (a warm stop: "resumes at scene N") or paused
    Waiting   -> waiting, with back-off (the gate)
    GpuFatal  -> waiting, then the process exits with EXIT_GPU_FATAL for systemd to restart it

A move that cannot be written (the outbox full or gone) leaves the ending pending in the spool
(daemon/queue/ledger.py) and the loop waits: nothing is lost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import structlog

from daemon.queue.claim import Claim
from daemon.queue.gate import Gate
from daemon.queue.ledger import Ledger
from daemon.queue.states import State
from daemon.queue.steering import Steering
from daemon.run.outcome import Done, Failed, GpuFatal, Halted, Outcome, Waiting
from daemon.system.errors import os_error_text
from daemon.system.wake import StopRequest
from pipeline.render import WorkFolder

log = structlog.get_logger("storyreel")

EXIT_GPU_FATAL = 3  # CUDA context poisoned: a fresh process resumes the story


@dataclass
class Recorder:
    ledger: Ledger
    gate: Gate
    steering: Steering
    stop: StopRequest

    def record(self, claim: Claim, outcome: Outcome) -> None:
        try:
            self._record(claim, outcome)
        except OSError as err:  # status or state could not be written: not the story's fault
            self.gate.wait(claim, os_error_text(err))
        finally:
            self.steering.story_over()

    def _record(self, claim: Claim, outcome: Outcome) -> None:
        if isinstance(outcome, Done):
            n = outcome.scenes
            self.ledger.move(claim, State.DONE, n, n, outputs=outcome.outputs, record={"pace": outcome.pace})
            self.gate.recovered()
        elif isinstance(outcome, Failed):
            self.ledger.fail(claim, outcome.scene, outcome.scenes, outcome.error)
        elif isinstance(outcome, Halted):
            self._halted(claim, outcome.scenes)
        elif isinstance(outcome, Waiting):
            self.gate.wait(claim, outcome.reason, outcome.scene, outcome.scenes)
        else:
            self._gpu_fatal(claim, outcome)

    def _halted(self, claim: Claim, n: int) -> None:
        """The story stopped between scenes: cancelled, interrupted by a stop, or paused."""
        done = WorkFolder(claim.work).finished_scenes()
        req = self.steering.take_cancel()
        if req is not None:
            log.info("cancelled after the scene in progress", story=claim.name, seq=claim.seq, by=req.by)
            self.ledger.move(claim, State.CANCELLED, done, n, by=req.by, record={"request": req.id})
            self.steering.consume(req)
        elif self.stop.requested:
            resumes = f"resumes at scene {done + 1}" if done < n else "publishes at the next start"
            reason = f"interrupted by stop; {resumes}"  # every scene made: it was publishing
            log.info("stopped between scenes", story=claim.name, seq=claim.seq, resumes_at=done + 1)
            self.ledger.move(claim, State.QUEUED, done, n, reason=reason)
        else:
            log.info("paused between scenes", story=claim.name, seq=claim.seq, resumes_at=done + 1)
            by = "; ".join(p["by"] for p in self.steering.pause)
            self.steering.lines_owed = True  # if this line cannot be written now, the next turn writes it
            self.ledger.move(claim, State.PAUSED, done, n, by=by)

    def _gpu_fatal(self, claim: Claim, outcome: GpuFatal) -> None:
        log.error(
            "fatal GPU error, exiting for a restart", story=claim.name, seq=claim.seq, error=outcome.error
        )
        with contextlib.suppress(OSError):
            self.ledger.move(
                claim, State.WAITING, 0, outcome.scenes, error=f"GPU failure, restarting: {outcome.error}"
            )
        raise SystemExit(EXIT_GPU_FATAL) from None
