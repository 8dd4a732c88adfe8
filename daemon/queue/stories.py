"""A claimed story read back from the spool: the one way its bytes become a `Story`."""

from __future__ import annotations

from daemon.queue.claim import Claim
from daemon.queue.spool import read_limited
from pipeline.settings import LimitsSettings
from pipeline.story import Story, StoryError, load_story


def load_claim(claim: Claim, limits: LimitsSettings) -> tuple[bytes, Story]:
    """Read and parse the claimed story; raises StoryError naming what is wrong (OSError: not its fault).

    A story is parsed more than once, on purpose: at claim, so a bad one fails at once rather
    than after the queue ahead of it has run (and the "queued" line can say how many scenes),
    and again when it runs. Keeping the parsed story with the claim instead would hold every
    queued story in memory (a thousand files dropped at once, each up to limits.max_file_bytes),
    and a claim outlives the process anyway, so the run must be able to parse it from the
    spool. A parse takes milliseconds; a scene takes seconds.
    """
    limit = limits.max_file_bytes
    raw = read_limited(claim.input, limit)
    if len(raw) > limit:
        raise StoryError([f"(file): {claim.identity.size} bytes is over the limit of {limit} bytes"])
    return raw, load_story(raw, limits)


def problem_text(err: StoryError) -> str:
    """A story's problems in one line, as its `failed` line says them."""
    return "; ".join(err.problems)
