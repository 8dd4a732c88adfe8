"""The daemon's own queue on local disk, Maildir-style.

    state/spool/tmp/<seq>/     a claim being copied in (never acted on; cleared at start)
    state/spool/tmp/<seq>.removing/  a finished claim on its way out (removed at start)
    state/spool/queue/<seq>/   a claimed story (daemon/queue/claim.py says what its folder holds)
    state/failed/<seq>-NAME.json     the original bytes of every input that failed (.zip: a bundle's)
    state/cancelled/<seq>-NAME.json  ... and of every story that was cancelled
    state/history.jsonl        one line per finished claim (done, failed, cancelled)

The safety rule: a claim exists once its folder has been renamed from tmp/ into
queue/ (after fsync of its files), and only then is the original removed from
the inbox. A crash before the rename leaves the inbox file, which is claimed
again; a crash after it leaves a claim whose identity (name, size, mtime, inode, device)
matches the inbox file, which is then removed instead of claimed twice.
Sequence numbers are persisted before use, so they only ever grow.

The queue is read from disk once, at `open`, and then kept in memory, updated by
`claim`, `requeue` and `finish`: a loop turn never re-reads thousands of claims.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import asdict
from pathlib import Path
from typing import Any

import structlog

from daemon.queue.claim import (
    ENDING,
    UNANNOUNCED,
    Claim,
    Identity,
    IdentityKey,
    input_name,
    queue_folder,
    read_claims,
)
from daemon.queue.history import HISTORY, read_history
from daemon.system.jsonl import now_iso
from pipeline.fsutil import atomic_write_bytes, atomic_write_json, copy_durably, fsync_dir, remove_tree

log = structlog.get_logger("storyreel")

_REMOVING = ".removing"  # tmp/<seq>.removing: a finished claim on its way out


def _here(fn: Callable[[], Any]) -> Any:
    return fn()


class SpoolLocked(RuntimeError):
    """Another storyreel process owns this state folder."""


class Spool:
    def __init__(self, state: Path, inbox: Path) -> None:
        self.state = state
        self.inbox = inbox
        self.tmp = state / "spool" / "tmp"
        self.queue = queue_folder(state)
        self.failed = state / "failed"
        self.cancelled = state / "cancelled"
        self.history_path = state / HISTORY
        self._lock_fd: int | None = None
        self._seen: set[IdentityKey] = set()  # finished: in history
        self._queued: dict[IdentityKey, str] = {}  # claimed, not finished: key -> name
        self._claims: dict[int, Claim] = {}  # seq -> claim, in sequence order
        self._names: dict[str, Claim] = {}  # name -> queued claim
        self._ended: dict[str, dict[str, Any]] = {}  # name -> its last history line
        self._ended_seqs: set[int] = set()
        self._endings: dict[int, Claim] = {}  # claims whose ending is under way
        self._max_seq = 0

    # -- lifecycle -------------------------------------------------------------
    def open(self) -> None:
        for folder in (self.tmp, self.queue, self.failed, self.cancelled):
            folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"another storyreel process is using {self.state}") from None
        self._lock_fd = fd
        for leftover in sorted(self.tmp.iterdir()):
            if leftover.name.endswith(_REMOVING):
                remove_tree(leftover)
            else:
                self._recover_stage(leftover)
        for line in read_history(self.history_path):
            self._note_ended(line)
        for claim in read_claims(self.queue):
            if claim.seq in self._ended_seqs and claim.ending is None:
                # History has its ending, and its folder is still here without ending.json: a
                # removal interrupted by a crash (before removal became one rename). Finish it.
                log.warning("removing the rest of an ended claim", seq=claim.seq, story=claim.name)
                self._drop_folder(claim.folder)
                continue
            self._add(claim)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _recover_stage(self, stage: Path) -> None:
        """A claim a crash interrupted: finish it if the file had already been renamed in.

        A stage made for a retry is always rolled back: its request is still pending
        (it is removed only once the claim exists), so the retry is simply made again.
        """
        try:
            meta = json.loads((stage / "claim.json").read_text("utf-8"))
            identity = Identity(**meta["identity"])
            copied = (stage / input_name(identity)).stat().st_size == identity.size
            has_input = copied and not meta.get("request")
        except (OSError, ValueError, KeyError, TypeError):
            has_input = False
        if has_input and not (self.inbox / identity.source).exists():
            os.rename(stage, self.queue / stage.name)
            fsync_dir(self.queue)
        else:  # the inbox still holds the original: it will simply be claimed again
            remove_tree(stage)

    def _add(self, claim: Claim) -> None:
        self._claims[claim.seq] = claim
        self._names[claim.name] = claim
        self._queued[claim.identity.key()] = claim.name
        self._max_seq = max(self._max_seq, claim.seq)
        if claim.ending is not None:
            self._endings[claim.seq] = claim

    def _note_ended(self, line: dict[str, Any]) -> None:
        if "identity" in line:
            self._seen.add(Identity(**line["identity"]).key())
        if "story" in line:
            self._ended[line["story"]] = line
        if isinstance(line.get("seq"), int):
            self._ended_seqs.add(line["seq"])

    # -- sequence numbers ------------------------------------------------------
    def _next_seq(self) -> int:
        path = self.state / "seq"
        try:
            last = int(path.read_text().strip() or 0)
        except FileNotFoundError:
            last = 0
        last = max(last, self._max_seq)
        atomic_write_bytes(path, f"{last + 1}\n".encode())
        self._max_seq = last + 1
        return last + 1

    # -- claims ----------------------------------------------------------------
    def claims(self) -> list[Claim]:
        """Queued claims in sequence order: from memory in the process that opened the spool
        (see the module docstring), else read from disk."""
        if self._lock_fd is None:
            return read_claims(self.queue)
        return list(self._claims.values())

    def head(self) -> Claim | None:
        """The claim that runs next: the oldest."""
        return next(iter(self._claims.values()), None)

    def __len__(self) -> int:
        return len(self._claims)

    def endings(self) -> list[Claim]:
        """Claims whose ending is under way, oldest first: finished before anything else starts."""
        return sorted(self._endings.values(), key=lambda c: c.seq) if self._endings else []

    def queued(self, name: str) -> Claim | None:
        return self._names.get(name)

    def live(self, seq: int) -> bool:
        """Claim `seq` is queued and no ending is under way: its scenes may still be wanted."""
        claim = self._claims.get(seq)
        return claim is not None and claim.ending is None

    def last_ended(self, name: str) -> dict[str, Any] | None:
        """The history line of NAME's last ending, if it ever ended."""
        return self._ended.get(name)

    def already_claimed(self, identity: Identity) -> bool:
        return any(key in self._seen or key in self._queued for key in identity.match_keys())

    def names_in_use(self) -> AbstractSet[str]:
        return self._names.keys()

    def claim(
        self,
        path: Path,
        identity: Identity,
        name: str,
        on_inbox: Callable[[Callable[[], Any]], Any] = _here,
        beat: Callable[[], None] = lambda: None,
    ) -> Claim:
        """Move one inbox file into the queue (see the module docstring for the rule). `on_inbox`
        runs each call on the inbox (its read, its removal): on the inbox's lane, in the daemon,
        where `beat` says a long copy is getting on."""
        seq = self._next_seq()
        stage = self.tmp / f"{seq:08d}"
        stage.mkdir()
        claimed = now_iso()
        meta = {"seq": seq, "name": name, "identity": asdict(identity), "claimed": claimed}
        atomic_write_json(stage / "claim.json", meta)
        (stage / UNANNOUNCED).touch()  # made durable by _move_in's fsync of the stage folder
        moved = bool(on_inbox(lambda: _move_in(path, stage / input_name(identity), identity, beat)))
        final = self.queue / stage.name
        os.rename(stage, final)
        fsync_dir(self.queue)
        claim = Claim(seq, name, identity, claimed, final)
        self._add(claim)
        if not moved:
            on_inbox(lambda: remove_original(path))
        return claim

    def requeue(self, ended: dict[str, Any], request: str) -> Claim:
        """A failed or cancelled story back in the queue, at its end, under the same name.

        The kept input is copied, not moved: the earlier ending's `input_kept` stays true.
        `request` is recorded in the claim, so a request found again after a crash
        (before it could be removed) is recognised as already done.
        """
        seq = self._next_seq()
        stage = self.tmp / f"{seq:08d}"
        stage.mkdir()
        claimed = now_iso()
        identity = Identity(**ended["identity"])
        name = ended["story"]
        meta = {
            "seq": seq,
            "name": name,
            "identity": asdict(identity),
            "claimed": claimed,
            "request": request,
            "retry_of": ended.get("seq"),
        }
        atomic_write_json(stage / "claim.json", meta)
        (stage / UNANNOUNCED).touch()
        copy_durably(Path(ended["kept"]), stage / input_name(identity))
        fsync_dir(stage)
        final = self.queue / stage.name
        os.rename(stage, final)
        fsync_dir(self.queue)
        claim = Claim(seq, name, identity, claimed, final, request=request)
        self._add(claim)
        return claim

    # -- endings: each step can be repeated after a crash at any point -------------
    def begin_ending(self, claim: Claim, ending: dict[str, Any]) -> None:
        """Step 1: the intent. From here on the claim is only ever finished, never run again."""
        atomic_write_json(claim.folder / ENDING, ending)
        claim.ending = ending
        self._endings[claim.seq] = claim

    def keep_input(self, claim: Claim, folder: Path) -> Path:
        """Step 2 for failed and cancelled: the original bytes aside. Repeatable: a second
        call finds the input gone and the kept file in place. A bundle keeps its suffix: the
        kept file is the ZIP as it arrived, ready to be dropped again."""
        dest = folder / f"{claim.tag}-{claim.name}{claim.input.suffix}"
        with contextlib.suppress(FileNotFoundError):
            os.replace(claim.input, dest)
            fsync_dir(folder)
        return dest

    def finish(self, claim: Claim, state: str, **extra: Any) -> bool:
        """Record the outcome in history (once per claim), then drop the claim folder.
        True if this call wrote the history line (False: a crash came after it, before)."""
        recorded = claim.seq not in self._ended_seqs
        if recorded:
            self.remember(claim.identity, claim.name, state, seq=claim.seq, **extra)
        self._drop_folder(claim.folder)
        self._claims.pop(claim.seq, None)
        self._endings.pop(claim.seq, None)
        if self._names.get(claim.name) is claim:
            del self._names[claim.name]
        self._queued.pop(claim.identity.key(), None)
        return recorded

    def _drop_folder(self, folder: Path) -> None:
        """Remove a claim folder in one step, by rename out of queue/; a crash can leave it
        whole or gone, never half removed (a claim without its input, run again)."""
        gone = self.tmp / f"{folder.name}{_REMOVING}"
        remove_tree(gone)  # a leftover of the same name would make the rename fail
        with contextlib.suppress(FileNotFoundError):  # a repeat after a crash: already renamed
            os.rename(folder, gone)
            fsync_dir(self.queue)
        remove_tree(gone)

    def remember(self, identity: Identity, name: str, state: str, **extra: Any) -> None:
        """Append to history: the file with this identity is dealt with and never claimed again."""
        line = {"time": now_iso(), "story": name, "state": state, "identity": asdict(identity), **extra}
        with open(self.history_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._note_ended(line)


def open_story_file(path: Path) -> int:
    """Open without following links and without blocking on FIFOs; only regular files pass."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise IsADirectoryError(errno.EINVAL, "not a regular file", str(path))
    return fd


def _move_in(src: Path, dst: Path, identity: Identity, beat: Callable[[], None] = lambda: None) -> bool:
    """Rename when inbox and state share a filesystem, else copy durably. True if renamed."""
    try:
        os.rename(src, dst)
        fsync_dir(dst.parent)
        return True
    except FileNotFoundError:
        # NFS may answer ENOENT to a rename that did happen (a retried RPC).
        if dst.exists() and dst.stat().st_size == identity.size:
            return True
        raise
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
    fd = open_story_file(src)
    with os.fdopen(fd, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
            beat()
        fout.flush()
        os.fsync(fout.fileno())
    fsync_dir(dst.parent)
    return False


def remove_original(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def read_limited(path: Path, limit: int) -> bytes:
    """At most limit+1 bytes: enough to tell 'too large' without reading a huge file whole."""
    with open(path, "rb") as fh:
        return fh.read(limit + 1)
