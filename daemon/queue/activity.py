"""What the daemon is doing, said in `state/current.json` and systemd's `STATUS=`.

The ledger tells it of every move of a story (`follow`); the loop, the gate and the steering
tell it the rest (idle, waiting and why, paused and by whom, the image workers, stopping). Both
outputs are written only when what they say changes, never on every loop turn, and a write
that fails never holds up the queue: they are for people.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from daemon.queue.claim import Claim
from daemon.queue.controls import pause_text
from daemon.queue.current import write_current
from daemon.queue.states import State
from daemon.system.notify import Notifier
from pipeline.settings import PathsSettings


class ViewListener(Protocol):
    """Who hears of every change of the view (the report: daemon/report/writer.py)."""

    def changed(self, view: dict[str, Any] | None = None) -> None: ...

    def flush(self) -> None: ...


class Activity:
    def __init__(self, paths: PathsSettings, notifier: Notifier, listener: ViewListener) -> None:
        self.state = paths.state
        self.notifier = notifier
        self.listener = listener
        self.view: dict[str, Any] = {"activity": "starting"}  # what current.json says
        self._shown: tuple[str, str] | None = None

    def follow(self, claim: Claim, state: State, scene: int, scenes: int, facts: dict[str, Any]) -> None:
        """A story moved: the story in progress is what current.json and STATUS= are about."""
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

    def waiting(self, reason: str, retry_in: float | None) -> None:
        """Held up by the world; `retry_in` None: not a retry, a call in flight is waited for."""
        retry = None if retry_in is None else round(retry_in, 1)
        self.view.update(activity="waiting", waiting=reason, retry_in_seconds=retry)
        self._show()

    def recovered(self) -> None:
        if self.view.get("waiting"):
            self.view.update(waiting=None, retry_in_seconds=None)
            if self.view.get("activity") == "waiting":
                self.view["activity"] = "processing" if self.view.get("story") else "idle"
            self._show()

    def workers(self, rows: list[dict[str, Any]]) -> None:
        """The image workers (ImageWorkers.describe()): shown by `storyreel status`."""
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
        self.listener.changed(self.view)
        self.listener.flush()

    def _status_text(self) -> str:
        v = self.view
        doing = f"{v['story']}: scene {v['scene']}/{v['scenes']}" if v.get("activity") == "processing" else ""
        if v.get("waiting"):  # also while the story goes on (a share not answering): said first
            return f"waiting: {v['waiting']}" + (f" ({doing})" if doing else "")
        if doing:
            return doing
        if v.get("paused"):
            where = f" after scene {v['scene']} of {v['story']}" if v.get("story") else ""
            return f"paused{where} {pause_text(v['paused'])}"
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
        self.listener.changed(self.view)
        with contextlib.suppress(OSError):  # current.json is for people; the queue never waits on it
            write_current(self.state, {k: v for k, v in self.view.items() if v is not None})
