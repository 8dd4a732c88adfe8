"""The Ray engine's dispatcher: the thread that hands scenes to idle actors and collects images.

A thread, not something driven from the daemon's waits: a worker that finishes must get its
next scene at once, also while the daemon's loop is busy elsewhere (the story's film, ZIP and
publish take seconds, in which every GPU would otherwise idle). What may run is decided on the
daemon's thread only (pipeline/images/ray_pool.py: submit, the lookahead, withdraw, retain);
this thread only decides when: an idle worker takes the first pending ticket in queue order
(claim order, then scene). One scene per actor at a time, so what `describe()` says a worker is
doing is what it is doing. Both sides share a `Book`, under its one lock.

Faults (tests/test_ray.py):
- an actor that dies (killed, OOM, segfault, node lost) is restarted by Ray
  (max_restarts=-1) and its scene goes back to the front of the queue, for any idle worker;
- a scene that has killed `daemon.max_attempts` workers fails with SceneKillsWorkers;
- a scene past its deadline gets its actor killed (and restarted): that counts as a death;
- a GpuFatalError in an actor (its CUDA context poisoned) kills the actor the same way;
- losing the cluster is EngineUnavailable for every ticket: the daemon waits.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from pipeline.errors import EngineUnavailable, GpuFatalError, SceneKillsWorkers, first_line
from pipeline.images.seam import GeneratedImage, SceneKey, Ticket
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

# A derived scene deadline is never shorter than this: the first scene on a (re)started actor
# has no pace to go by, and a restart reloads the model before it can start.
DEADLINE_FLOOR_SECONDS = 600.0
DEADLINE_MARGIN = 4.0


@dataclass(eq=False)
class RayTicket(Ticket):
    """A scene handed to the Ray engine, with what the engine keeps about it."""

    done: threading.Event = field(default_factory=threading.Event)  # set with `image` or `error`
    deaths: int = 0  # workers it took down
    withdrawn: bool = False  # not to be started (a pause, a stop); pending again when submitted again
    dropped: bool = False  # its story ended: never to be started
    image: GeneratedImage | None = None
    error: BaseException | None = None


@dataclass
class Slot:
    """One worker as the daemon sees it."""

    index: int
    actor: Any
    facts: dict[str, Any] = field(default_factory=dict)  # from hello(): pid, node, device
    up: bool = False  # ready for a scene (False while starting or restarting)
    probe: Any = None  # a hello() under way after a restart
    ticket: RayTicket | None = None
    ref: Any = None
    started: float = 0.0
    killed: str | None = None  # why the daemon killed it (deadline, GPU failure)
    images: int = 0
    deaths: int = 0
    last_error: str | None = None

    @property
    def id(self) -> str:
        return f"ray-{self.index}"

    def identity(self) -> dict[str, Any]:
        facts = self.facts
        return {
            "id": self.id,
            "node": facts.get("node"),
            "ip": facts.get("ip"),
            "device": facts.get("device"),
        }


@dataclass
class Book:
    """What the pool (the daemon's thread) and the dispatcher (its own thread) share, under `lock`."""

    lock: threading.Condition = field(default_factory=threading.Condition)
    tickets: dict[SceneKey, RayTicket] = field(default_factory=dict)
    pending: list[RayTicket] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    broken: str | None = None  # the cluster is lost: why
    closed: bool = False
    seconds_per_step: float | None = None  # the recent pace, for derived deadlines


class Dispatcher:
    def __init__(self, ray: Any, book: Book, settings: Settings) -> None:
        self.ray = ray
        self.book = book
        self.settings = settings
        self.thread = threading.Thread(target=self._run, name="ray-dispatch", daemon=True)

    def _run(self) -> None:
        ray, book = self.ray, self.book
        while True:
            with book.lock:
                if book.closed or book.broken:
                    return
                self._hand_out()
                waiting = {s.ref: s for s in book.slots if s.ref is not None}
                probes = {s.probe: s for s in book.slots if s.probe is not None}
                idle = any(s.up and s.ticket is None for s in book.slots)
                if not waiting and not probes:
                    book.lock.wait(0.5)
                    continue
            try:
                # Short while a worker is idle: a new submission is handed out within this.
                ready, _ = ray.wait([*waiting, *probes], num_returns=1, timeout=0.02 if idle else 0.5)
                for ref in ready:
                    if ref in waiting:
                        self._collect(waiting[ref], ref)
                    else:
                        self._welcome_back(probes[ref], ref)
                self._enforce_deadlines()
            except Exception as err:  # the cluster or its head is gone: nothing more comes back
                self._break(f"lost the Ray cluster ({self.settings.workers.address or 'private'}): {err}")
                return

    def _hand_out(self) -> None:
        """Idle workers take the first pending tickets in queue order (under the lock)."""
        book = self.book
        for slot in book.slots:
            if not book.pending:
                return
            if slot.up and slot.ticket is None:
                ticket = min(book.pending, key=lambda t: t.key)
                book.pending.remove(ticket)
                slot.ticket, slot.started, slot.killed = ticket, time.monotonic(), None
                slot.ref = slot.actor.generate.remote(ticket.request)

    def _collect(self, slot: Slot, ref: Any) -> None:
        ray = self.ray
        ticket = slot.ticket
        assert ticket is not None
        try:
            image: GeneratedImage = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            if isinstance(cause, GpuFatalError):  # the actor's CUDA context is gone: a new process
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=False)
                self._died(slot, f"GPU failure: {cause}")
                return
            with self.book.lock:
                slot.last_error = f"{type(cause).__name__}: {cause}"
                self._finish(slot, error=cause)
            return
        except ray.exceptions.RayError as err:  # the actor died (killed, OOM, node lost) or its result
            self._died(slot, slot.killed or first_line(err))
            return
        elapsed = time.monotonic() - slot.started
        image.info["worker"] = slot.identity()
        with self.book.lock:
            slot.images += 1
            per_step = elapsed / max(1, ticket.request.steps)
            old = self.book.seconds_per_step
            self.book.seconds_per_step = per_step if old is None else 0.8 * old + 0.2 * per_step
            self._finish(slot, image=image)

    def _finish(
        self, slot: Slot, image: GeneratedImage | None = None, error: BaseException | None = None
    ) -> None:
        ticket = slot.ticket
        assert ticket is not None
        slot.ticket = slot.ref = None
        ticket.image, ticket.error = image, error
        ticket.done.set()

    def _died(self, slot: Slot, reason: str) -> None:
        """The worker process died with this scene in hand: Ray restarts it; the scene goes back
        to the front of the queue for any idle worker, unless it has killed too many already."""
        ticket = slot.ticket
        assert ticket is not None
        limit = self.settings.daemon.max_attempts
        with self.book.lock:
            ticket.deaths += 1
            slot.deaths += 1
            slot.last_error = reason
            slot.up = False
            slot.probe = slot.actor.hello.remote()  # answered once Ray has restarted it
            log.warning(
                "ray worker died",
                worker=slot.id,
                pid=slot.facts.get("pid"),
                claim=ticket.key.claim,
                scene=ticket.key.scene,
                deaths=ticket.deaths,
                reason=reason,
            )
            if ticket.deaths >= limit:
                message = (
                    f"scene {ticket.key.scene} took down its worker {ticket.deaths} times "
                    f"(last: {reason}); giving up on it"
                )
                self._finish(slot, error=SceneKillsWorkers(message))
                return
            slot.ticket = slot.ref = None
            if not ticket.dropped:
                self.book.pending.append(ticket)  # first in queue order again: the earliest scene
            self.book.lock.notify_all()

    def _welcome_back(self, slot: Slot, ref: Any) -> None:
        try:
            facts = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            with self.book.lock:
                slot.probe = slot.actor.hello.remote()  # died again while restarting: ask again
            return
        with self.book.lock:
            slot.facts.update(facts)
            slot.probe, slot.up = None, True
            log.info("ray worker back", worker=slot.id, pid=facts.get("pid"))

    def deadline(self) -> float:
        """How long one scene may take before its worker is taken for lost."""
        w = self.settings.workers
        if w.scene_timeout_seconds:
            return w.scene_timeout_seconds
        pace = self.book.seconds_per_step
        if pace is None:
            return DEADLINE_FLOOR_SECONDS
        return max(DEADLINE_FLOOR_SECONDS, DEADLINE_MARGIN * self.settings.image.steps * pace)

    def _enforce_deadlines(self) -> None:
        now, limit = time.monotonic(), self.deadline()
        for slot in self.book.slots:
            if slot.ticket is not None and slot.killed is None and now - slot.started > limit:
                slot.killed = f"scene {slot.ticket.key.scene} ran past its deadline of {limit:.0f} s"
                log.warning("ray worker past its deadline, killing it", worker=slot.id, reason=slot.killed)
                self.ray.kill(slot.actor, no_restart=False)

    def _break(self, reason: str) -> None:
        log.error("ray engine lost", reason=reason)
        with self.book.lock:
            self.book.broken = reason
            for ticket in self.book.tickets.values():
                ticket.error = EngineUnavailable(reason)
                ticket.done.set()
            self.book.lock.notify_all()
