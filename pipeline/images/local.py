"""The local engine: one generator in the daemon's own process.

Its tickets are made lazily, on the calling thread, when they are waited on, so denoising runs
on the daemon's loop thread (the step callbacks do the daemon's housekeeping) and the CPU pool
finishes scene N while N+1 denoises.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from pipeline.images.seam import (
    GeneratedImage,
    ImageGenerator,
    ImageRequest,
    ImageWorkers,
    SceneKey,
    StepCallback,
    Ticket,
)


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

    def submit(self, key: SceneKey, request: ImageRequest) -> Ticket:
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
