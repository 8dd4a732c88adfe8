"""Image workers on Ray (2.60), seen from the daemon: a proxy for the Ray driver, a child process.

Imported only with `[workers] engine = "ray"` (pipeline/images/factory.py), and never imports
Ray: the driver is `python -m pipeline.images.ray_child` (why a child: its docstring), watched
by `DriverWatch` (pipeline/images/ray_watch.py), on a thread of its own. The daemon stays the
one process that watches, claims, orders, writes status and publishes; the actors only turn a
request into an image, which comes back through the driver as bytes.

    RayWorkers.__init__   1. the settings and generator factory pickled for the driver
                          2. start the watch (it starts the driver)
                          3. wait until every worker is ready, each phase said (STATUS=)

Every ticket stays here until its image is taken: when the driver ends (the head lost, Ray's
own exit after a minute without it, a crash, a kill), `wait` raises EngineUnavailable naming the
cluster (the story is `waiting`, the daemon goes on answering), the watch starts a new driver as
soon as the head answers a TCP probe again, and every open ticket is sent to it. A scene in
flight may be made twice, never lost; it is published once, because only the daemon publishes
and a key is taken once.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any

import structlog

from pipeline.errors import EngineUnavailable, ModelNotFound
from pipeline.images.ray_watch import DriverWatch, RayTicket
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
from pipeline.settings import ConfigError, Settings

log = structlog.get_logger("storyreel")

# Unconsumed tickets of stories behind the one in progress, per worker (bounds memory).
LOOKAHEAD_PER_WORKER = 2


def start_message(
    settings: Settings, make_generator: Callable[[Settings], ImageGenerator]
) -> tuple[Any, ...]:
    """Step 1: ("start", settings, factory, threads). The factory goes by value (cloudpickle, as
    Ray sends it): a test's factory that arms faults in the actors is a closure."""
    import cloudpickle
    import torch

    dump = cloudpickle.dumps
    return ("start", dump(settings), dump(make_generator), torch.get_num_threads())


class RayWorkers(ImageWorkers):
    def __init__(
        self,
        settings: Settings,
        make_generator: Callable[[Settings], ImageGenerator],
        phase: Callable[[str], None] = lambda _: None,
        lookahead: Lookahead | None = None,
        wake: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """`lookahead`: where idle workers find the scenes of the stories queued behind.
        `wake`: called from the watch's thread when the workers are back after a loss.
        `stopping`: a stop was asked for: start-up gives up (EngineUnavailable) within a second,
        not after every model has loaded."""
        self.settings = settings
        self.lookahead = lookahead
        self.watch = DriverWatch(settings, start_message(settings, make_generator), wake)
        self.watch.start()
        try:
            self._wait_ready(phase, stopping)
        except BaseException:
            self.watch.close()
            raise

    @property
    def size(self) -> int:  # type: ignore[override]
        return max(1, len(self.watch.rows))

    def _wait_ready(self, phase: Callable[[str], None], stopping: Callable[[], bool]) -> None:
        """Step 3, on the daemon's thread (phases go to systemd from here): ready, or the error."""
        watch = self.watch
        while True:
            with watch.lock:
                watch.lock.wait_for(lambda: watch.phases or watch.state != "starting", timeout=1.0)
                phases, watch.phases = watch.phases, []
                state, reason, fatal = watch.state, watch.reason, watch.fatal
            for text in phases:
                phase(text)
            if fatal is not None:
                err = pickle.loads(fatal)
                if isinstance(err, ModelNotFound | ConfigError):
                    raise err
                raise EngineUnavailable(f"a Ray worker did not start: {err}")
            if state == "waiting":
                raise EngineUnavailable(reason)
            if stopping() and state == "starting":
                raise EngineUnavailable("stopping while the Ray workers start")
            if state == "ready":
                log.info(
                    "ray workers ready",
                    workers=watch.rows,
                    address=self.settings.workers.address or "private",
                )
                return

    # -- the seam ----------------------------------------------------------------------------------
    def submit(self, key: SceneKey, request: ImageRequest) -> Ticket:
        """Kept until taken; sent to the driver now, or to the next one when it is ready."""
        watch = self.watch
        with watch.lock:
            ticket = watch.tickets.get(key)
            if ticket is None:
                ticket = watch.tickets[key] = RayTicket(key, request)
            elif not ticket.withdrawn:
                return ticket
            ticket.withdrawn = False
            watch.send_ticket(ticket)
            return ticket

    def wait(
        self, ticket: Ticket, timeout: float, on_step: StepCallback | None = None
    ) -> GeneratedImage | None:
        """The image, None after `timeout`, or EngineUnavailable while the cluster is lost (the
        ticket stays: the story that waits submits the same key again and adopts it)."""
        assert isinstance(ticket, RayTicket), ticket
        self._top_up()
        watch = self.watch
        with watch.lock:
            watch.lock.wait_for(lambda: ticket.answer is not None or watch.state != "ready", timeout)
            if ticket.answer is None:
                if watch.state != "ready":
                    raise EngineUnavailable(watch.reason)
                return None
            watch.tickets.pop(ticket.key, None)
        kind, data = ticket.answer
        ticket.answer = None
        if kind == "error":
            raise pickle.loads(data)
        image: GeneratedImage = pickle.loads(data)
        return image

    def _top_up(self) -> None:
        """Fill idle capacity with the scenes of the stories queued behind (daemon's thread only)."""
        if self.lookahead is None or self.watch.state != "ready":
            return
        limit = LOOKAHEAD_PER_WORKER * self.size
        for key, request in self.lookahead():
            with self.watch.lock:
                if len(self.watch.tickets) >= limit + self._pending_of_head():
                    return
            self.submit(key, request)

    def _pending_of_head(self) -> int:
        """Tickets of the story in progress (the lowest claim order): they do not count against
        the lookahead's bound, which is about stories behind it."""
        tickets = self.watch.tickets
        if not tickets:
            return 0
        head = min(k.order for k in tickets)
        return sum(k.order == head for k in tickets)

    def withdraw(self) -> None:
        watch = self.watch
        with watch.lock:
            for ticket in watch.tickets.values():
                ticket.withdrawn = ticket.answer is None
            watch.send("withdraw")

    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        watch = self.watch
        with watch.lock:
            for key in [k for k in watch.tickets if not alive(k)]:
                del watch.tickets[key]
                watch.send("drop", key)

    def describe(self) -> list[dict[str, Any]]:
        watch = self.watch
        with watch.lock:
            lost = watch.state != "ready"
            return [dict(row, state="lost") if lost else dict(row) for row in watch.rows]

    def back(self) -> bool:
        return self.watch.take_back()

    def model(self) -> dict[str, Any]:
        return dict(self.watch.model)

    def close(self) -> None:
        self.watch.close()
