"""The scenes of the stories queued behind the one in progress, for image workers that are idle.

With several workers, the story at the head of the queue can run out of scenes to start while
workers are free; they then take scenes of the next claimed stories, in claim order, so no
GPU idles while work is queued. Only the image is made ahead: the story's status lines,
its clips and its publishing still wait for its turn, strictly in claim order (the daemon
still runs one story at a time), and it adopts the images made for it when that turn comes.

The pool pulls from here on the daemon's thread (pipeline/images/ray_pool.py) and stops pulling at
its own bound, so this reads the spool lazily and plans each story once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import structlog

from daemon.queue.claim import Claim
from daemon.queue.spool import Spool
from daemon.queue.stories import load_claim
from pipeline.images.seam import SceneKey, SceneRequest
from pipeline.prompts import plan_scenes
from pipeline.render import StoryJob
from pipeline.render.scenes import unfinished
from pipeline.settings import Settings

log = structlog.get_logger("storyreel")

Scenes = list[tuple[SceneKey, SceneRequest]]


class QueuedScenes:
    """The seam's `Lookahead` (pipeline/images/seam.py) over the spool: called, it yields the
    unfinished scenes of the queued stories behind the one in progress, in claim order."""

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        running: Callable[[], Claim | None],
        allowed: Callable[[], bool],
    ) -> None:
        """`running`: the story in progress (its own scenes are its business); `allowed`: false
        while paused, stopping or cancelling, when nothing new may start."""
        self.spool = spool
        self.settings = settings
        self.running = running
        self.allowed = allowed
        self._planned: dict[int, Scenes] = {}  # claim seq -> its unfinished scenes

    def __call__(self) -> Iterator[tuple[SceneKey, SceneRequest]]:
        if not self.allowed():
            return
        running = self.running()
        for seq in [s for s in self._planned if not self.spool.live(s) or (running and s == running.seq)]:
            del self._planned[seq]  # ended, or planned by render_scenes from here on
        for claim in self.spool.claims():
            if claim is running or claim.ending is not None:
                continue
            yield from self._scenes(claim)

    def _scenes(self, claim: Claim) -> Scenes:
        scenes = self._planned.get(claim.seq)
        if scenes is None:
            scenes = self._planned[claim.seq] = self._plan(claim)
        return scenes

    def _plan(self, claim: Claim) -> Scenes:
        """Its unfinished scenes, as render_scenes will ask for them; none for a story that cannot
        be read now (it fails, or waits, when its turn comes: not here)."""
        try:
            story = load_claim(claim, self.settings.limits)  # a bundle: nothing extracted here
            plans = plan_scenes(story, claim.name, self.settings)
        except Exception as err:
            log.debug("lookahead skips a story", story=claim.name, error=str(err))
            return []
        job = StoryJob(claim.name, story, b"", claim.work, claim=claim.tag, sequence=claim.seq)
        return unfinished(job, plans, self.settings)  # never a scene that brings its own picture
