"""The worker loop: claim -> run -> record -> next.

Every state change of a story happens in this file, in `Worker.process` and
the few helpers it calls, so the life of a story can be read in one place:

    inbox file --claim--> queued --process--> processing ... --publish--> done
                                   \\--> failed  (the story's fault; input kept)
                                   \\--> waiting (not its fault: disk, share; retried)

Signals are handled at one point (`_on_signal`): the first asks for a warm
stop (finish the scene in progress, keep everything, exit 0), the second exits
at once; state stays consistent either way because every write is atomic.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import os
import select
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import structlog

from daemon.folders import FolderGuard
from daemon.fstype import filesystem_type
from daemon.notify import Notifier
from daemon.spool import Attempts, Claim, Identity, Spool, read_limited, remove_original
from daemon.status import append_status, sidecar_path, write_current
from daemon.watch import InboxWatcher
from pipeline.errors import GpuFatalError, SceneOutOfMemory
from pipeline.eta import TailCost
from pipeline.generate import ImageGenerator
from pipeline.package import clean_stale_temps, publish
from pipeline.prompts import ScenePlan
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
_PHASE_USEC = 10 * 60 * 1_000_000

log = structlog.get_logger("storyreel")


class Worker:
    def __init__(
        self,
        settings: Settings,
        notifier: Notifier,
        make_generator: Callable[[Settings], ImageGenerator],
        once: bool = False,
        progress: bool = False,
    ) -> None:
        self.settings = settings
        self.paths = settings.paths
        self.notifier = notifier
        self.make_generator = make_generator
        self.once = once
        self.progress = progress
        self.spool = Spool(settings.paths.state, settings.paths.inbox)
        self.stop = StopRequest(notifier)
        self.wake = Waker()
        self.signals = 0
        self.retry_at = 0.0
        self.failures_in_a_row = 0
        self.waiting_reason: str | None = None
        self.generator: ImageGenerator | None = None
        self.tail_cost = TailCost()  # what film, sheet and ZIP cost last time: the ETA's tail
        self.fault_log = settings.paths.state / "fault.log"
        self.folders = FolderGuard({})  # inbox and outbox, recorded at start (run)
        self.folder_problems: dict[str, str] = {}

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
        # A fatal signal (segfault, abort) leaves its traceback here: evidence for _begin_try.
        fault_file = open(self.fault_log, "a")  # noqa: SIM115 - open for the process's lifetime
        faulthandler.enable(fault_file, all_threads=True)
        try:
            self.notifier.status("loading model")
            self.notifier.extend_timeout(_PHASE_USEC)  # each start-up phase gets its own allowance
            self.generator = self.make_generator(self.settings)
            if self.settings.model.warmup:
                self.notifier.status("warming up")
                self.notifier.extend_timeout(_PHASE_USEC)  # torch.compile can take minutes
                self.generator.warm_up()
            self.notifier.ready()
            self.notifier.status("idle")
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
            if self.generator is not None:
                self.generator.close()
            write_current_safely(self.paths.state, {"activity": "stopped"})
            faulthandler.disable()
            fault_file.close()
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
            if "outbox" not in self.folder_problems:  # a claim writes its "queued" line there
                self._claim_ready(watcher)
            claims = self.spool.claims()
            ready = time.monotonic() >= self.retry_at and "outbox" not in self.folder_problems
            if claims and ready and not self.stop.requested:
                try:
                    self.process(claims[0], pool)
                except OSError as err:  # status or state could not be written: not the story's fault
                    self._wait(claims[0], f"{err.strerror or err} ({err.filename or 'I/O'})")
                continue
            if self.once and not claims and watcher.pending() == 0 and watcher.error is None:
                log.info("inbox empty, exiting (--once)")
                return
            if not claims:
                current = {"activity": "idle", "waiting": self.waiting_reason, "held": watcher.held()}
                write_current_safely(self.paths.state, current)
                self.notifier.status(
                    "idle" if watcher.error is None else f"inbox unavailable: {watcher.error}"
                )
            self.wake.wait(self._timeout(watcher, bool(claims)))

    def _timeout(self, watcher: InboxWatcher, have_claims: bool) -> float:
        now = time.monotonic()
        limits = [self.notifier.watchdog_interval_seconds / 4 or 5.0, self.settings.watch.rescan_seconds]
        deadline = watcher.next_deadline()
        if deadline is not None:
            limits.append(deadline - now)
        if have_claims:
            limits.append(self.retry_at - now)
        return max(0.01, min(limits))

    # -- claiming --------------------------------------------------------------------
    def _claim_ready(self, watcher: InboxWatcher) -> None:
        for cand in watcher.poll_ready():
            if self.stop.requested:
                return
            dev, ino = cand.inode
            identity = Identity(cand.name, cand.size, cand.mtime_ns, inode=ino, dev=dev)
            try:
                if self.spool.already_claimed(identity):
                    remove_original(cand.path)  # our claim survived a crash; the original did not go
                    continue
                name = self._unique_name(
                    sanitize_name(Path(cand.name).stem, self.settings.limits.max_name_chars)
                )
                if cand.kind != "regular":
                    self._refuse(cand.path, identity, name, cand.kind, cand.detail)
                    continue
                if not cand.unchanged():  # rewritten since it settled: look again later
                    watcher.forget(cand.name)
                    continue
                claim = self.spool.claim(cand.path, identity, name)
            except OSError as err:  # locked by another client, EIO, EACCES, ESTALE: this file alone waits
                reason = f"cannot claim or remove {cand.name}: {err.strerror or err}"
                retry_in = watcher.hold(cand.name, reason)
                log.warning("held", source=cand.name, reason=reason, retry_in=retry_in)
                continue
            log.info("claimed", story=claim.name, seq=claim.seq, source=cand.name)
            self._validate_at_claim(claim)

    def _unique_name(self, base: str) -> str:
        """The first of NAME, NAME-2, NAME-3 … that no story has used: nothing is overwritten."""
        taken = self.spool.names_in_use()
        for n in range(1, 100_000):
            name = base if n == 1 else f"{base}-{n}"
            out = self.paths.outbox
            if name in taken or any(
                p.exists() for p in (out / name, out / f"{name}.zip", sidecar_path(out, name))
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
        append_status(self.paths.outbox, name, "failed", 0, 0, error=message)
        record = self.spool.failed / f"refused-{time.time_ns()}-{name}.txt"
        record.write_text(message + "\n", "utf-8")
        self.spool.remember(identity, name, "failed", error=message, kept=str(record))
        remove_original(path)
        log.warning("refused", story=name, source=identity.source, kind=kind)

    def _validate_at_claim(self, claim: Claim) -> None:
        """Bad stories fail at once, not after the queue ahead of them has run."""
        problem: StoryError | None = None
        scenes = 0
        try:
            scenes = len(self._load(claim)[1].scenes)
        except StoryError as err:
            problem = err
        try:
            source = claim.identity.source
            append_status(self.paths.outbox, claim.name, "queued", 0, scenes, seq=claim.seq, source=source)
            self.spool.mark_announced(claim)
        except OSError as err:
            log.warning("status not written", story=claim.name, error=str(err))
        if problem is not None:
            self._fail(claim, 0, 0, problem)

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

    # -- one story ---------------------------------------------------------------------
    def process(self, claim: Claim, pool: CpuPool) -> None:
        assert self.generator is not None
        if not self.spool.announced(claim):  # its "queued" line could not be written at claim
            append_status(self.paths.outbox, claim.name, "queued", 0, 0, seq=claim.seq)
            self.spool.mark_announced(claim)
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
            self.paths,
            self.notifier,
            self.stop,
            on_scene_done=lambda: self.progressed(claim),
            progress=self.progress,
        )
        log.info("story started", story=claim.name, seq=claim.seq, scenes=n, **asdict(attempts))
        try:
            render_story(job, self.settings, self.generator, events, pool, self.tail_cost)
            clean_stale_temps(self.paths.outbox, claim.name, claim.tag)
            outputs = publish(
                job.out,
                job.zip_path,
                self.paths.outbox,
                claim.name,
                claim.tag,
                check_outbox=lambda: self.folders.require("outbox"),
            )
            append_status(self.paths.outbox, claim.name, "done", n, n, outputs=outputs, seq=claim.seq)
            self.spool.finish(claim, "done", outputs=outputs)
            self._recovered()
            log.info("published", story=claim.name, seq=claim.seq, outputs=outputs)
        except Stopped:
            self._end_try(claim)
            log.info("stopped between scenes", story=claim.name, seq=claim.seq)
        except GpuFatalError as err:
            self._end_try(claim, crashed=True)
            log.error(
                "fatal GPU error, exiting for a restart", story=claim.name, seq=claim.seq, error=str(err)
            )
            with contextlib.suppress(OSError):
                append_status(
                    self.paths.outbox, claim.name, "waiting", 0, n, error=f"GPU failure, restarting: {err}"
                )
            raise SystemExit(EXIT_GPU_FATAL) from None
        except (StoryError, SceneOutOfMemory) as err:
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
            events.close()

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
        message = "; ".join(err.problems) if isinstance(err, StoryError) else str(err)
        kept = self.spool.keep_failed_input(claim)
        try:
            append_status(
                self.paths.outbox,
                claim.name,
                "failed",
                scene,
                scenes,
                error=message,
                input_kept=str(kept),
                seq=claim.seq,
            )
        except OSError as os_err:
            self._wait(claim, f"cannot write status: {os_err}")
            return
        self.spool.finish(claim, "failed", error=message, kept=str(kept))
        log.warning("story failed", story=claim.name, seq=claim.seq, error=message)

    # -- waiting on the world -----------------------------------------------------------
    def _infra_problem(self, err: BaseException) -> str | None:
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
        self.waiting_reason = reason
        log.warning("waiting", story=claim.name if claim else None, reason=reason, retry_in=delay)
        self.notifier.status(f"waiting: {reason}")
        write_current_safely(self.paths.state, {"activity": f"waiting ({reason}), retry in {delay:.0f}s"})
        if claim is not None and "outbox" not in self.folders.problems():  # never onto a bare mount point
            with contextlib.suppress(OSError):
                append_status(
                    self.paths.outbox,
                    claim.name,
                    "waiting",
                    scene,
                    scenes,
                    error=reason,
                    retry_in_seconds=round(delay, 1),
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
        self.waiting_reason = None


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


class Waker:
    """A self-pipe the main loop sleeps on. Poking it is one os.write: safe from signal
    handlers (which must not take locks, as threading.Event does) and from any thread."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full pipe: a wake-up is pending anyway
            os.write(self._w, b"!")

    def wait(self, timeout: float) -> None:
        if select.select([self._r], [], [], timeout)[0]:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._r, 4096):
                    pass


class StopRequest:
    """A warm stop: asked for by the signal handler, reported once by the main thread.

    `requested` is a plain attribute the handler sets: no lock involved, so the
    handler can never deadlock against the code it interrupted.
    """

    def __init__(self, notifier: Notifier) -> None:
        self.requested = False
        self._notifier = notifier
        self._noted = False

    def note(self, busy: bool) -> bool:
        """Tell systemd and the log, the first time the request is seen; True if this call did."""
        if not self.requested or self._noted:
            return False
        self._noted = True
        self._notifier.stopping()
        log.info("stop requested, finishing the scene in progress" if busy else "stop requested")
        return True


class StatusEvents:
    """Render events -> status lines, systemd pings, logs and (on a terminal) a progress bar."""

    def __init__(
        self,
        claim: Claim,
        paths: PathsSettings,
        notifier: Notifier,
        stop: StopRequest,
        on_scene_done: Callable[[], None],
        progress: bool,
    ) -> None:
        self.claim = claim
        self.outbox = paths.outbox
        self.state = paths.state
        self.notifier = notifier
        self.stop = stop
        self.on_scene_done = on_scene_done  # a finished scene: deaths before it were not the story's doing
        self.scene = 0
        self.bar: Any = None
        self.progress = progress

    def scene_started(self, plan: ScenePlan, total: int, eta_seconds: float | None) -> None:
        c = self.claim
        self.scene = plan.number
        eta = None if eta_seconds is None else round(eta_seconds, 1)
        append_status(self.outbox, c.name, "processing", plan.number, total, eta_seconds=eta, seq=c.seq)
        write_current_safely(
            self.state,
            {
                "activity": "processing",
                "story": c.name,
                "seq": c.seq,
                "scene": plan.number,
                "scenes": total,
                "eta_seconds": eta,
            },
        )
        self.notifier.status(f"{c.name}: scene {plan.number}/{total}")
        log.info("scene started", story=c.name, seq=c.seq, scene=plan.number, scenes=total, seed=plan.seed)
        if self.progress and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=c.name, unit="scene", file=sys.stderr, initial=plan.number - 1)

    def scene_finished(self, plan: ScenePlan, total: int) -> None:
        self.on_scene_done()
        log.info("scene finished", story=self.claim.name, seq=self.claim.seq, scene=plan.number, scenes=total)
        if self.bar is not None:
            self.bar.update(1)

    def step(self, step: int, total: int) -> None:
        self.notifier.watchdog()  # from the denoising loop itself: a hung GPU stops the pings
        if self.stop.note(busy=True):
            self.notifier.status(f"stopping after scene {self.scene} of {self.claim.name}")

    def should_stop(self) -> bool:
        return self.stop.requested

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_current_safely(state: Path, current: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):
        write_current(state, current)
