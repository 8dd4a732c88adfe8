"""One claimed story and its folder in the spool, state/spool/queue/<seq>/:

    claim.json     who it is: seq, name, the inbox file's identity, when claimed (written once)
    input.json     the story's bytes as they arrived (input.zip: a bundle's, the ZIP itself)
    attempts.json  how tries of it ended (the poison rule, daemon/run/poison.py)
    work/          what is made of it (pipeline/render/job.py lays it out)
    unannounced    until its "queued" status line is written
    paused         while its last status line says "paused"
    scenes         its scene count, once validated (a cache for status)
    ending.json    once it is ending: the intent, finished after a crash (daemon/queue/ledger.py)

The markers are facts kept here, on local disk, not read back from the share.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.fsutil import atomic_write_json
from pipeline.names import story_kind

UNANNOUNCED = "unannounced"
PAUSED = "paused"
SCENES = "scenes"
ENDING = "ending.json"
ATTEMPTS = "attempts.json"

IdentityKey = tuple[str, int, int, int, int | None]


@dataclass(frozen=True)
class Identity:
    """What makes an inbox file the same file after a restart.

    `dev` (st_dev) tells apart two files with the same inode number on two
    filesystems. Records written before it was kept have none (None): such a
    record matches a file on any device, as it did when it was written. The
    price: a share remounted with a new st_dev across a crash between claim and
    removing the original gets that file claimed a second time (NAME-2), not lost.
    """

    source: str
    size: int
    mtime_ns: int
    inode: int
    dev: int | None = None

    def key(self) -> IdentityKey:
        return (self.source, self.size, self.mtime_ns, self.inode, self.dev)

    def match_keys(self) -> tuple[IdentityKey, IdentityKey]:
        """The keys a record of this file may have been stored under: with its device, or without."""
        return self.key(), (self.source, self.size, self.mtime_ns, self.inode, None)


@dataclass
class Attempts:
    """How often making one story ended with the process dead, by what we can tell of the cause.

    `running` is set when a try begins and cleared when it ends in any orderly way, so a
    try found still `running` at the next start died. If the fault log grew meanwhile, a
    fatal signal (segfault, abort) was recorded: a crash. Otherwise nothing could be
    recorded (SIGKILL, power cut, the OOM killer): unexplained. A finished scene is
    progress and clears both counts: only deaths in a row without progress add up.
    """

    crashes: int = 0
    unexplained: int = 0
    running: bool = False
    fault_mark: int = 0


@dataclass
class Claim:
    seq: int
    name: str
    identity: Identity
    claimed: str
    folder: Path
    scenes: int | None = None  # known once validated
    ending: dict[str, Any] | None = None  # the ending under way (ending.json), if any
    paused: bool = False  # its last status line says "paused"
    request: str | None = None  # the retry request this claim was made for

    @property
    def bundle(self) -> bool:
        """Dropped as NAME.zip: its input is the ZIP, its story the story.json inside."""
        return is_bundle(self.identity)

    @property
    def input(self) -> Path:
        return self.folder / input_name(self.identity)

    @property
    def work(self) -> Path:
        return self.folder / "work"

    @property
    def tag(self) -> str:
        return f"{self.seq:08d}"

    # -- the "queued" status line: owed until written ------------------------------
    def announced(self) -> bool:
        """Whether the claim's "queued" status line was written. Claims made before this
        marker existed count as announced: they were, unless that write failed."""
        return not (self.folder / UNANNOUNCED).exists()

    def mark_announced(self) -> None:
        (self.folder / UNANNOUNCED).unlink(missing_ok=True)

    # -- facts that status lines report ----------------------------------------------
    def mark_paused(self, paused: bool) -> None:
        """Whether its last status line says "paused": so the line is written once per pause."""
        if paused and not self.paused:
            (self.folder / PAUSED).touch()
        elif not paused and self.paused:
            (self.folder / PAUSED).unlink(missing_ok=True)
        self.paused = paused

    def note_scenes(self, scenes: int) -> None:
        """A cache for `storyreel status` (estimated starts): not fsynced, re-learnt if lost."""
        self.scenes = scenes
        with contextlib.suppress(OSError):
            (self.folder / SCENES).write_text(f"{scenes}\n")

    # -- attempts: tries of the story that ended with the process dead ---------------
    def attempts(self) -> Attempts:
        try:
            return Attempts(**json.loads((self.folder / ATTEMPTS).read_text("utf-8")))
        except (OSError, ValueError, TypeError):
            return Attempts()

    def save_attempts(self, attempts: Attempts) -> None:
        atomic_write_json(self.folder / ATTEMPTS, asdict(attempts))


def is_bundle(identity: Identity) -> bool:
    return story_kind(identity.source) == "bundle"


def input_name(identity: Identity) -> str:
    """What a claim's input is called in its folder: input.json, or input.zip for a bundle."""
    return "input.zip" if is_bundle(identity) else "input.json"


def queue_folder(state: Path) -> Path:
    """Where the claims are: state/spool/queue/."""
    return state / "spool" / "queue"


def read_claim(folder: Path) -> Claim | None:
    """One claim folder as it is on disk; None for one that cannot be read (never acted on)."""
    try:
        meta = json.loads((folder / "claim.json").read_text("utf-8"))
        claim = Claim(meta["seq"], meta["name"], Identity(**meta["identity"]), meta["claimed"], folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    claim.request = meta.get("request")
    with contextlib.suppress(OSError, ValueError):
        claim.scenes = int((folder / SCENES).read_text().strip())
    with contextlib.suppress(OSError, ValueError):
        claim.ending = json.loads((folder / ENDING).read_text("utf-8"))
    claim.paused = (folder / PAUSED).exists()
    return claim


def read_claims(queue: Path) -> list[Claim]:
    """Every claim in queue/, in sequence order: the order stories run in."""
    try:
        folders = sorted(p for p in queue.iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return []
    return [c for c in map(read_claim, folders) if c is not None]
