"""Image workers behind one narrow seam: hand a scene in, get its image back.

    submit(key, request) -> Ticket        never blocks; the same key twice is the same ticket
    wait(ticket, timeout, on_step)        the image, or None while it is not done yet
    size, describe(), model(), close()

`LocalWorkers` is today's engine: one generator in the daemon's own process. Its tickets
are made lazily, on the calling thread, when they are waited on, so denoising runs on the
worker's loop thread as it always did (the step callbacks do the daemon's housekeeping) and
the CPU pool finishes scene N while N+1 denoises. `RayWorkers` (pipeline/ray_engine.py, only
imported with `[workers] engine = "ray"`) spreads tickets over warm Ray actors.

A key names (claim, scene): a story's scenes can be handed in ahead of time, by the story
itself (render_scenes) or by the daemon for the stories queued behind it (`lookahead`); the
one that renders the story later adopts the ticket that is already there.
"""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.generate import GeneratedImage, ImageGenerator, SceneRequest
from pipeline.settings import Settings

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True, order=True)
class SceneKey:
    """One scene of one run of a story; ordered as the queue is (claim order, then scene)."""

    order: int  # the claim's sequence number: lower runs first
    claim: str  # the claim's tag (one run of one story)
    scene: int


@dataclass(eq=False)
class Ticket:
    key: SceneKey
    request: SceneRequest
    extra: dict[str, Any] = field(default_factory=dict)  # the engine's own bookkeeping


# The daemon's view of the queue behind the story in progress: (key, request) for the next
# claimed stories' unfinished scenes, in claim order; nothing while paused or stopping.
Lookahead = Callable[[], Iterable[tuple[SceneKey, SceneRequest]]]


class ImageWorkers(ABC):
    """A pool of image workers. Not thread-safe: one caller (the daemon's loop) at a time."""

    size: int

    @abstractmethod
    def submit(self, key: SceneKey, request: SceneRequest) -> Ticket:
        """Hand a scene in; a key already handed in gives back its ticket (adopted, not redone)."""

    @abstractmethod
    def wait(
        self, ticket: Ticket, timeout: float, on_step: StepCallback | None = None
    ) -> GeneratedImage | None:
        """The ticket's image once done (then the pool forgets it), else None after `timeout`
        so that the caller can send its heartbeat. Raises what making the image raised."""

    @abstractmethod
    def describe(self) -> list[dict[str, Any]]:
        """Per worker: id, node, device, state, story scene in hand, images done, last error."""

    @abstractmethod
    def model(self) -> dict[str, Any]:
        """What the generators load and how (the manifest's "model")."""

    @abstractmethod
    def set_lookahead(self, lookahead: Lookahead | None) -> None:
        """Where idle workers find more work once the story in progress has none left to start."""

    @abstractmethod
    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        """Forget the tickets of claims that ended (done, failed, cancelled): `alive` says which stay."""

    @abstractmethod
    def withdraw(self) -> None:
        """Start nothing more that was handed in (a pause, a stop); scenes under way finish."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the workers (the model, the Ray actors)."""


class LocalWorkers(ImageWorkers):
    """One generator in this process; a ticket is made when it is waited on, on the waiting thread."""

    size = 1

    def __init__(self, generator: ImageGenerator) -> None:
        self.generator = generator
        self._tickets: dict[SceneKey, Ticket] = {}
        device = generator.describe().get("device")
        self._identity = {"id": "local", "node": socket.gethostname(), "device": device}
        self._state = "idle"
        self._scene: SceneKey | None = None
        self._images = 0
        self._error: str | None = None

    def submit(self, key: SceneKey, request: SceneRequest) -> Ticket:
        return self._tickets.setdefault(key, Ticket(key, request))

    def wait(
        self, ticket: Ticket, timeout: float, on_step: StepCallback | None = None
    ) -> GeneratedImage | None:
        self._tickets.pop(ticket.key, None)
        self._state, self._scene = "busy", ticket.key
        try:
            generated = self.generator.generate(ticket.request, on_step=on_step)
        except Exception as err:
            self._error = f"{type(err).__name__}: {err}"
            raise
        finally:
            self._state, self._scene = "idle", None
        self._images += 1
        generated.info["worker"] = dict(self._identity)
        return generated

    def describe(self) -> list[dict[str, Any]]:
        scene = self._scene
        return [
            {
                **self._identity,
                "state": self._state,
                "claim": scene.claim if scene else None,
                "scene": scene.scene if scene else None,
                "images": self._images,
                "last_error": self._error,
            }
        ]

    def model(self) -> dict[str, Any]:
        return self.generator.describe()

    def set_lookahead(self, lookahead: Lookahead | None) -> None:
        """Nothing to fill: one worker, which makes its images only when they are waited on."""

    def withdraw(self) -> None:
        self._tickets.clear()

    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        for key in [k for k in self._tickets if not alive(k)]:
            del self._tickets[key]

    def close(self) -> None:
        self.generator.close()


def as_workers(source: ImageWorkers | ImageGenerator) -> ImageWorkers:
    """A pool as it is; a bare generator (library use, tests, benchmarks) as a local pool of one."""
    return source if isinstance(source, ImageWorkers) else LocalWorkers(source)


def open_workers(
    settings: Settings,
    make_generator: Callable[[Settings], ImageGenerator],
    phase: Callable[[str], None] = lambda _: None,
) -> ImageWorkers:
    """The configured pool, loaded and warmed up: what the daemon holds from start to stop.

    `phase` is told each start-up phase (systemd's STATUS= and its start-up allowance).
    Ray is imported only here and only for `engine = "ray"`.
    """
    if settings.workers.engine == "ray":
        from pipeline.ray_engine import RayWorkers

        return RayWorkers(settings, make_generator, phase)
    phase("loading model")
    generator = make_generator(settings)
    if settings.model.warmup:
        phase("warming up")
        generator.warm_up()
    return LocalWorkers(generator)
