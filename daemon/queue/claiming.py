"""Claiming: settled drops from the inbox into the spool, in arrival order, under a name of their own.

A file another client holds (locked, EIO, EACCES, a stale handle) costs that file alone: the
watcher holds it with back-off and every other ready file goes on. A symlink, FIFO or device is
never opened: it is refused with the reason. A story is checked at claim (`validate`), so a bad
one fails at once rather than after the queue ahead of it has run; a bundle (NAME.zip) by its
listing and story.json (pipeline.bundle.inspect_bundle: milliseconds, nothing inflated but
story.json), its pictures and sounds decoded when it runs.

Every call on the inbox (the file read in, the original removed) and on the outbox (is a name
taken there?) goes through its Share (daemon/system/share.py): deadline-guarded, a share that
does not answer holds the file like a lock does. Nothing is claimed while the outbox is busy
or either does not answer (`ready`): the next turn tries again.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from daemon.inbox.scan import Candidate
from daemon.inbox.watch import InboxWatcher
from daemon.queue.claim import Claim, Identity
from daemon.queue.ledger import Ledger
from daemon.queue.spool import Spool, remove_original
from daemon.queue.states import State
from daemon.queue.stories import load_claim, problem_text
from daemon.system.share import Shares
from pipeline.names import first_free, name_of_drop, outbox_entries
from pipeline.settings import Settings
from pipeline.story import StoryError

log = structlog.get_logger("storyreel")

T = TypeVar("T")


class Claimer:
    def __init__(
        self, settings: Settings, spool: Spool, ledger: Ledger, shares: Shares | None = None
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.ledger = ledger
        self.shares = shares or Shares({})
        self.backlog: deque[Candidate] = deque()  # settled drops not claimed yet, in arrival order

    def ready(self) -> bool:
        """Whether claiming may go on now: the outbox idle and answering, the inbox answering."""
        outbox, inbox = self.shares.get("outbox"), self.shares.get("inbox")
        return (outbox is None or not (outbox.busy or outbox.reason())) and (inbox is None or inbox.answering)

    def _on(self, key: str, fn: Callable[[], T], what: str) -> T:
        """`fn()` on folder `key`'s lane, deadline-guarded (here, without a Share: tools, tests)."""
        share = self.shares.get(key)
        return fn() if share is None else share.call(fn, what)

    def claim_ready(
        self, watcher: InboxWatcher, budget: float, stopping: Callable[[], bool]
    ) -> tuple[int, bool]:
        """Claim settled drops in arrival order for at most `budget` seconds; returns how many
        were claimed, and whether some are left for the next turn."""
        self.backlog.extend(watcher.poll_ready())
        deadline = time.monotonic() + budget
        claimed = 0
        while self.backlog and not stopping() and self.ready():
            if time.monotonic() > deadline:
                return claimed, True
            cand = self.backlog[0]
            try:
                claim = self._claim(cand, watcher)
            except OSError as err:  # locked by another client, EIO, EACCES, ESTALE: this file alone waits
                self.backlog.popleft()
                reason = f"cannot claim or remove {cand.name}: {err.strerror or err}"
                retry_in = watcher.hold(cand.name, reason)  # offered again after its back-off, in its place
                log.warning("held", source=cand.name, reason=reason, retry_in=retry_in)
                continue
            self.backlog.popleft()
            if claim is not None:
                log.info("claimed", story=claim.name, seq=claim.seq, source=cand.name)
                self.validate(claim)
                claimed += 1
        return claimed, False

    def _claim(self, cand: Candidate, watcher: InboxWatcher) -> Claim | None:
        """One settled drop into the spool; None when there is nothing to queue."""
        dev, ino = cand.inode
        identity = Identity(cand.name, cand.size, cand.mtime_ns, inode=ino, dev=dev)
        if self.spool.already_claimed(identity):  # our claim survived a crash; the original did not go
            self._on("inbox", lambda: remove_original(cand.path), f"removing {cand.name}")
            return None
        name = self.free_name(name_of_drop(cand.name, self.settings.limits.max_name_chars))
        if cand.kind != "regular":
            self._refuse(cand.path, identity, name, cand.kind, cand.detail)
            return None
        if not self._on("inbox", cand.unchanged, f"a look at {cand.name}"):  # rewritten since it settled
            watcher.forget(cand.name)
            return None
        inbox = self.shares.get("inbox")
        return self.spool.claim(
            cand.path,
            identity,
            name,
            on_inbox=lambda fn: self._on("inbox", fn, f"claiming {cand.name}"),
            beat=inbox.beat if inbox is not None else lambda: None,
        )

    def free_name(self, base: str) -> str:
        """The first of NAME, NAME-2, NAME-3 … that no story has used: nothing is overwritten."""
        taken, outbox = self.spool.names_in_use(), self.settings.paths.outbox

        def on_share(name: str) -> bool:
            return self._on("outbox", lambda: any((outbox / p).exists() for p in outbox_entries(name)), name)

        return first_free(base, lambda name: name in taken or on_share(name))

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
                detail = f" pointing to {self._on('inbox', lambda: os.readlink(path), path.name)!r}"
        message = f"refused: {identity.source} is {what}{detail}; drop the file itself instead"
        record = self.spool.failed / f"refused-{time.time_ns()}-{name}.txt"
        record.write_text(message + "\n", "utf-8")
        self.ledger.refuse(identity, name, message, record)
        self._on("inbox", lambda: remove_original(path), f"removing {path.name}")
        log.warning("refused", story=name, source=identity.source, kind=kind)

    def validate(self, claim: Claim) -> None:
        """Bad stories fail at once, not after the queue ahead of them has run.

        Nothing here may end the process: a claim whose check cannot be done now (its input
        unreadable, the outbox full) stays queued, and whatever is left is done when it runs,
        or by the maintenance for an ending under way.
        """
        try:
            scenes = len(load_claim(claim, self.settings.limits).scenes)
        except StoryError as err:
            with contextlib.suppress(OSError):  # a pending ending: finished on a later turn
                self.ledger.fail(claim, 0, 0, problem_text(err))
            return
        except Exception as err:
            log.warning("claim not checked yet; it is when it runs", story=claim.name, error=str(err))
            return
        claim.note_scenes(scenes)
        try:
            self.ledger.move(claim, State.QUEUED, 0, scenes, source=claim.identity.source)
        except OSError as err:
            log.warning("status not written", story=claim.name, error=str(err))
