"""The image seam: hand a scene in as plain data, get its image back. Nothing heavy is imported here.

    ImageGenerator.generate(ImageRequest) -> GeneratedImage    one generator, one image
    ImageWorkers.submit(key, request) -> Ticket                 a pool of generators
    ImageWorkers.wait(ticket, timeout, on_step)                 the image, or None while not done

An `ImageRequest` is a scene (`SceneRequest`) or a character's reference portrait
(`PortraitRequest`, whose image comes back with the recorded `Reference`). Both are plain data
that pickle, so they cross a process or Ray boundary: a scene carries its characters'
references, and any worker with the same model makes the same scene from them. A `SceneKey` names one scene
of one run of a story: a story's scenes can be handed in ahead of time, by the story itself
(pipeline/render/scenes.py) or by the daemon for the stories queued behind it (a `Lookahead`);
the one that renders the story later adopts the ticket that is already there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import PIL.Image

    from pipeline.images.consistency.reference import Reference

StepCallback = Callable[[int, int], None]
# Told each start-up phase by name: the daemon makes it systemd's STATUS= and a fresh start-up
# allowance (EXTEND_TIMEOUT_USEC), so a long phase (a compile) is never killed as a hung start.
Phase = Callable[[str], None]


@dataclass(frozen=True)
class SceneRequest:
    """Everything needed for one image; plain data, so it pickles across a process or Ray boundary."""

    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    # The characters the scene names, each one's reference (in the story's order of characters);
    # none: the scene is made exactly as it would be with consistency off.
    references: tuple[Reference, ...] = ()


@dataclass(frozen=True)
class PortraitRequest:
    """One character's reference portrait: rendered and its trajectory recorded, or, with
    `picture`, a bundle's picture of them (PNG bytes, already fitted to width×height) noised
    step by step. Made at the scenes' size, steps and guidance, so it replays inside them."""

    character: str
    prompt: str
    negative: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float
    picture: bytes | None = None


ImageRequest = SceneRequest | PortraitRequest


@dataclass
class GeneratedImage:
    image: PIL.Image.Image  # raw RGB, before finishing
    timings: dict[str, float]  # "encode", "denoise", "decode", "total" seconds
    info: dict[str, Any]  # JSON-ready: goes into the story's manifest
    reference: Reference | None = None  # a portrait's recorded reference (plain data)


class ImageGenerator(Protocol):
    def describe(self) -> dict[str, Any]: ...

    def warm_up(self, phase: Phase | None = None) -> None: ...

    def generate(self, req: ImageRequest, on_step: StepCallback | None = None) -> GeneratedImage: ...

    def close(self) -> None: ...


MakeGenerator = Callable[[Any], ImageGenerator]  # settings -> a loaded generator (pipeline.images.sdxl)


@dataclass(frozen=True, order=True)
class SceneKey:
    """One scene of one run of a story; ordered as the queue is (claim order, then scene)."""

    order: int  # the claim's sequence number: lower runs first
    claim: str  # the claim's tag (one run of one story)
    scene: int  # 0 for a portrait: made before the scenes that need it
    portrait: str = ""  # the character, for a portrait


@dataclass(eq=False)
class Ticket:
    """A scene handed in. Engines that keep bookkeeping per scene subclass it (RayTicket)."""

    key: SceneKey
    request: ImageRequest


# The daemon's view of the queue behind the story in progress: (key, request) for the next
# claimed stories' unfinished scenes, in claim order; nothing while paused or stopping.
Lookahead = Callable[[], Iterable[tuple[SceneKey, SceneRequest]]]


class ImageWorkers(ABC):
    """A pool of image workers. Not thread-safe: one caller (the daemon's loop) at a time."""

    size: int

    @abstractmethod
    def submit(self, key: SceneKey, request: ImageRequest) -> Ticket:
        """Hand a scene (or a portrait) in; a key already handed in gives back its ticket (adopted,
        not redone)."""

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
    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        """Forget the tickets of claims that ended (done, failed, cancelled): `alive` says which stay."""

    def back(self) -> bool:
        """True once after the pool came back from EngineUnavailable by itself (a Ray cluster's
        head answering again): the story waiting on it may go on now, not at its next retry."""
        return False

    @abstractmethod
    def withdraw(self) -> None:
        """Start nothing more that was handed in (a pause, a stop); scenes under way finish."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the workers (the model, the Ray actors)."""
