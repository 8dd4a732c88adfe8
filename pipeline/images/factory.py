"""The one place the image engine is picked (`[workers] engine`).

Ray is imported only here and only for `engine = "ray"`; the engines import the seam, never
this module, so there is no cycle.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.images.local import LocalWorkers
from pipeline.images.seam import ImageGenerator, ImageWorkers, Lookahead, Phase
from pipeline.settings import Settings


def open_workers(
    settings: Settings,
    make_generator: Callable[[Settings], ImageGenerator],
    phase: Phase = lambda _: None,
    lookahead: Lookahead | None = None,
    wake: Callable[[], None] = lambda: None,
    stopping: Callable[[], bool] = lambda: False,
) -> ImageWorkers:
    """The configured pool, loaded and warmed up: what the daemon holds from start to stop.

    `phase` is told each start-up phase (systemd's STATUS= and its start-up allowance).
    `lookahead` is where idle workers find more work once the story in progress has no scene
    left to start; one local worker makes its images only when they are waited on, so it has
    no use for it. `wake` is poked (from another thread) when a lost engine is back; `stopping`
    says a stop was asked for (Ray's start-up then gives up at once).
    """
    if settings.workers.engine == "ray":
        from pipeline.images.ray_pool import RayWorkers

        return RayWorkers(settings, make_generator, phase, lookahead, wake, stopping)
    phase("loading model")
    generator = make_generator(settings)
    if settings.model.warmup:
        phase("warming up")
        generator.warm_up(phase)  # a compile in there is a phase of its own
    return LocalWorkers(generator)
