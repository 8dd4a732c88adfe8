"""[hooks]: a command run when a story ends, e.g. curl to a webhook, moving the ZIP, a chat message.

    [hooks]
    on_done = ["/usr/bin/curl", "-fsS", "-d", "@-", "https://hooks.example/storyreel"]
    on_failed = ["/usr/local/bin/notify-failed"]

An argv list, run without a shell, with the story's facts in STORYREEL_* environment
variables. Each hook has one thread and a queue of its own, so hooks run at most one
at a time per hook, in the order stories ended, and the loop only ever puts
work on a queue: a hook that hangs, fails or is missing is logged and never holds up
the queue. A hang is killed at `timeout_seconds`, with its whole process group.

A hook is started after the story's final status line is written. Delivery is at
most once: one still queued when the process is killed is not run after the restart.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import IO

import structlog

from pipeline.settings import HooksSettings

log = structlog.get_logger("storyreel.hooks")

_TAIL_BYTES = 2000


class Hooks:
    """The configured hooks, by the state that starts them."""

    def __init__(self, settings: HooksSettings, environ: Mapping[str, str]) -> None:
        self._runners: dict[str, HookRunner] = {}  # by the name of the state that starts it
        for state, key, argv in (
            ("done", "on_done", settings.on_done),
            ("failed", "on_failed", settings.on_failed),
        ):
            if argv:
                self._runners[state] = HookRunner(key, list(argv), environ, settings.timeout_seconds)

    def ended(self, state: str, facts: Mapping[str, str]) -> None:
        """A story ended in `state` ("done", "failed", …): its hook, if one is set, gets `facts`."""
        runner = self._runners.get(state)
        if runner is not None:
            runner.submit(facts)

    def close(self, grace: float | None) -> None:
        """Let queued hooks run for up to `grace` seconds in all (None: all of them, each
        within its timeout, as `run --once` does), then kill what still runs."""
        deadline = None if grace is None else time.monotonic() + grace
        for runner in self._runners.values():
            runner.close(deadline)


class HookRunner:
    """One hook: a thread that runs its queue, one command at a time."""

    def __init__(self, key: str, argv: list[str], environ: Mapping[str, str], timeout: float) -> None:
        self.key = key
        self.argv = argv
        self.environ = dict(environ)
        self.timeout = timeout
        self._queue: queue.Queue[Mapping[str, str] | None] = queue.Queue()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"storyreel-hook-{key}", daemon=True)
        self._thread.start()

    def submit(self, facts: Mapping[str, str]) -> None:
        self._queue.put(facts)

    def close(self, deadline: float | None) -> None:
        self._queue.put(None)
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            with self._lock:
                if self._proc is not None:
                    _kill_group(self._proc)
            left = self._queue.qsize()
            log.warning("hooks not run: the daemon is stopping", hook=self.key, left=left)

    def _run(self) -> None:
        while (facts := self._queue.get()) is not None:
            try:
                self._run_one(facts)
            except Exception:  # a hook never takes its thread down
                log.exception("hook error", hook=self.key, story=facts.get("STORYREEL_NAME"))

    def _run_one(self, facts: Mapping[str, str]) -> None:
        story = facts.get("STORYREEL_NAME")
        t0 = time.monotonic()
        with tempfile.TemporaryFile() as out:
            try:
                with self._lock:
                    self._proc = proc = subprocess.Popen(
                        self.argv,
                        env={**self.environ, **facts},
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: a timeout kills its children too
                        close_fds=True,
                    )
            except OSError as err:
                log.error("hook could not start", hook=self.key, story=story, argv=self.argv, error=_why(err))
                return
            try:
                code = proc.wait(self.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                log.error(
                    "hook timed out and was killed",
                    hook=self.key,
                    story=story,
                    timeout_seconds=self.timeout,
                    output=_tail(out),
                )
                return
            finally:
                with self._lock:
                    self._proc = None
            seconds = round(time.monotonic() - t0, 2)
            if code != 0:
                log.error(
                    "hook failed",
                    hook=self.key,
                    story=story,
                    exit_code=code,
                    seconds=seconds,
                    output=_tail(out),
                )
            else:
                log.info("hook ran", hook=self.key, story=story, seconds=seconds)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _why(err: OSError) -> str:
    return f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")


def _tail(out: IO[bytes]) -> str:
    """The last lines the hook printed (stdout and stderr together): what to look at when it fails."""
    with contextlib.suppress(OSError):
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - _TAIL_BYTES))
        return out.read().decode("utf-8", "replace").strip()
    return ""
