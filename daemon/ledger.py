"""The one place a story changes state, and where the daemon says what it is doing.

`Ledger.move(claim, state, ...)` is the transition function: it alone writes a
story's status line (`outbox/NAME.status.jsonl`), its history line, the
daemon's `state/current.json` and systemd's `STATUS=`, and tells the observers
(daemon/observers.py: the status page and the metrics). Everything else asks it.
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

A step that fails raises OSError and leaves the ending pending; the worker
finishes it (`finish_ending`) before it starts anything else, once the world is
back. The steps are those of the lead's design notes for issue 11.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import structlog

from daemon.hooks import Hooks
from daemon.notify import Notifier
from daemon.observers import Observers
from daemon.spool import Claim, Identity, Spool
from daemon.states import State
from daemon.status import append_status, read_status, write_current
from pipeline.settings import PathsSettings

log = structlog.get_logger("storyreel")


class Ledger:
    def __init__(
        self,
        paths: PathsSettings,
        spool: Spool,
        notifier: Notifier,
        hooks: Hooks,
        observers: Observers | None = None,
    ) -> None:
        self.outbox = paths.outbox
        self.state = paths.state
        self.spool = spool
        self.notifier = notifier
        self.hooks = hooks
        self.observers = observers or Observers(paths.outbox, spool)
        self.view: dict[str, Any] = {"activity": "starting"}  # what current.json says
        self._shown: tuple[str, str] | None = None
        self._begun: set[int] = set()  # endings begun by this process (else: found after a restart)

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
        if state is not State.QUEUED:
            self._announce(claim)
        append_status(self.outbox, claim.name, state, scene, scenes, seq=claim.seq, **facts)
        if state is State.QUEUED:
            self.spool.mark_announced(claim)
        self.spool.mark_paused(claim, state is State.PAUSED)
        self._follow(claim, state, scene, scenes, facts)
        self.observers.changed(self.view)

    def announce(self, claim: Claim) -> None:
        """Write the claim's "queued" line if it is still owed (its write failed at claim)."""
        self._announce(claim)

    def _announce(self, claim: Claim) -> None:
        if not self.spool.announced(claim):
            append_status(
                self.outbox,
                claim.name,
                State.QUEUED,
                0,
                claim.scenes or 0,
                seq=claim.seq,
                source=claim.identity.source,
            )
            self.spool.mark_announced(claim)

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
            self.spool.mark_announced(claim)  # the crash came between its line and its marker
        self._announce(claim)
        scene, scenes = int(ending.get("scene", 0)), int(ending.get("scenes", 0))
        if said[-1:] != [state]:
            append_status(self.outbox, claim.name, state, scene, scenes, seq=claim.seq, **facts)
        history = {k: v for k, v in facts.items() if k != "input_kept"}
        if self.spool.finish(claim, state.value, **{**history, **record}):
            self.observers.story_ended(state, len((facts.get("outputs") or {}).get("images") or []))
        self._begun.discard(claim.seq)
        self._follow(claim, state, scene, scenes, facts)
        self.observers.changed(self.view)
        log.info("story ended", story=claim.name, seq=claim.seq, state=state.value, error=facts.get("error"))
        self.hooks.ended(state, self._hook_facts(claim.name, state, facts))

    def _said(self, claim: Claim) -> list[State]:
        """After a restart only: the states this claim's lines already say, so that a line
        written just before the crash is not written twice. (The only read of the share.)"""
        said = []
        for line in read_status(self.outbox, claim.name):
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
        append_status(self.outbox, name, State.FAILED, 0, 0, error=message)
        self.spool.remember(identity, name, State.FAILED.value, error=message, kept=str(record), refused=True)
        self.observers.story_ended(State.FAILED, 0)
        self.hooks.ended(State.FAILED, self._hook_facts(name, State.FAILED, {"error": message}))

    def expired(self, name: str, reason: str) -> None:
        """Retention is about to remove NAME's outputs (daemon/retention.py): its sidecar's last
        line says so first. Skipped when it already does (the removal is being repeated after a
        crash). Raises OSError when the line cannot be written: then nothing is removed."""
        last = read_status(self.outbox, name)[-1:] or [{}]
        if last[0].get("state") != State.EXPIRED:
            scene, scenes = int(last[0].get("scene") or 0), int(last[0].get("scenes") or 0)
            append_status(self.outbox, name, State.EXPIRED, scene, scenes, error=reason)
        self.observers.changed()

    def scene_finished(self, claim: Claim, record: dict[str, Any]) -> None:
        """A scene of the story in progress is made (its record): the page's thumbnails, the metrics."""
        self.observers.scene_done(record)

    # -- what the daemon is doing: current.json and STATUS= -------------------------------
    def _follow(self, claim: Claim, state: State, scene: int, scenes: int, facts: dict[str, Any]) -> None:
        """The story in progress is what current.json and STATUS= are about."""
        if state is State.PROCESSING:
            eta = facts.get("eta_seconds")
            self.view.update(
                activity="processing",
                story=claim.name,
                seq=claim.seq,
                scene=scene,
                scenes=scenes,
                eta_seconds=eta,
            )
            self.view.pop("interrupted", None)
        elif self.view.get("seq") != claim.seq:
            return
        elif state is State.QUEUED and facts.get("reason"):
            self.view["interrupted"] = f"{claim.name} (#{claim.seq}): {facts['reason']}"
            self._drop_story()
        elif state in (State.PAUSED, State.WAITING):
            self.view.update(activity=state.value, eta_seconds=None)
        else:
            self._drop_story()
        self._show()

    def _drop_story(self) -> None:
        for key in ("story", "seq", "scene", "scenes", "eta_seconds"):
            self.view.pop(key, None)
        self.view["activity"] = "paused" if self.view.get("paused") else "idle"

    def started(self) -> None:
        self.view = {"activity": "idle"}
        self._show()

    def idle(self, inbox_error: str | None, held: dict[str, str] | None = None) -> None:
        """Nothing to run (or paused): say so, once per change. `held`: inbox files that cannot
        be claimed or removed just now (locked by another client...), each retried alone."""
        self._drop_story()
        self.view.update(waiting=None, retry_in_seconds=None, inbox=inbox_error, held=held or None)
        self._show()

    def waiting(self, reason: str, retry_in: float) -> None:
        self.view.update(activity="waiting", waiting=reason, retry_in_seconds=round(retry_in, 1))
        self._show()

    def recovered(self) -> None:
        if self.view.get("waiting"):
            self.view.update(waiting=None, retry_in_seconds=None)
            if self.view.get("activity") == "waiting":
                self.view["activity"] = "processing" if self.view.get("story") else "idle"
            self._show()

    def workers(self, rows: list[dict[str, Any]]) -> None:
        """The image workers (pipeline/workers.py describe()): shown by `storyreel status`."""
        if rows != self.view.get("workers"):
            self.view["workers"] = rows
            self._show()

    def paused(self, sources: list[dict[str, str]]) -> None:
        self.view["paused"] = sources or None
        if not self.view.get("story"):
            self.view["activity"] = "paused" if sources else "idle"
        self._show()

    def stopping(self) -> None:
        story = self.view.get("story")
        self.view["activity"] = "stopping"
        self._show(f"stopping after scene {self.view.get('scene')} of {story}" if story else "stopping")

    def stopped(self) -> None:
        """The last word at exit: current.json, then the page and the metrics at once."""
        self._drop_story()
        self.view.pop("workers", None)  # they stop with the daemon
        self.view["activity"] = "stopped"
        with contextlib.suppress(OSError):
            write_current(self.state, self.view)
        self.observers.changed(self.view)
        self.observers.flush()

    def _status_text(self) -> str:
        v = self.view
        if v.get("activity") == "processing":
            return f"{v['story']}: scene {v['scene']}/{v['scenes']}"
        if v.get("waiting"):
            return f"waiting: {v['waiting']}"
        if v.get("paused"):
            who = "; ".join(f"by {p['by']} since {p['since']}" for p in v["paused"])
            where = f" after scene {v['scene']} of {v['story']}" if v.get("story") else ""
            return f"paused{where} {who}"
        if v.get("inbox"):
            return f"inbox unavailable: {v['inbox']}"
        return str(v.get("activity", "idle"))

    def _show(self, text: str | None = None) -> None:
        """current.json and STATUS=, written when what they say changes (not every loop turn)."""
        text = text or self._status_text()
        shown = (repr(sorted(self.view.items())), text)
        if shown == self._shown:
            return
        self._shown = shown
        self.notifier.status(text)
        self.observers.changed(self.view)
        with contextlib.suppress(OSError):  # current.json is for people; the queue never waits on it
            write_current(self.state, {k: v for k, v in self.view.items() if v is not None})
