"""`outbox/NAME.status.jsonl`, the per-story status sidecar people `tail -f`.

Append-only, one JSON object per line, each line flushed and fsynced as it is written, so
`tail -f` shows progress live and the last line is always the current state. Only the ledger
(daemon/queue/ledger.py) writes here, through `StatusLines`; the report reads.

`StatusLines` owns every line the daemon says: each is owed from the moment it is said (its
`time` is that moment) until the outbox has taken it, and the owed lines are written in the
order they were said, on the outbox's lane (daemon/system/share.py). While the outbox answers,
saying a line waits (deadline-guarded) until it is written, so the sidecar is as current as the
daemon. While it does not answer (or is full, or gone: the folder check runs before each write),
the lines wait in order and the story goes on; they are written once it takes them again,
retried with back-off. A line that must be on the share before anything else happens (an
ending's) is said with a key and `require`d.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from daemon.queue.states import State
from daemon.system.backoff import Backoff
from daemon.system.jsonl import now_iso, read_json_lines
from daemon.system.share import NotAnswering, Share
from pipeline.names import sidecar_name

log = structlog.get_logger("storyreel")

OWED_LIMIT = 10_000  # lines kept while the outbox takes none; past it, the oldest progress lines go


def sidecar_path(outbox: Path, name: str) -> Path:
    return outbox / sidecar_name(name)


def status_line(name: str, state: State | str, scene: int, scenes: int, **extra: Any) -> dict[str, Any]:
    """One status line, stamped now (when it is said, whenever it is written)."""
    line: dict[str, Any] = {
        "time": now_iso(),
        "story": name,
        "state": State(state).value,
        "scene": scene,
        "scenes": scenes,
    }
    line.update({k: v for k, v in extra.items() if v is not None})
    return line


def _encoded(line: dict[str, Any]) -> bytes:
    return (json.dumps(line, ensure_ascii=False) + "\n").encode("utf-8")


def append_status(
    outbox: Path, name: str, state: State | str, scene: int, scenes: int, **extra: Any
) -> dict[str, Any]:
    """Append one line now, on this thread; raises OSError if the outbox cannot take it."""
    line = status_line(name, state, scene, scenes, **extra)
    append_line(sidecar_path(outbox, name), _encoded(line))
    return line


def append_line(path: Path, data: bytes) -> None:
    """Append one encoded line; raises OSError if the file cannot take it.

    A short write (a filesystem that filled up in the middle of the line) is cut back off,
    so the file never holds half a line.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            os.fsync(fd)
        except OSError as err:
            _cut_back(fd, size, path)
            if err.filename is None:  # os.write names no file: say which one could not take the line
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise
    finally:
        os.close(fd)


def _cut_back(fd: int, size: int, path: Path) -> None:
    """Undo a failed append: no half line, and no empty sidecar (it would take the name)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, size)
        if size == 0:
            path.unlink()


def read_status(outbox: Path, name: str) -> list[dict[str, Any]]:
    """Every readable line of NAME's sidecar (none if it cannot be read: it is on a share)."""
    with contextlib.suppress(OSError):
        return read_json_lines(sidecar_path(outbox, name))
    return []


def last_status(outbox: Path, name: str) -> dict[str, Any] | None:
    """NAME's last readable status line, if any."""
    lines = read_status(outbox, name)
    return lines[-1] if lines else None


def expire_line(outbox: Path, name: str, reason: str) -> None:
    """NAME's sidecar says `expired` last (retention removes its outputs next), unless it already
    does (a removal repeated after a crash). Raises OSError when it cannot: then nothing goes."""
    last = read_status(outbox, name)[-1:] or [{}]
    if last[0].get("state") != State.EXPIRED:
        scene, scenes = int(last[0].get("scene") or 0), int(last[0].get("scenes") or 0)
        append_status(outbox, name, State.EXPIRED, scene, scenes, error=reason)


# ------------------------------------------------------------------ the owed lines


@dataclass(frozen=True)
class _Owed:
    name: str
    data: bytes
    key: Hashable | None  # a line someone needs to know is written (`StatusLines.require`)
    on_written: Callable[[], None] | None  # a marker to set once it is (on the caller's thread)


def _write(
    outbox: Path, batch: tuple[_Owed, ...], check: Callable[[], None], beat: Callable[[], None]
) -> int:
    """Write `batch` in order (on the outbox's lane); how many were written before an error,
    which is raised with the count in `written` (an attribute on the error)."""
    check()  # the outbox is still the folder from start: never a line on a bare mount point
    for i, owed in enumerate(batch):
        try:
            append_line(sidecar_path(outbox, owed.name), owed.data)
        except OSError as err:
            err.written = i  # type: ignore[attr-defined]
            raise
        beat()
    return len(batch)


class StatusLines:
    """Every status line said, owed until the outbox takes it, written in order (module docstring).

    `share`: the outbox's Share; without one (tools, tests) each line is written on the
    caller's thread, with the same rules. `check` raises OSError when the outbox is not the
    folder from start. Everything but the writing itself runs on the loop's thread."""

    def __init__(
        self,
        outbox: Path,
        share: Share | None = None,
        check: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.outbox, self.share, self.check = outbox, share, check
        self.error: OSError | None = None  # why the last write stopped short; None once they go in
        self.backoff = Backoff(0.2, 30.0, clock)
        self._owed: deque[_Owed] = deque()
        self._keys: set[Hashable] = set()
        self._drain: Future[int] | None = None  # the write in flight: the first `_carried` owed
        self._carried = 0

    def say(
        self,
        name: str,
        state: State | str,
        scene: int,
        scenes: int,
        *,
        key: Hashable | None = None,
        on_written: Callable[[], None] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Owe one line (once per `key` while it is owed), and wait for it while the outbox answers."""
        line = status_line(name, state, scene, scenes, **extra)
        if key is None or key not in self._keys:
            self._owed.append(_Owed(name, _encoded(line), key, on_written))
            if key is not None:
                self._keys.add(key)
            self._trim()
        self.settle(wait=True)
        return line

    def owes(self, key: Hashable) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._owed)

    def require(self, key: Hashable) -> None:
        """Raise unless the line said with `key` is on the share: the error that holds it up."""
        if key in self._keys:
            self.settle(wait=True, force=True)
        if key in self._keys:
            raise self.error or NotAnswering(f"outbox {self.outbox} is not answering", self.outbox)

    def read(self, name: str) -> list[dict[str, Any]]:
        """NAME's lines as the share has them (deadline-guarded: NotAnswering)."""
        if self.share is None:
            return read_status(self.outbox, name)
        return self.share.call(lambda: read_status(self.outbox, name), f"reading {sidecar_name(name)}")

    def settle(self, wait: bool = False, force: bool = False) -> None:
        """Take in a finished write, and start the next while lines are owed (after the back-off,
        once one failed, unless `force`). `wait`: until what is owed is written, a write fails,
        or the outbox is not answering (deadline-guarded: the share's wait)."""
        while True:
            self._collect()
            due = force or self.share is None or self.backoff.due()
            if not self._owed or (self._drain is None and not due):
                return
            if self._drain is None and not self._start():
                return
            if not wait or self._drain is None:
                return
            try:
                if self.share is not None:
                    self.share.wait(self._drain)
            except NotAnswering:
                return
            except OSError:
                pass  # the write's own error: taken in by _collect
            self._collect()
            if self.error is not None:
                return
            force = False

    def close(self) -> None:
        """At the stop: what is owed goes out while the outbox answers; what is left is said."""
        self.settle(wait=True, force=True)
        if self._owed:
            log.warning("status lines not written at stop", lines=len(self._owed), error=str(self.error))

    def _start(self) -> bool:
        batch = tuple(self._owed)
        beat = self.share.beat if self.share is not None else (lambda: None)

        def job() -> int:
            return _write(self.outbox, batch, self.check, beat)

        what = f"writing {len(batch)} status line{'s' if len(batch) > 1 else ''}"
        if self.share is None:
            fut: Future[int] = Future()
            try:
                fut.set_result(job())
            except Exception as err:  # taken in by _collect, as from the lane
                fut.set_exception(err)
        else:
            try:
                fut = self.share.submit(job, what)
            except NotAnswering as err:
                self._failed(err)
                return False
        self._drain, self._carried = fut, len(batch)
        return True

    def _collect(self) -> None:
        fut = self._drain
        if fut is None or not fut.done():
            return
        self._drain = None
        try:
            written, err = fut.result(), None
        except OSError as error:
            written, err = int(getattr(error, "written", 0)), error
        except Exception as error:  # a bug: said, and the lines stay owed
            log.exception("status lines not written")
            written, err = 0, OSError(errno.EIO, f"status lines not written: {error}", str(self.outbox))
        for _ in range(written):
            owed = self._owed.popleft()
            if owed.key is not None:
                self._keys.discard(owed.key)
            if owed.on_written is not None:
                with contextlib.suppress(OSError):  # a marker on local disk: the line is what counts
                    owed.on_written()
        self._carried = 0
        if err is not None:
            self._failed(err)
        elif self.error is not None:
            log.info("status lines written again", was=str(self.error))
            self.error = None
            self.backoff.reset()

    def _failed(self, err: OSError) -> None:
        if self.error is None or str(err) != str(self.error):
            log.warning("status lines owed", lines=len(self._owed), error=str(err))
        self.error = err
        self.backoff.failed()

    def _trim(self) -> None:
        """Past OWED_LIMIT, the oldest line nobody waits for goes (progress: later lines say more)."""
        if len(self._owed) <= OWED_LIMIT:
            return
        for i in range(self._carried, len(self._owed)):
            if self._owed[i].key is None:
                log.warning("status line dropped: too many owed", story=self._owed[i].name)
                del self._owed[i]
                return
