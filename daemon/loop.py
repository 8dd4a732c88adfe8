"""The loop: claim -> run -> record -> next, one story at a time, strictly in arrival order.

    serve()   the loop itself: a turn, then the next claim (if nothing holds the queue) is run
              (daemon/run/runner.py) and its outcome recorded (daemon/run/recorder.py)
    turn()    what runs between stories, and between the scenes and denoising steps of one

Everything it does is a component built here and handed what it needs; the loop only puts
them in order. Every state change goes through `Ledger.move` (daemon/queue/ledger.py).
Signals are handled at one point (`_on_signal`): the first asks for a warm stop (finish the
scene in progress, keep everything, exit 0), the second exits at once; state stays consistent
either way because every write is atomic and every ending can be finished after a crash.

Nothing here, nor in anything it calls, touches the inbox or the outbox on this thread: every
call there goes through their Shares (daemon/system/share.py), deadline-guarded, so a share
that stops answering costs a `waiting` and never a watchdog ping (see "running on a share" in
the README).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import FrameType

import structlog

from daemon.inbox.folders import FolderGuard
from daemon.inbox.fstype import filesystem_type
from daemon.inbox.watch import InboxWatcher
from daemon.queue import controls
from daemon.queue.claiming import Claimer
from daemon.queue.gate import Gate
from daemon.queue.ledger import Ledger
from daemon.queue.lookahead import QueuedScenes
from daemon.queue.maintenance import Maintenance
from daemon.queue.sidecar import StatusLines
from daemon.queue.spool import Spool
from daemon.queue.steering import Steering
from daemon.report.metrics import Metrics
from daemon.report.writer import ReportWriter
from daemon.run.poison import PoisonRule
from daemon.run.recorder import Recorder
from daemon.run.runner import StoryRunner
from daemon.system.hooks import Hooks
from daemon.system.notify import Heartbeat, Notifier
from daemon.system.share import NotAnswering, Shares
from daemon.system.stall import StallWatch
from daemon.system.wake import StopRequest, Waker
from pipeline.errors import EngineUnavailable
from pipeline.images.factory import open_workers
from pipeline.images.seam import ImageGenerator, ImageWorkers
from pipeline.render import CpuPool, SoundSetup
from pipeline.settings import ConfigError, PathsSettings, Settings

EXIT_OK = 0
EXIT_SETUP = 2  # bad config, missing weights: restarting will not help

# How long one turn may spend on work that grows with the queue; the rest waits for the next turn.
BUDGET_RENDERING = 0.1  # inside a denoising step: the GPU waits meanwhile
BUDGET_IDLE = 1.0
_PHASE_USEC = 10 * 60 * 1_000_000

log = structlog.get_logger("storyreel")


class Loop:
    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        make_generator: Callable[[Settings], ImageGenerator],
        once: bool = False,
        progress: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings, self.paths, self.notifier = settings, settings.paths, notifier
        self.make_generator, self.once, self.progress = make_generator, once, progress
        self.spool = Spool(settings.paths.state, settings.paths.inbox)
        self.hooks = Hooks(settings.hooks, environ or {})
        self.shares = Shares(  # every call on the outbox and the inbox: on their lanes, with a deadline
            {"outbox": settings.paths.outbox, "inbox": settings.paths.inbox},
            deadline=settings.daemon.share_timeout_seconds,
            tick=notifier.watchdog,
        )
        outbox = self.shares["outbox"]
        self.report = ReportWriter(  # the status page and the metrics, told by the ledger
            settings.paths.outbox,
            settings.paths.state,
            self.spool.claims,
            metrics=Metrics(settings.metrics.textfile),
            history=settings.daemon.history,
            outbox_ok=lambda: self.gate.outbox_ok,
            check=lambda: self.gate.folders.require("outbox"),
            share=outbox,
        )
        lines = StatusLines(settings.paths.outbox, outbox, check=lambda: self.gate.folders.require("outbox"))
        self.ledger = Ledger(settings.paths, self.spool, notifier, self.hooks, self.report, lines)
        self.stop, self.wake, self.signals = StopRequest(notifier), Waker(), 0
        self.heartbeat = Heartbeat(notifier)
        self.stalls = StallWatch(notifier)
        self.gate = Gate(
            self.ledger, settings.daemon, shares=self.shares
        )  # its folders are recorded at start
        self.claimer = Claimer(settings, self.spool, self.ledger, self.shares)
        self.steering = Steering(settings, self.spool, self.ledger, self.claimer.validate, self.shares)
        self.maintenance = Maintenance(settings, self.spool, self.ledger, self.gate)
        self.poison = PoisonRule(settings.paths.state / "fault.log", settings.daemon.max_attempts)
        self.recorder = Recorder(self.ledger, self.gate, self.steering, self.stop)
        self.watcher = InboxWatcher(
            settings.paths.inbox, settings.watch, wake=self.wake.set, share=self.shares["inbox"]
        )
        self.workers: ImageWorkers | None = None  # the image workers ([workers]): local, or Ray actors
        self.runner: StoryRunner | None = None  # made once the workers are warm
        self._more_to_do = False  # a turn ran out of its time budget: the next one comes at once

    # -- signals: the one place they are handled ----------------------------------------
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if self.signals > 1:
            os._exit(128 + signum)  # cold stop: every file on disk is whole or absent already
        # Only flags here: anything that takes a lock (logging, the notify socket) could
        # deadlock against the code this signal interrupted. The main thread reports it.
        self.stop.requested = True
        self.wake.set()

    # -- the loop ------------------------------------------------------------------------
    def serve(self) -> None:
        """claim -> run -> record -> next, until a stop (with --once: until nothing is left)."""
        assert self.runner is not None
        while not self.stop.requested:
            self.notifier.watchdog()
            self.gate.check_folders()
            self.turn()
            claim = self.gate.next_claim(
                self.spool, stopping=self.stop.requested, paused=self.steering.paused
            )
            if claim is not None:
                self.recorder.record(claim, self.runner.run(claim))
            self.maintenance.retain()
            if claim is None and not self._idle():
                return

    def turn(self) -> None:
        """What runs between stories, and between the scenes and denoising steps of one, in order:
        claim settled drops (a bad one fails at once), finish endings left pending, apply the
        controls (pause, cancel, retry), follow the image workers, then write the page and the
        metrics if something changed (throttled). Work that grows with the queue gets a budget
        of seconds per turn, small inside a denoising step; what is left comes next turn."""
        budget = BUDGET_RENDERING if self.steering.running is not None else BUDGET_IDLE
        more = False
        view = self.ledger.activity.view  # a share not answering: said at once, also mid-story
        self.gate.check_shares(
            self.steering.running, int(view.get("scene") or 0), int(view.get("scenes") or 0)
        )
        self.ledger.settle()  # owed status lines on their way
        if self.gate.outbox_ok:  # claims, endings and controls write lines there
            claimed, more = self.claimer.claim_ready(self.watcher, budget, lambda: self.stop.requested)
            if claimed:
                self.steering.claimed()
            self.maintenance.finish_endings(quiet=self.steering.running is not None)
            more |= self.steering.read(self.watcher, budget)
        if self.workers is not None:  # images made ahead for stories that ended are dropped
            self.workers.retain(lambda key: self.spool.live(key.order))
            self.ledger.activity.workers(self.workers.describe())
            if self.workers.back():  # the Ray cluster answers again: the waiting story goes on
                self.gate.backoff.retry_now()
        self.report.tick()
        self._more_to_do = more

    def _idle(self) -> bool:
        """Nothing to run now: say so, and sleep until something may have changed. False when
        `--once` has nothing left to do (the loop ends)."""
        if self.once and self._once_finished():
            log.info("paused, exiting (--once)" if self.steering.paused else "inbox empty, exiting (--once)")
            return False
        if not self.spool.endings() and self.gate.backoff.due() and not self.gate.not_answering:
            self.ledger.activity.idle(self.watcher.error, self.watcher.held())
        self.wake.wait(self._timeout())
        return True

    def _once_finished(self) -> bool:
        idle_inbox = self.watcher.pending() == 0 and self.watcher.error is None and not self.claimer.backlog
        settled = not self.spool.endings() and not self.steering.lines_owed
        return idle_inbox and settled and (len(self.spool) == 0 or self.steering.paused)

    def _timeout(self) -> float:
        now = time.monotonic()
        limits = [self.settings.watch.rescan_seconds]
        if self.notifier.watchdog_interval_seconds:
            limits.append(self.notifier.watchdog_interval_seconds / 4)
        if not self.wake.listening:  # no doorbell: the box's controls are read once a turn
            limits.append(self.settings.watch.poll_seconds)
        for deadline in (self.watcher.next_deadline(), self.report.next_deadline()):
            if deadline is not None:
                limits.append(deadline - now)
        if len(self.spool):
            limits.append(self.gate.backoff.remaining())
        if self._more_to_do:
            limits.append(0.0)
        return max(0.01, min(limits))

    # -- start and stop ------------------------------------------------------------------
    def run(self) -> int:
        """Start (folders, the voice, spool, the warm image workers, READY=1), serve, and stop cleanly."""
        folders = open_folders(self.paths, self.shares, self.stop, self.notifier, self.wake, self.gate)
        if folders is None:  # asked to stop while a folder did not answer
            return EXIT_OK
        sound = SoundSetup.open(self.settings)  # a voice or music that cannot work: exit 2, the key named
        log.info("sound ready", voice=sound.describe(), music=str(sound.music) if sound.music else None)
        self.gate.folders = folders
        self.paths.state.mkdir(parents=True, exist_ok=True)  # ours, on local disk
        self.spool.open()
        self.maintenance.compact_history()  # history is read whole at each start
        with contextlib.suppress(OSError):  # without it, the loop polls for the commands' requests
            self.wake.listen(controls.open_doorbell(self.paths.state))
        # A fatal signal (segfault, abort) leaves its traceback here: evidence for the poison rule.
        fault_file = open(self.poison.fault_log, "a")  # noqa: SIM115 - open for the process's lifetime
        faulthandler.enable(fault_file, all_threads=True)
        try:
            self.workers = self._open_workers()
            if self.workers is None:  # asked to stop while the workers could not be reached
                return EXIT_OK
            self._ready()
            self.stalls.start()
            with CpuPool(self.settings) as pool:
                self.runner = self._runner(self.workers, pool, sound)
                try:
                    self.serve()
                finally:
                    self.stalls.stop()
                    self.heartbeat.start()  # closing down: its own pings until the exit
                    self.stop.note(busy=False)
                    self.watcher.stop()
            return EXIT_OK
        finally:
            if self.workers is not None:
                self.workers.close()
            self.ledger.lines.close()  # what is owed goes out while the outbox answers
            self.ledger.activity.stopped()
            everything = self.once and not self.stop.requested  # --once: its last story's hook too
            self.hooks.close(grace=None if everything else self.settings.hooks.timeout_seconds)
            faulthandler.disable()
            fault_file.close()
            self.wake.close()
            self.spool.close()
            self.heartbeat.stop()

    def _ready(self) -> None:
        self.notifier.ready()
        self.report.started()
        self.ledger.activity.started()
        log.info("ready", inbox=str(self.paths.inbox), outbox=str(self.paths.outbox), once=self.once)
        self.watcher.start()
        log.info(
            "watch mode",
            mode=self.watcher.mode,
            reason=self.watcher.supervisor.reason,
            inbox=str(self.paths.inbox),
            inbox_fstype=self.watcher.supervisor.fstype,
            outbox=str(self.paths.outbox),
            outbox_fstype=filesystem_type(self.paths.outbox),
        )

    def _runner(self, workers: ImageWorkers, pool: CpuPool, sound: SoundSetup) -> StoryRunner:
        return StoryRunner(
            self.settings,
            self.ledger,
            self.notifier,
            self.stop,
            self.steering,
            self.poison,
            self.gate.folders,
            workers=workers,
            pool=pool,
            housekeeping=self.turn,
            sound=sound,
            shares=self.shares,
            progress=self.progress,
        )

    def _open_workers(self) -> ImageWorkers | None:
        """Load the model into every worker before READY=1; a Ray cluster that cannot be reached
        is waited for with back-off (None: a stop came meanwhile)."""

        def phase(what: str) -> None:
            self.notifier.status(what)
            self.notifier.extend_timeout(_PHASE_USEC)  # each start-up phase gets its own allowance

        lookahead = QueuedScenes(
            self.spool,
            self.settings,
            running=lambda: self.steering.running,
            allowed=lambda: not (self.stop.requested or self.steering.holds()),
        )
        stopping = partial(getattr, self.stop, "requested")  # the stop flag, read at each call
        while not self.stop.requested:
            try:
                workers = open_workers(
                    self.settings, self.make_generator, phase, lookahead, self.wake.set, stopping
                )
            except EngineUnavailable as err:
                if self.stop.requested:  # the engine gave up its start-up for the stop
                    return None
                self.gate.wait(None, str(err))
                self.notifier.extend_timeout(_PHASE_USEC)
                self.wake.wait(max(0.01, self.gate.backoff.remaining()))
                continue
            self.gate.recovered()
            return workers
        return None


def open_folders(
    paths: PathsSettings, shares: Shares, stop: StopRequest, notifier: Notifier, wake: Waker, gate: Gate
) -> FolderGuard | None:
    """The inbox and outbox as they are at start (missing: a ConfigError, exit 2). One that does
    not answer is waited for, with back-off, said in STATUS=; None when a stop came first."""
    while not stop.requested:
        try:
            require_folders(paths, shares)
            return FolderGuard({"inbox": paths.inbox, "outbox": paths.outbox}, shares)
        except NotAnswering as err:
            log.warning("waiting", reason=str(err))
            notifier.status(f"waiting: {err}")
            notifier.extend_timeout(_PHASE_USEC)
            wake.wait(gate.backoff.failed())
    return None


def require_folders(paths: PathsSettings, shares: Shares) -> None:
    """Inbox and outbox must exist at start, unless `[paths] create = true` makes them.

    A share that is not mounted is a bare mount point: folders made there live on this
    machine's own disk, and nobody else would ever see them. Raises ConfigError (exit 2), or
    NotAnswering for a share that does not (each look is on its probe lane, with a deadline).
    """
    for key in ("inbox", "outbox"):
        folder: Path = getattr(paths, key)
        if paths.create:
            try:
                shares[key].look(lambda f=folder: f.mkdir(parents=True, exist_ok=True), "making it")  # type: ignore[misc]
            except NotAnswering:
                raise
            except OSError as err:
                raise ConfigError(f"paths.{key}: cannot create {folder}: {err.strerror or err}") from None
        elif not shares[key].look(folder.is_dir, "a look at the folder"):
            problem = "is not a folder" if shares[key].look(folder.exists, "a look") else "does not exist"
            raise ConfigError(
                f"paths.{key}: {folder} {problem} (is the share mounted?); "
                "create it, or set [paths] create = true"
            )
