"""The story as one film: every scene in order, joined by linear crossfades, picture to picture.

The film is rendered from the scenes' images with the same camera moves as their clips, not
cut together from the clips: a clip fades in from and out to black, and crossfading two faded
ends would dip the picture to black at every cut. Here only the film's own first and last
frames fade; a crossfade blends the pictures themselves.

Frames stream straight into the encoder's I420 layout (a blend of YUV frames is exactly the
YUV of the blended RGB frames). At most the crossfade tail of the previous scene is held in
memory and one image is loaded at a time, so a long story costs no more memory than a short one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.fsutil import atomic_path
from pipeline.settings import VideoSettings
from pipeline.video.encode import VideoEncoding, VideoWriter, open_video
from pipeline.video.kenburns import Box, clamp_fade_frames, render_frames

__all__ = ["FilmInfo", "FilmScene", "make_film"]


@dataclass(frozen=True)
class FilmScene:
    """A scene as the film shows it: its image under the same camera move as its clip."""

    # A path (or a callable giving the picture: a bundle's, decoded upright and in sRGB) is read
    # only when the film reaches the scene.
    image: Path | Image.Image | np.ndarray | Callable[[], Image.Image | np.ndarray]
    seconds: float
    motion: str = VideoSettings.model_fields["motion"].default
    source_box: Box | None = None  # the picture inside the image (a provided one, uncropped)


@dataclass(frozen=True)
class FilmInfo:
    """What was written; crossfade_clamped says the requested crossfade did not fit the shortest scene."""

    path: Path
    scenes: int
    width: int
    height: int
    fps: Fraction
    frames: int
    seconds: float
    fade_frames: int  # at the film's start and at its end, never at a cut
    crossfade_frames: int  # used
    requested_crossfade_frames: int
    crossfade_clamped: bool
    render_seconds: float


def _image(
    source: Path | Image.Image | np.ndarray | Callable[[], Image.Image | np.ndarray],
) -> Image.Image | np.ndarray:
    if callable(source):
        return source()
    if not isinstance(source, Path):
        return source
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{source}: not a readable image: {err}") from None


def _stream(shots: list[Iterator[np.ndarray]], xfade: int, enc: VideoWriter) -> None:
    """Write every frame once; the first `xfade` frames of each shot after the first are blended
    with the held tail of the one before (weights (j+1)/(xfade+1), so no crossfade frame is a
    plain copy of either side)."""
    tail: list[np.ndarray] = []
    for k, shot in enumerate(shots):
        keep = xfade if k < len(shots) - 1 else 0
        held: deque[np.ndarray] = deque()
        for seen, frame in enumerate(shot):
            if seen < len(tail):
                a = (seen + 1) / (len(tail) + 1)
                enc.write(cv2.addWeighted(tail[seen], 1.0 - a, frame, a, 0.0))
            else:
                held.append(frame.copy())  # the renderer rewrites its buffer for the next frame
                if len(held) > keep:
                    enc.write(held.popleft())
        tail = list(held)


def make_film(
    scenes: list[FilmScene],
    out_path: Path,
    encoding: VideoEncoding,
    *,
    fade_seconds: float,
    crossfade_seconds: float,
    zoom: float = VideoSettings.model_fields["zoom"].default,
    pan: float = VideoSettings.model_fields["pan"].default,
) -> FilmInfo:
    """Render `scenes` in order into one video, joined by crossfades of round(crossfade_seconds*fps)
    frames, fading in from black at the start and out to black at the end.

    Every scene at `encoding`'s one size and rate (a film never mixes rates). Each scene lasts
    round(seconds*fps) frames, as its clip does; frames out = their sum - (n-1) * crossfade
    frames. The crossfade is clamped to half the shortest scene so that no scene is consumed by
    two crossfades at once; 0 gives hard cuts. The film appears under `out_path` only when
    complete.
    """
    started = time.perf_counter()
    if not scenes:
        raise ValueError("a film needs at least one scene")
    if crossfade_seconds < 0 or fade_seconds < 0:
        raise ValueError(f"fade and crossfade must be >= 0 s, got {fade_seconds} and {crossfade_seconds}")
    fps = encoding.fps
    counts = [encoding.frames(sc.seconds) for sc in scenes]
    requested = round(crossfade_seconds * fps)
    xfade = min(requested, min(counts) // 2) if len(scenes) > 1 else 0
    fade = (clamp_fade_frames(counts[0], fade_seconds, fps), clamp_fade_frames(counts[-1], fade_seconds, fps))

    def shot(k: int) -> Iterator[np.ndarray]:  # lazy: one image in memory at a time
        sc = scenes[k]
        yield from render_frames(
            _image(sc.image),
            encoding,
            seconds=sc.seconds,
            motion=sc.motion,
            zoom=zoom,
            pan=pan,
            source_box=sc.source_box,
            fade_in=fade[0] if k == 0 else 0,
            fade_out=fade[1] if k == len(scenes) - 1 else 0,
        )

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open_video(tmp, encoding) as enc:
        _stream([shot(k) for k in range(len(scenes))], xfade, enc)
    return FilmInfo(
        path=out_path,
        scenes=len(scenes),
        width=encoding.width,
        height=encoding.height,
        fps=fps,
        frames=enc.frames,
        seconds=encoding.seconds(enc.frames),
        fade_frames=fade[0],
        crossfade_frames=xfade,
        requested_crossfade_frames=requested,
        crossfade_clamped=len(scenes) > 1 and xfade < requested,
        render_seconds=time.perf_counter() - started,
    )
