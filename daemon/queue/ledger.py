"""The one place a story changes state, and where the daemon says what it is doing.

`Ledger.move(claim, state, ...)` is the transition function: it alone writes a
story's status line (`outbox/NAME.status.jsonl`) and its history line, moves what
`state/current.json` and systemd's `STATUS=` say (daemon/queue/activity.py), and tells
its listener (the report: the status page and the metrics). Everything else asks it.
Retention's `expired` line is written here too (`expired`).

An ending (done, failed, cancelled) takes several writes on two filesystems, so
it is done in an order that is safe to repeat after a crash, or a full or
vanished outbox, at any step:

    1. ending.json in the claim folder: the intent (local disk). From here on the
       claim is only ever finished, never run again.
    2. failed/cancelled: the input moved to state/failed/ or state/cancelled/
       (skipped when it is already there).
    3. the "queued" line if it is still owed, then the final status line (after a
       restart: skipped when the sidecar's last line already says it).
    4. the history line (skipped when history already has this claim).
    5. the claim folder removed. Then the [hooks] command is started.

A step that fails raises OSError and leaves the ending pending; the loop finishes
it (`finish_ending`, daemon/queue/maintenance.py) before it starts anything else,
once the world is back.

Status lines go through `StatusLines` (daemon/queue/sidecar.py): owed until the outbox takes
them, in order, so a share that stops answering never holds up a move. The claim's markers
(its "queued" line written) follow the line once it is on the share; an ending's line is
required on the share before its step 4 (a line that is only owed keeps the ending pending).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import structlog

from daemon.queue.activity import Activity, ViewListener
from daemon.queue.claim import Claim, Identity
from daemon.queue.sidecar import StatusLines, expire_line
from daemon.queue.spool import Spool
from daemon.queue.states import State
from daemon.system.hooks import Hooks
from daemon.system.notify import Notifier
from pipeline.settings import PathsSettings

log = structlog.get_logger("storyreel")


class Listener(ViewListener, Protocol):
    """Who hears of every change (the report: daemon/report/writer.py): it only takes note."""

    def story_ended(self, state: State, scenes: int) -> None: ...

    def scene_done(self, record: Mapping[str, Any]) -> None: ...


class Unheard:
    """A listener for a ledger nobody reports on (tests, tools)."""

    def changed(self, view: dict[str, Any] | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def story_ended(self, state: State, scenes: int) -> None:
        pass

    def scene_done(self, record: Mapping[str, Any]) -> None:
        pass


class Ledger:
    def __init__(
        self,
        paths: PathsSettings,
        spool: Spool,
        notifier: Notifier,
        hooks: Hooks,
        listener: Listener | None = None,
        lines: StatusLines | None = None,
    ) -> None:
        """`lines`: the outbox's status lines (written on the caller's thread when none is given)."""
        self.outbox = paths.outbox
        self.lines = lines if lines is not None else StatusLines(paths.outbox)  # (empty is falsy)
        self.spool = spool
        self.hooks = hooks
        self.listener: Listener = listener or Unheard()
        self.activity = Activity(paths, notifier, self.listener)
        self._begun: set[int] = set()  # endings begun by this process (else: found after a restart)
        self._ending_said: set[int] = set()  # endings whose line this process has said (owed or written)

    # -- stories ---------------------------------------------------------------------
    def move(self, claim: Claim, state: State, scene: int = 0, scenes: int = 0, **facts: Any) -> None:
        """Record that `claim` is now in `state`. Raises OSError when it cannot be written;
        an ending that got past its first step is then pending (see the module docstring)."""
        if state.ended:
            if claim.ending is None:
                record = facts.pop("record", {})
                ending = {"state": state.value, "scene": scene, "scenes": scenes, "facts": facts}
                self.spool.begin_ending(claim, {**ending, "record": record})
                self._begun.add(claim.seq)
            self.finish_ending(claim)
            return
        if state is not State.QUEUED or claim.announced() or self.lines.owes(_announcement(claim)):
            self._announce(claim)
            self.lines.say(claim.name, state, scene, scenes, seq=claim.seq, **facts)
        else:  # a "queued" line is the claim's announcement while that is owed
            self._say_announcement(claim, scene, scenes, **facts)
        claim.mark_paused(state is State.PAUSED)
        self.activity.follow(claim, state, scene, scenes, facts)
        self.listener.changed(self.activity.view)

    def fail(self, claim: Claim, scene: int, scenes: int, message: str) -> None:
        """End the story `failed`, its fault; raises OSError while the ending is pending."""
        log.warning("story failed", story=claim.name, seq=claim.seq, error=message)
        self.move(claim, State.FAILED, scene, scenes, error=message)

    def announce(self, claim: Claim) -> None:
        """Write the claim's "queued" line if it is still owed (its write failed at claim)."""
        self._announce(claim)

    def _announce(self, claim: Claim) -> None:
        if not claim.announced() and not self.lines.owes(_announcement(claim)):
            self._say_announcement(claim, 0, claim.scenes or 0, source=claim.identity.source)

    def _say_announcement(self, claim: Claim, scene: int, scenes: int, **facts: Any) -> None:
        key = _announcement(claim)
        self.lines.say(
            claim.name,
            State.QUEUED,
            scene,
            scenes,
            key=key,
            on_written=claim.mark_announced,
            seq=claim.seq,
            **facts,
        )

    def finish_ending(self, claim: Claim) -> None:
        """Steps 2-5 of an ending begun with `move`; each is skipped when already done."""
        ending = claim.ending
        assert ending is not None, claim
        state = State(ending["state"])
        facts = dict(ending.get("facts", {}))
        record = dict(ending.get("record", {}))
        if state in (State.FAILED, State.CANCELLED):
            kept = self.spool.keep_input(
                claim, self.spool.failed if state is State.FAILED else self.spool.cancelled
            )
            facts["input_kept"] = record["kept"] = str(kept)
        said = [] if claim.seq in self._begun else self._said(claim)
        if State.QUEUED in said:
            claim.mark_announced()  # the crash came between its line and its marker
        self._announce(claim)
        scene, scenes = int(ending.get("scene", 0)), int(ending.get("scenes", 0))
        key = ("ending", claim.seq)
        if said[-1:] != [state] and claim.seq not in self._ending_said:  # said once: owed, or on the share
            self.lines.say(claim.name, state, scene, scenes, key=key, seq=claim.seq, **facts)
            self._ending_said.add(claim.seq)
        self.lines.require(key)  # on the share, or the ending stays pending (raises OSError)
        history = {k: v for k, v in facts.items() if k != "input_kept"}
        if self.spool.finish(claim, state.value, **{**history, **record}):
            self.listener.story_ended(state, len((facts.get("outputs") or {}).get("images") or []))
        self._begun.discard(claim.seq)
        self._ending_said.discard(claim.seq)
        self.activity.follow(claim, state, scene, scenes, facts)
        self.listener.changed(self.activity.view)
        log.info("story ended", story=claim.name, seq=claim.seq, state=state.value, error=facts.get("error"))
        self.hooks.ended(state, self._hook_facts(claim.name, state, facts))

    def _said(self, claim: Claim) -> list[State]:
        """After a restart only: the states this claim's lines already say, so that a line
        written just before the crash is not written twice. (The only read of the share.)"""
        said = []
        for line in self.lines.read(claim.name):
            with contextlib.suppress(ValueError):
                if line.get("seq") == claim.seq:
                    said.append(State(str(line.get("state"))))
        return said

    def _hook_facts(self, name: str, state: State, facts: dict[str, Any]) -> dict[str, str]:
        outputs = facts.get("outputs") or {}

        def under(rel: str | None) -> str:
            return str(self.outbox / rel) if rel else ""

        return {
            "STORYREEL_NAME": name,
            "STORYREEL_STATE": state.value,
            "STORYREEL_ZIP": under(outputs.get("zip")),
            "STORYREEL_MANIFEST": under(outputs.get("manifest")),
            "STORYREEL_FOLDER": under(outputs.get("folder")),
            "STORYREEL_ERROR": str(facts.get("error") or ""),
            "STORYREEL_INPUT_KEPT": str(facts.get("input_kept") or ""),
            "STORYREEL_OUTBOX": str(self.outbox),
        }

    def refuse(self, identity: Identity, name: str, message: str, record: Path) -> None:
        """A file that never became a claim (a symlink, a FIFO): failed unread, with the reason."""
        self.lines.say(name, State.FAILED, 0, 0, error=message)
        self.spool.remember(identity, name, State.FAILED.value, error=message, kept=str(record), refused=True)
        self.listener.story_ended(State.FAILED, 0)
        self.hooks.ended(State.FAILED, self._hook_facts(name, State.FAILED, {"error": message}))

    def expired(self, name: str, reason: str) -> None:
        """Retention is about to remove NAME's outputs (daemon/queue/retention.py): its sidecar's last
        line says so first. Skipped when it already does (the removal is being repeated after a
        crash). Raises OSError when the line cannot be written: then nothing is removed. Written
        where it is called: retention runs on the outbox's lane (daemon/queue/maintenance.py)."""
        expire_line(self.outbox, name, reason)

    def settle(self) -> None:
        """Each turn: owed status lines on their way, their markers set (daemon/queue/sidecar.py)."""
        self.lines.settle()

    def scene_finished(self, claim: Claim, record: dict[str, Any]) -> None:
        """A scene of the story in progress is made (its record): the page's thumbnails, the metrics."""
        self.listener.scene_done(record)


def _announcement(claim: Claim) -> tuple[str, int]:
    """The key of a claim's first "queued" line (its marker is cleared once that is on the share)."""
    return ("announced", claim.seq)
