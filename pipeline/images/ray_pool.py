"""Image workers on Ray (2.60): one actor per worker, each holding a warm generator.

Imported only with `[workers] engine = "ray"` (pipeline/images/factory.py). The daemon stays the
one process that watches, claims, orders, writes status and publishes; the actors only turn a
`SceneRequest` into a `GeneratedImage`, which comes back through Ray (the PIL image pickled),
so a worker box needs the package and the weights, never the share.

    RayWorkers.__init__   1-3. connect, count, one warm actor each (pipeline/images/ray_start.py)
                          4. start the dispatcher thread (pipeline/images/ray_dispatch.py)

This side runs on the daemon's thread only: what may run (submit, the lookahead, withdraw,
retain); the dispatcher decides when.

Untested here (no GPU, one machine): actors with `gpus_per_worker > 0` on CUDA, the deadline
kill, a GpuFatalError in an actor, the loss of a cluster's head, and joining a real cluster.
tests/test_ray.py covers CPU actors on a private instance: spread, order, a killed worker, the
poison rule, byte-identical PNGs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import structlog

from pipeline.errors import EngineUnavailable
from pipeline.images.ray_dispatch import Book, Dispatcher, RayTicket, Slot
from pipeline.images.ray_signals import shutdown_keeping_signals
from pipeline.images.ray_start import connect, count_workers, start_actors, wait_ready
from pipeline.images.seam import (
    GeneratedImage,
    ImageGenerator,
    ImageRequest,
    ImageWorkers,
    Lookahead,
    SceneKey,
    StepCallback,
    Ticket,
)
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

# Unconsumed tickets of stories behind the one in progress, per worker (bounds memory).
LOOKAHEAD_PER_WORKER = 2


class RayWorkers(ImageWorkers):
    def __init__(
        self,
        settings: Settings,
        make_generator: Callable[[Settings], ImageGenerator],
        phase: Callable[[str], None] = lambda _: None,
        lookahead: Lookahead | None = None,
    ) -> None:
        """`lookahead`: where idle workers find the scenes of the stories queued behind."""
        self.settings = settings
        self.make_generator = make_generator
        self.phase = phase
        self.lookahead = lookahead
        self.book = Book()
        self.dispatcher: Dispatcher | None = None
        self._start()

    # -- start-up ----------------------------------------------------------------------------------
    def _start(self) -> None:
        ray = self.ray = connect(self.settings, self.phase)
        try:
            self._start_workers(ray)
        except BaseException:
            # Let go of the instance (or the connection), so that the next try can ray.init again.
            with contextlib.suppress(Exception):
                shutdown_keeping_signals(ray)
            raise

    def _start_workers(self, ray: Any) -> None:
        self.size = count = count_workers(ray, self.settings)
        self.phase(f"loading model on {count} Ray workers")
        actors = start_actors(ray, self.settings, self.make_generator, count)
        self.book.slots = [Slot(i, actor) for i, actor in enumerate(actors)]
        for slot in self.book.slots:
            slot.facts = wait_ready(ray, slot.actor, slot.index, count, self.phase)
            slot.up = True
        self._model = self.book.slots[0].facts.get("model", {})
        log.info(
            "ray workers ready",
            workers=[{**s.identity(), "pid": s.facts.get("pid")} for s in self.book.slots],
            address=self.settings.workers.address or "private",
        )
        self.dispatcher = Dispatcher(ray, self.book, self.settings)
        self.dispatcher.thread.start()

    def _restart(self) -> None:
        """After the cluster was lost: connect and start the workers again, or raise EngineUnavailable."""
        was = self.book.broken
        log.info("ray engine: starting again", was=was)
        with contextlib.suppress(Exception):
            shutdown_keeping_signals(self.ray)
        self.book = Book()
        try:
            self._start()
        except EngineUnavailable as err:
            self.book.broken = str(err)
            raise

    # -- the seam ----------------------------------------------------------------------------------
    def submit(self, key: SceneKey, request: ImageRequest) -> Ticket:
        if self.book.broken:
            self._restart()
        with self.book.lock:
            return self._offer(key, request)

    def _offer(self, key: SceneKey, request: ImageRequest) -> RayTicket:
        """A new ticket, or the one already there (withdrawn ones become pending again). Under the lock."""
        book = self.book
        ticket = book.tickets.get(key)
        if ticket is None:
            ticket = book.tickets[key] = RayTicket(key, request)
        elif not ticket.withdrawn:
            return ticket
        ticket.withdrawn = False
        book.pending.append(ticket)
        book.lock.notify_all()
        return ticket

    def wait(
        self, ticket: Ticket, timeout: float, on_step: StepCallback | None = None
    ) -> GeneratedImage | None:
        assert isinstance(ticket, RayTicket), ticket
        self._top_up()
        if not ticket.done.wait(timeout):
            if self.book.broken:
                raise EngineUnavailable(self.book.broken)
            return None
        with self.book.lock:
            self.book.tickets.pop(ticket.key, None)
        if ticket.error is not None:
            raise ticket.error
        image, ticket.image = ticket.image, None
        assert image is not None
        return image

    def _top_up(self) -> None:
        """Fill idle capacity with the scenes of the stories queued behind (daemon's thread only)."""
        if self.lookahead is None or self.book.broken:
            return
        limit = LOOKAHEAD_PER_WORKER * self.size
        for key, request in self.lookahead():
            with self.book.lock:
                if len(self.book.tickets) >= limit + len(self._pending_of_head()):
                    return
                self._offer(key, request)

    def _pending_of_head(self) -> list[RayTicket]:
        """Tickets of the story in progress (the lowest claim order): they do not count against
        the lookahead's bound, which is about stories behind it."""
        tickets = self.book.tickets
        if not tickets:
            return []
        head = min(k.order for k in tickets)
        return [t for k, t in tickets.items() if k.order == head]

    def withdraw(self) -> None:
        with self.book.lock:
            for ticket in self.book.pending:
                ticket.withdrawn = True
            self.book.pending.clear()

    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        book = self.book
        with book.lock:
            for key in [k for k in book.tickets if not alive(k)]:
                book.tickets.pop(key).dropped = True
            book.pending = [t for t in book.pending if not t.dropped]

    def describe(self) -> list[dict[str, Any]]:
        book = self.book
        with book.lock:
            rows = []
            for s in book.slots:
                key = s.ticket.key if s.ticket is not None else None
                state = "busy" if key else ("idle" if s.up else "restarting" if s.deaths else "starting")
                rows.append(
                    {
                        **s.identity(),
                        "pid": s.facts.get("pid"),
                        "state": "lost" if book.broken else state,
                        "claim": key.claim if key else None,
                        "scene": key.scene if key else None,
                        "images": s.images,
                        "last_error": s.last_error,
                    }
                )
            return rows

    def model(self) -> dict[str, Any]:
        return dict(self._model)

    def deadline(self) -> float:
        """How long one scene may take before its worker is taken for lost (the dispatcher's rule)."""
        assert self.dispatcher is not None
        return self.dispatcher.deadline()

    def close(self) -> None:
        with self.book.lock:
            self.book.closed = True
            self.book.lock.notify_all()
        if self.dispatcher is not None:
            self.dispatcher.thread.join(timeout=10)
        with contextlib.suppress(Exception):
            shutdown_keeping_signals(self.ray)
