"""The worker loop: claim -> run -> record -> next.

One loop turn, in `_serve`:

    turn()      claim settled drops (a bad one fails at once), read the controls
                (pause, cancel, retry; from the box and the share), finish any
                ending left pending by a full or vanished outbox or a crash,
                write the page and metrics if something changed (throttled)
    next        the oldest claim, unless paused, backing off, or an ending is pending
    process()   render it scene by scene (turn() goes on between scenes and steps),
                publish, and end it: done, failed, cancelled; or leave it queued,
                paused or waiting to be resumed
    _retain()   between stories, at most every 10 minutes: [retention]

Every state change goes through `Ledger.move` (daemon/ledger.py); the states are
`daemon.states.State`. Signals are handled at one point (`_on_signal`): the first
asks for a warm stop (finish the scene in progress, keep everything, exit 0), the
second exits at once; state stays consistent either way because every write is atomic
and every ending can be finished after a crash.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import structlog

from daemon import controls, history, retention
from daemon.controls import Request
from daemon.events import StatusEvents, StopRequest, Waker
from daemon.folders import FolderGuard
from daemon.fstype import filesystem_type
from daemon.hooks import Hooks
from daemon.ledger import Ledger
from daemon.lookahead import Lookahead
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.observers import Observers
from daemon.page import is_reserved
from daemon.scan import Candidate
from daemon.spool import Attempts, Claim, Identity, Spool, read_limited, remove_original
from daemon.states import State
from daemon.status import append_notice, sidecar_path
from daemon.watch import InboxWatcher
from pipeline.errors import EngineUnavailable, GpuFatalError, SceneKillsWorkers, SceneOutOfMemory
from pipeline.eta import TailCost
from pipeline.images.factory import open_workers
from pipeline.images.seam import ImageGenerator, ImageWorkers
from pipeline.package import clean_stale_temps, publish
from pipeline.render import CpuPool, Stopped, StoryJob, render_story
from pipeline.settings import ConfigError, PathsSettings, Settings
from pipeline.story import Story, StoryError, load_story, sanitize_name

EXIT_OK = 0
EXIT_SETUP = 2  # bad config, missing weights: restarting will not help
EXIT_GPU_FATAL = 3  # CUDA context poisoned: a fresh process resumes the story

# Errors that are not the story's fault: wait and try again.
_INFRA_ERRNOS = {
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
_LOW_DISK_BYTES = 64 << 20
# How long one turn may spend on work that grows with the queue; the rest waits for the next turn.
_BUDGET_RENDERING = 0.1  # inside a denoising step: the GPU waits meanwhile
_BUDGET_IDLE = 1.0
_PHASE_USEC = 10 * 60 * 1_000_000
_RETENTION_SECONDS = 600.0  # [retention] at most this often: on idle turns and after endings

log = structlog.get_logger("storyreel")


class Worker:
    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        make_generator: Callable[[Settings], ImageGenerator],
        once: bool = False,
        progress: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.notifier = notifier
        self.make_generator = make_generator
        self.once = once
        self.progress = progress
        self.spool = Spool(settings.paths.state, settings.paths.inbox)
        self.hooks = Hooks(settings.hooks, environ or {})
        self.observers = Observers(  # the status page and the metrics, told by the ledger
            settings.paths.outbox,
            self.spool,
            metrics=Metrics(settings.metrics.textfile),
            history=settings.daemon.history,
            outbox_ok=lambda: "outbox" not in self.folder_problems,
        )
        self.ledger = Ledger(settings.paths, self.spool, notifier, self.hooks, self.observers)
        self.stop = StopRequest(notifier)
        self.wake = Waker()
        self.signals = 0
        self.retry_at = 0.0
        self.failures_in_a_row = 0
        self.workers: ImageWorkers | None = None  # the image workers ([workers]): local, or Ray actors
        self.tail_cost = TailCost()  # what film, sheet and ZIP cost last time: the ETA's tail
        self.fault_log = settings.paths.state / "fault.log"
        self.folders = FolderGuard({})  # inbox and outbox, recorded at start (run)
        self.folder_problems: dict[str, str] = {}
        self.running: Claim | None = None  # the story being rendered
        self.cancel_running: Request | None = None  # asked to cancel it after the scene in progress
        self.pause: list[dict[str, str]] = []  # who holds the queue paused (empty: not paused)
        self._pause_lines_owed = False  # some claim's last line does not say it is paused/queued yet
        self._backlog: deque[Candidate] = deque()  # settled drops not claimed yet, in arrival order
        self._more_to_do = False  # a turn ran out of its time budget: the next one comes at once
        self._acted: set[str] = set()  # share requests acted on, until their file is gone from a look
        self._retain_at = 0.0  # when [retention] may run next (monotonic)

    # -- signals: the one place they are handled ----------------------------------
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

    # -- main loop -------------------------------------------------------------------
    def run(self) -> int:
        require_folders(self.paths)
        self.folders = FolderGuard({"inbox": self.paths.inbox, "outbox": self.paths.outbox})
        self.paths.state.mkdir(parents=True, exist_ok=True)  # ours, on local disk
        self.spool.open()
        keep = max(history.KEEP_LINES, self.settings.daemon.history)
        with contextlib.suppress(OSError):  # a full disk: compacted another time
            history.compact(self.spool.history_path, self.paths.inbox, keep)  # read whole at each start
        with contextlib.suppress(OSError):  # without it, the loop polls for the commands' requests
            self.wake.listen(controls.open_doorbell(self.paths.state))
        # A fatal signal (segfault, abort) leaves its traceback here: evidence for _begin_try.
        fault_file = open(self.fault_log, "a")  # noqa: SIM115 - open for the process's lifetime
        faulthandler.enable(fault_file, all_threads=True)
        try:
            self.workers = self._open_workers()
            if self.workers is None:  # asked to stop while the workers could not be reached
                return EXIT_OK
            self.notifier.ready()
            self.observers.started()
            self.ledger.started()
            log.info("ready", inbox=str(self.paths.inbox), outbox=str(self.paths.outbox), once=self.once)
            watcher = InboxWatcher(self.paths.inbox, self.settings.watch, wake=self.wake.set)
            watcher.start()
            log.info(
                "watch mode",
                mode=watcher.mode,
                reason=watcher.supervisor.reason,
                inbox=str(self.paths.inbox),
                inbox_fstype=watcher.supervisor.fstype,
                outbox=str(self.paths.outbox),
                outbox_fstype=filesystem_type(self.paths.outbox),
            )
            with CpuPool(self.settings) as pool:
                try:
                    self._loop(watcher, pool)
                finally:
                    watcher.stop()
            return EXIT_OK
        finally:
            if self.workers is not None:
                self.workers.close()
            self.ledger.stopped()
            everything = self.once and not self.stop.requested  # --once: its last story's hook too
            self.hooks.close(grace=None if everything else self.settings.hooks.timeout_seconds)
            faulthandler.disable()
            fault_file.close()
            self.wake.close()
            self.spool.close()

    def _loop(self, watcher: InboxWatcher, pool: CpuPool) -> None:
        try:
            self._serve(watcher, pool)
        finally:
            self.stop.note(busy=False)

    def _serve(self, watcher: InboxWatcher, pool: CpuPool) -> None:
        while not self.stop.requested:
            self.notifier.watchdog()
            self._check_folders()
            self.turn(watcher)
            head = self.next_claim()
            if head is not None:
                try:
                    self.process(head, pool, watcher)
                except OSError as err:  # status or state could not be written: not the story's fault
                    self._wait(head, f"{err.strerror or err} ({err.filename or 'I/O'})")
                self._retain()
                continue
            self._retain()
            if self.once and self._once_finished(watcher):
                if self.pause:
                    log.info("paused, exiting (--once)", queued=len(self.spool))
                else:
                    log.info("inbox empty, exiting (--once)")
                return
            if not self.spool.endings() and time.monotonic() >= self.retry_at:
                self.ledger.idle(watcher.error, watcher.held())
            self.wake.wait(self._timeout(watcher))

    def turn(self, watcher: InboxWatcher) -> None:
        """A loop turn without running a story: also done between scenes and steps.

        Work that grows with the queue (claiming a thousand drops, a "paused" line for
        every queued story) is done in slices of `budget` seconds, so a turn inside a
        denoising step stays short; what is left is done on the next turns.
        """
        budget = _BUDGET_RENDERING if self.running is not None else _BUDGET_IDLE
        self._more_to_do = False
        if "outbox" not in self.folder_problems:  # claims, endings and controls write lines there
            self._claim_ready(watcher, budget)
            self._finish_endings(quiet=self.running is not None)  # first: controls see how stories ended
            self._read_controls(watcher, budget)
        self._follow_workers()
        self.observers.tick()  # the page and the metrics, if something changed (throttled)

    def next_claim(self) -> Claim | None:
        """The claim to run now, if any: the oldest, unless something holds the queue."""
        if self.stop.requested or self.pause or self.spool.endings() or time.monotonic() < self.retry_at:
            return None
        if "outbox" in self.folder_problems:  # never publish onto a bare mount point
            return None
        return self.spool.head()

    def _once_finished(self, watcher: InboxWatcher) -> bool:
        idle_inbox = watcher.pending() == 0 and watcher.error is None and not self._backlog
        settled = not self.spool.endings() and not self._pause_lines_owed
        return idle_inbox and settled and (len(self.spool) == 0 or bool(self.pause))

    def _timeout(self, watcher: InboxWatcher) -> float:
        now = time.monotonic()
        limits = [self.settings.watch.rescan_seconds]
        if self.notifier.watchdog_interval_seconds:
            limits.append(self.notifier.watchdog_interval_seconds / 4)
        if not self.wake.listening:  # no doorbell: the box's controls are read once a turn
            limits.append(self.settings.watch.poll_seconds)
        for deadline in (watcher.next_deadline(), self.observers.next_deadline()):
            if deadline is not None:
                limits.append(deadline - now)
        if len(self.spool):
            limits.append(self.retry_at - now)
        if self._more_to_do:
            limits.append(0.0)
        return max(0.01, min(limits))

    # -- the image workers -----------------------------------------------------------
    def _open_workers(self) -> ImageWorkers | None:
        """Load the model into every worker before READY=1; a Ray cluster that cannot be reached
        is waited for with back-off (None: a stop came meanwhile)."""

        def phase(what: str) -> None:
            self.notifier.status(what)
            self.notifier.extend_timeout(_PHASE_USEC)  # each start-up phase gets its own allowance

        lookahead = Lookahead(
            self.spool,
            self.settings,
            self._load,
            running=lambda: self.running,
            allowed=lambda: not (self.stop.requested or self.pause or self.cancel_running),
        )
        while not self.stop.requested:
            try:
                workers = open_workers(self.settings, self.make_generator, phase, lookahead)
            except EngineUnavailable as err:
                self._wait(None, str(err))
                self.notifier.extend_timeout(_PHASE_USEC)
                self.wake.wait(max(0.01, self.retry_at - time.monotonic()))
                continue
            self._recovered()
            return workers
        return None

    def _follow_workers(self) -> None:
        """Drop images made ahead for stories that ended; the workers' state into current.json."""
        if self.workers is None:
            return
        self.workers.retain(lambda key: self.spool.live(key.order))
        self.ledger.workers(self.workers.describe())

    # -- claiming --------------------------------------------------------------------
    def _claim_ready(self, watcher: InboxWatcher, budget: float) -> None:
        """Claim settled drops in arrival order, for at most `budget` seconds (the rest next turn)."""
        self._backlog.extend(watcher.poll_ready())
        deadline = time.monotonic() + budget
        while self._backlog and not self.stop.requested:
            if time.monotonic() > deadline:
                self._more_to_do = True
                return
            cand = self._backlog[0]
            try:
                claim = self._claim(cand, watcher)
            except OSError as err:  # locked by another client, EIO, EACCES, ESTALE: this file alone waits
                self._backlog.popleft()
                reason = f"cannot claim or remove {cand.name}: {err.strerror or err}"
                retry_in = watcher.hold(cand.name, reason)  # offered again after its back-off, in its place
                log.warning("held", source=cand.name, reason=reason, retry_in=retry_in)
                continue
            self._backlog.popleft()
            if claim is not None:
                log.info("claimed", story=claim.name, seq=claim.seq, source=cand.name)
                self._validate_at_claim(claim)
                self._pause_lines_owed |= bool(self.pause)

    def _claim(self, cand: Candidate, watcher: InboxWatcher) -> Claim | None:
        """One settled drop into the spool; None when there is nothing to queue."""
        dev, ino = cand.inode
        identity = Identity(cand.name, cand.size, cand.mtime_ns, inode=ino, dev=dev)
        if self.spool.already_claimed(identity):
            remove_original(cand.path)  # our claim survived a crash; the original did not go
            return None
        name = self._unique_name(sanitize_name(Path(cand.name).stem, self.settings.limits.max_name_chars))
        if cand.kind != "regular":
            self._refuse(cand.path, identity, name, cand.kind, cand.detail)
            return None
        if not cand.unchanged():  # rewritten since it settled: look again later
            watcher.forget(cand.name)
            return None
        return self.spool.claim(cand.path, identity, name)

    def _unique_name(self, base: str) -> str:
        """The first of NAME, NAME-2, NAME-3 … that no story has used: nothing is overwritten."""
        taken = self.spool.names_in_use()
        for n in range(1, 100_000):
            name = base if n == 1 else f"{base}-{n}"
            out = self.paths.outbox
            if (
                is_reserved(name)
                or name in taken
                or any(p.exists() for p in (out / name, out / f"{name}.zip", sidecar_path(out, name)))
            ):
                continue
            return name
        raise RuntimeError(f"no free name for {base}")

    def _refuse(self, path: Path, identity: Identity, name: str, kind: str, detail: str) -> None:
        """A symlink, FIFO or device: never opened, never followed; say why, then drop it."""
        what = (
            "a symbolic link (links are never followed)"
            if kind == "symlink"
            else (f"not a regular file ({detail or 'special file'})")
        )
        detail = ""
        if kind == "symlink":
            with contextlib.suppress(OSError):
                detail = f" pointing to {os.readlink(path)!r}"
        message = f"refused: {identity.source} is {what}{detail}; drop the file itself instead"
        record = self.spool.failed / f"refused-{time.time_ns()}-{name}.txt"
        record.write_text(message + "\n", "utf-8")
        self.ledger.refuse(identity, name, message, record)
        remove_original(path)
        log.warning("refused", story=name, source=identity.source, kind=kind)

    def _validate_at_claim(self, claim: Claim) -> None:
        """Bad stories fail at once, not after the queue ahead of them has run.

        Nothing here may end the process: a claim whose check cannot be done now
        (its input unreadable, the outbox full) stays queued, and whatever is left
        is done when it runs, or by `_finish_endings` for an ending under way.
        """
        try:
            scenes = len(self._load(claim)[1].scenes)
        except StoryError as err:
            with contextlib.suppress(OSError):  # a pending ending: finished on a later turn
                self._fail(claim, 0, 0, err)
            return
        except Exception as err:
            log.warning("claim not checked yet; it is when it runs", story=claim.name, error=str(err))
            return
        self.spool.note_scenes(claim, scenes)
        try:
            self.ledger.move(claim, State.QUEUED, 0, scenes, source=claim.identity.source)
        except OSError as err:
            log.warning("status not written", story=claim.name, error=str(err))

    def _load(self, claim: Claim) -> tuple[bytes, Story]:
        """Read and parse the claimed story; raises StoryError naming what is wrong.

        A story is parsed twice, on purpose: at claim, so a bad one fails at once
        rather than after the queue ahead of it has run (and the "queued" line can
        say how many scenes), and again when it runs. Keeping the parsed story with
        the claim instead would hold every queued story in memory (a thousand files
        dropped at once, each up to limits.max_file_bytes), and a claim outlives the
        process anyway, so the run must be able to parse it from the spool. A parse
        takes milliseconds; a scene takes seconds.
        """
        limit = self.settings.limits.max_file_bytes
        raw = read_limited(claim.input, limit)
        if len(raw) > limit:
            raise StoryError([f"(file): {claim.identity.size} bytes is over the limit of {limit} bytes"])
        return raw, load_story(raw, self.settings.limits)

    # -- controls: pause, cancel, retry ---------------------------------------------------
    def _read_controls(self, watcher: InboxWatcher, budget: float) -> None:
        sources = controls.pause_sources(self.paths.state, watcher.controls)
        if sources != self.pause:
            if bool(sources) != bool(self.pause):
                log.info("paused" if sources else "resumed", by=[s["by"] for s in sources] or None)
                self._pause_lines_owed = True
            self.pause = sources
            self.ledger.paused(sources)
        share = controls.share_requests(watcher.controls)
        self._acted &= {r.id for r in share}  # a file gone from the listing cannot come back as itself
        for req in controls.box_requests(self.paths.state) + share:
            if req.id in self._acted:
                continue
            try:
                self._act(req, watcher)
            except OSError as err:  # the effect could not be written: the request stays for a later turn
                log.warning("control not carried out yet", request=req.by, story=req.name, error=str(err))
            except Exception as err:  # a bug must not stop the queue: say so, drop the request
                log.exception("control failed", request=req.by, story=req.name)
                append_notice(self.paths.state, f"{req.by}: could not be carried out ({err}); see the log")
                self._consume(req)
        if self._pause_lines_owed:
            self._write_pause_lines(budget)

    def _act(self, req: Request, watcher: InboxWatcher) -> None:
        """Carry out one cancel or retry; the request is consumed once its effect is recorded."""
        name = self._story_name(req)
        claim, ended = self.spool.queued(name), self.spool.last_ended(name)
        done_before = (claim is not None and claim.request == req.id) or (
            ended is not None and ended.get("request") == req.id
        )
        if done_before:
            self._consume(req)  # carried out before a crash took the process before this
            return
        if (
            claim is not None
            and claim.ending is not None
            and claim.ending.get("record", {}).get("request") == req.id
        ):
            return  # under way; consumed once the ending is through
        if claim is not None and claim is self.running and self.cancel_running is not None:
            return  # already asked; the story stops after its scene in progress
        problem = controls.refusal(req.action, name, claim, ended, running=claim is self.running)
        if problem is not None:
            if req.share and claim is None and ended is None and self._still_arriving(watcher, name):
                return  # NAME.json and NAME.cancel dropped together: the story is not claimed yet
            log.warning("control refused", request=req.by, story=name, reason=problem)
            append_notice(self.paths.state, f"{req.by}: {problem}")
            self._consume(req)
            return
        if req.action == "cancel":
            assert claim is not None
            if claim is self.running:
                self.cancel_running = req
                log.info("cancel requested, stopping after the scene in progress", story=name, by=req.by)
                return
            log.info("cancelling", story=name, seq=claim.seq, by=req.by)
            self.ledger.move(
                claim, State.CANCELLED, 0, claim.scenes or 0, by=req.by, record={"request": req.id}
            )
        else:
            assert ended is not None
            claim = self.spool.requeue(dict(ended), req.id)
            log.info("retry: back in the queue", story=name, seq=claim.seq, by=req.by, was=ended.get("state"))
            self._validate_at_claim(claim)
            self._pause_lines_owed |= bool(self.pause)
        self._consume(req)

    def _story_name(self, req: Request) -> str:
        """NAME as the request gives it, else as a dropped file of that name would be called."""
        if req.name in self.spool.names_in_use() or self.spool.last_ended(req.name) is not None:
            return req.name
        return sanitize_name(req.name, self.settings.limits.max_name_chars)

    def _still_arriving(self, watcher: InboxWatcher, name: str) -> bool:
        """Whether NAME.json is in the inbox, not claimed yet (a control dropped with its story)."""
        limit = self.settings.limits.max_name_chars
        return any(sanitize_name(Path(n).stem, limit) == name for n in watcher.entries)

    def _consume(self, req: Request) -> None:
        req.consume()
        if req.share:
            self._acted.add(req.id)

    def _write_pause_lines(self, budget: float) -> None:
        """Every queued story's sidecar says "paused" once per pause, and "queued" again after it."""
        state, paused = (State.PAUSED, True) if self.pause else (State.QUEUED, False)
        deadline = time.monotonic() + budget
        for claim in self.spool.claims():
            if claim is self.running or claim.ending is not None or claim.paused == paused:
                continue
            if time.monotonic() > deadline:
                self._more_to_do = True
                return
            try:
                self.ledger.move(claim, state, 0, claim.scenes or 0)
            except OSError as err:
                log.warning("status not written", story=claim.name, error=str(err))
                return  # owed still: tried again next turn
        self._pause_lines_owed = False

    # -- endings left pending -------------------------------------------------------------
    def _finish_endings(self, quiet: bool) -> None:
        """Finish endings a full or vanished outbox (or a crash) interrupted, oldest first."""
        endings = self.spool.endings()
        if not endings or time.monotonic() < self.retry_at:
            return
        for claim in endings:
            try:
                self.ledger.finish_ending(claim)
            except OSError as err:
                where = err.filename or "I/O"
                reason = f"cannot finish the ending of {claim.name}: {err.strerror or err} ({where})"
                if quiet:  # a story is rendering: it goes on; the loop waits after it
                    log.warning("ending pending", story=claim.name, error=reason)
                else:
                    self._wait(None, reason)
                return
        self._recovered()

    # -- one story ---------------------------------------------------------------------
    def process(self, claim: Claim, pool: CpuPool, watcher: InboxWatcher) -> None:
        assert self.workers is not None
        self.ledger.announce(claim)  # its "queued" line, if it could not be written at claim
        try:
            raw, story = self._load(claim)
        except StoryError as err:
            self._fail(claim, 0, 0, err)
            return
        n = len(story.scenes)
        attempts, give_up = self._begin_try(claim)
        if give_up:
            self._fail(claim, 0, n, give_up)
            return
        job = StoryJob(claim.name, story, raw, claim.work, claim=claim.tag, sequence=claim.seq)
        events = StatusEvents(
            claim,
            self.ledger,
            self.notifier,
            self.stop,
            housekeeping=lambda: self.turn(watcher),
            should_stop=lambda: self.stop.requested or bool(self.pause) or self.cancel_running is not None,
            on_scene_done=lambda: self.progressed(claim),
            progress=self.progress,
        )
        log.info("story started", story=claim.name, seq=claim.seq, scenes=n, **asdict(attempts))
        self.running, self.cancel_running = claim, None
        started = time.monotonic()
        try:
            render_story(job, self.settings, self.workers, events, pool, self.tail_cost)
            clean_stale_temps(self.paths.outbox, claim.name, claim.tag)
            outputs = publish(
                job.out,
                job.zip_path,
                self.paths.outbox,
                claim.name,
                claim.tag,
                check_outbox=lambda: self.folders.require("outbox"),
                folder=self.settings.outputs.folder,
                zip=self.settings.outputs.zip,
            )
            pace = round((time.monotonic() - started) / events.made, 3) if events.made else None
            self.ledger.move(claim, State.DONE, n, n, outputs=outputs, record={"pace": pace})
            self._recovered()
        except Stopped:
            self._end_try(claim)
            self._halted(claim, n)
        except GpuFatalError as err:
            self._end_try(claim, crashed=True)
            log.error(
                "fatal GPU error, exiting for a restart", story=claim.name, seq=claim.seq, error=str(err)
            )
            with contextlib.suppress(OSError):
                self.ledger.move(claim, State.WAITING, 0, n, error=f"GPU failure, restarting: {err}")
            raise SystemExit(EXIT_GPU_FATAL) from None
        except (StoryError, SceneOutOfMemory, SceneKillsWorkers) as err:
            self._fail(claim, events.scene, n, err)
        except Exception as err:  # the daemon never dies of a story
            reason = self._infra_problem(err)
            if reason is not None:
                self._end_try(claim)
                self._wait(claim, reason, events.scene, n)
            else:
                log.exception("story failed with an internal error", story=claim.name, seq=claim.seq)
                self._fail(claim, events.scene, n, f"internal error: {type(err).__name__}: {err}")
        finally:
            self.running = self.cancel_running = None  # a cancel that came too late is refused next turn
            events.close()

    def _halted(self, claim: Claim, n: int) -> None:
        """The story stopped between scenes: cancelled, interrupted by a stop, or paused."""
        done = len(list((claim.work / "records").glob("*.json")))
        req, self.cancel_running = self.cancel_running, None
        if req is not None:
            log.info("cancelled after the scene in progress", story=claim.name, seq=claim.seq, by=req.by)
            self.ledger.move(claim, State.CANCELLED, done, n, by=req.by, record={"request": req.id})
            self._consume(req)
        elif self.stop.requested:
            reason = f"interrupted by stop; resumes at scene {done + 1}"
            log.info("stopped between scenes", story=claim.name, seq=claim.seq, resumes_at=done + 1)
            self.ledger.move(claim, State.QUEUED, done, n, reason=reason)
        else:
            log.info("paused between scenes", story=claim.name, seq=claim.seq, resumes_at=done + 1)
            by = "; ".join(p["by"] for p in self.pause)
            self._pause_lines_owed = True  # if this line cannot be written now, the next turn writes it
            self.ledger.move(claim, State.PAUSED, done, n, by=by)

    def _fault_log_size(self) -> int:
        try:
            return self.fault_log.stat().st_size
        except OSError:
            return 0

    def _begin_try(self, claim: Claim) -> tuple[Attempts, str | None]:
        """Count how the last try ended; a story that keeps killing the process is given up."""
        a = self.spool.attempts(claim)
        if a.running:
            if self._fault_log_size() > a.fault_mark:
                a.crashes += 1
            else:
                a.unexplained += 1
        limit = self.settings.daemon.max_attempts
        if a.crashes >= limit:
            return a, (
                f"the daemon crashed {a.crashes} times in a row while making this story (fatal signal or "
                f"GPU error; see {self.fault_log}); giving up on it"
            )
        if a.unexplained >= 3 * limit:
            return a, (
                f"the daemon was killed {a.unexplained} times in a row while making this story, with no "
                "scene finished in between (out of host memory?); giving up on it"
            )
        a.running, a.fault_mark = True, self._fault_log_size()
        self.spool.save_attempts(claim, a)
        return a, None

    def _end_try(self, claim: Claim, crashed: bool = False) -> None:
        with contextlib.suppress(OSError):
            a = self.spool.attempts(claim)
            a.running = False
            a.crashes += int(crashed)
            self.spool.save_attempts(claim, a)

    def progressed(self, claim: Claim) -> None:
        """A scene finished: deaths before it were not this story's doing."""
        self.spool.save_attempts(claim, Attempts(running=True, fault_mark=self._fault_log_size()))

    def _fail(self, claim: Claim, scene: int, scenes: int, err: object) -> None:
        """End the story `failed`; raises OSError while the ending is pending (see daemon/ledger.py)."""
        message = "; ".join(err.problems) if isinstance(err, StoryError) else str(err)
        log.warning("story failed", story=claim.name, seq=claim.seq, error=message)
        self.ledger.move(claim, State.FAILED, scene, scenes, error=message)

    # -- what piles up -------------------------------------------------------------------
    def _retain(self) -> None:
        """`[retention]` and history compaction, between stories (never inside a scene), at
        most every _RETENTION_SECONDS. Queued and running stories are never touched."""
        now = time.monotonic()
        if now < self._retain_at or self.spool.endings() or "outbox" in self.folder_problems:
            return
        self._retain_at = now + _RETENTION_SECONDS
        try:
            report = retention.enforce(self.settings, self.spool.names_in_use(), self.ledger.expired)
        except OSError as err:  # the outbox or state cannot be listed or written: next time
            log.warning("retention not applied", error=f"{err.strerror or err} ({err.filename or 'I/O'})")
            return
        if report.expired or report.failed_inputs or report.history_lines_folded:
            log.info("retention applied", **asdict(report))

    # -- waiting on the world -----------------------------------------------------------
    def _infra_problem(self, err: BaseException) -> str | None:
        if isinstance(err, EngineUnavailable):  # the Ray cluster or its head is gone: not the story's fault
            return str(err)
        for exc in (err, err.__cause__, err.__context__):
            if isinstance(exc, OSError) and exc.errno in _INFRA_ERRNOS:
                return f"{exc.strerror or os.strerror(exc.errno)} ({exc.filename or 'I/O'})"
        for folder in (self.paths.outbox, self.paths.state):
            if not folder.is_dir():
                return f"{folder} is not available"
            with contextlib.suppress(OSError):
                if shutil.disk_usage(folder).free < _LOW_DISK_BYTES:
                    return f"no space left on {folder}"
        return None

    def _wait(self, claim: Claim | None, reason: str, scene: int = 0, scenes: int = 0) -> None:
        delay = wait_seconds(
            self.failures_in_a_row,
            self.settings.daemon.retry_min_seconds,
            self.settings.daemon.retry_max_seconds,
        )
        self.failures_in_a_row += 1
        self.retry_at = time.monotonic() + delay
        log.warning("waiting", story=claim.name if claim else None, reason=reason, retry_in=delay)
        self.ledger.waiting(reason, delay)
        if claim is not None and claim.ending is None and "outbox" not in self.folders.problems():
            with contextlib.suppress(OSError):
                self.ledger.move(
                    claim, State.WAITING, scene, scenes, error=reason, retry_in_seconds=round(delay, 1)
                )

    def _check_folders(self) -> None:
        """Inbox and outbox still the folders from start? If not: waiting, and nothing written there."""
        was, self.folder_problems = self.folder_problems, self.folders.problems()
        if self.folder_problems and time.monotonic() >= self.retry_at:
            self._wait(None, "; ".join(self.folder_problems.values()))
        elif was and not self.folder_problems:
            log.info("folders back", was="; ".join(was.values()))
            self.retry_at = 0.0

    def _recovered(self) -> None:
        self.failures_in_a_row = 0
        self.retry_at = 0.0
        self.ledger.recovered()


def require_folders(paths: PathsSettings) -> None:
    """Inbox and outbox must exist at start, unless `[paths] create = true` makes them.

    A share that is not mounted is a bare mount point: folders made there live on this
    machine's own disk, and nobody else would ever see them. Raises ConfigError (exit 2).
    """
    for key in ("inbox", "outbox"):
        folder: Path = getattr(paths, key)
        if paths.create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ConfigError(f"paths.{key}: cannot create {folder}: {err.strerror or err}") from None
        elif not folder.is_dir():
            problem = "is not a folder" if folder.exists() else "does not exist"
            raise ConfigError(
                f"paths.{key}: {folder} {problem} (is the share mounted?); "
                "create it, or set [paths] create = true"
            )


def wait_seconds(failures: int, low: float, high: float) -> float:
    """Exponential back-off while the world is broken: low, 2·low, 4·low … capped at high."""
    return min(high, low * (2 ** min(failures, 30)))
