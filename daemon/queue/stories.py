"""A claimed story read back from the spool: the one way its bytes become a `Story`.

    load_claim(claim, limits)   -> Story          the quick look: at claim, in the lookahead, as a run
                                                  starts (a bundle: its listing and story.json only)
    open_claim(claim, limits)   -> ClaimedStory   the run's: the story as published and, for a
                                                  bundle, its named files extracted into the
                                                  claim's work folder

A story is parsed more than once, on purpose: at claim, so a bad one fails at once rather than
after the queue ahead of it has run (and the "queued" line can say how many scenes), and again
when it runs. Keeping the parsed story with the claim instead would hold every queued story in
memory (a thousand files dropped at once, each up to limits.max_file_bytes), and a claim
outlives the process anyway, so the run must be able to parse it from the spool. A parse takes
milliseconds (a bundle's look too: nothing is inflated but story.json); a scene takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from daemon.queue.claim import Claim
from daemon.queue.spool import read_limited
from pipeline.bundle import extract_bundle, inspect_bundle
from pipeline.fsutil import remove_tree
from pipeline.render import WorkFolder
from pipeline.settings import LimitsSettings
from pipeline.story import Story, StoryError, load_story


@dataclass(frozen=True)
class ClaimedStory:
    story: Story
    raw: bytes  # story.json exactly as it arrived (a bundle's, from inside the ZIP)
    files: Path | None = None  # a bundle: the folder its named files are in, by their paths


def load_claim(claim: Claim, limits: LimitsSettings) -> Story:
    """Read and parse the claimed story; raises StoryError naming what is wrong (a BundleError
    for a bundle's problems), OSError when it cannot be read now (not its fault)."""
    if claim.bundle:
        return inspect_bundle(claim.input, limits)
    return load_story(_read_plain(claim, limits), limits)


def open_claim(claim: Claim, limits: LimitsSettings) -> ClaimedStory:
    """The story as the run makes it. A bundle is extracted into the claim's work folder (nothing
    of it is written anywhere else), every named file decoded; a folder left there by a try that
    died half-way through (kill -9, power cut) is removed and the extraction done again, so a
    resumed or retried story needs nothing but the ZIP kept in the spool."""
    if not claim.bundle:
        raw = _read_plain(claim, limits)
        return ClaimedStory(load_story(raw, limits), raw)
    target = WorkFolder(claim.work).bundle
    remove_tree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    bundle = extract_bundle(claim.input, target, limits)
    return ClaimedStory(bundle.story, bundle.story_bytes, bundle.root)


def _read_plain(claim: Claim, limits: LimitsSettings) -> bytes:
    limit = limits.max_file_bytes
    raw = read_limited(claim.input, limit)
    if len(raw) > limit:
        raise StoryError([f"(file): {claim.identity.size} bytes is over the limit of {limit} bytes"])
    return raw


def problem_text(err: StoryError) -> str:
    """A story's problems in one line, as its `failed` line says them."""
    return "; ".join(err.problems)
