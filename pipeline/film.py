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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.encode import H264Writer, check_even_size, open_h264
from pipeline.fsutil import atomic_path
from pipeline.kenburns import clamp_fade_frames, render_frames

__all__ = ["FilmInfo", "FilmScene", "make_film"]


@dataclass(frozen=True)
class FilmScene:
    """A scene as the film shows it: its image under the same camera move as its clip."""

    image: Path | Image.Image | np.ndarray  # a path is read when the film reaches the scene
    seconds: float
    motion: str = "zoom_in"


@dataclass(frozen=True)
class FilmInfo:
    """What was written; crossfade_clamped says the requested crossfade did not fit the shortest scene."""

    path: Path
    scenes: int
    width: int
    height: int
    fps: int
    frames: int
    seconds: float
    fade_frames: int  # at the film's start and at its end, never at a cut
    crossfade_frames: int  # used
    requested_crossfade_frames: int
    crossfade_clamped: bool
    render_seconds: float


def _image(source: Path | Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    if not isinstance(source, Path):
        return source
    try:
        with Image.open(source) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{source}: not a readable image: {err}") from None


def _stream(shots: list[Iterator[np.ndarray]], xfade: int, enc: H264Writer) -> None:
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
    *,
    width: int,
    height: int,
    fps: int,
    fade_seconds: float,
    crossfade_seconds: float,
    zoom: float = 0.12,
    pan: float = 0.10,
    crf: int = 18,
    preset: str = "medium",
) -> FilmInfo:
    """Render `scenes` in order into one MP4, joined by crossfades of round(crossfade_seconds*fps)
    frames, fading in from black at the start and out to black at the end.

    Each scene lasts round(seconds*fps) frames, as its clip does; frames out = their sum
    - (n-1) * crossfade frames. The crossfade is clamped to half the shortest scene so that no
    scene is consumed by two crossfades at once; 0 gives hard cuts. The film appears under
    `out_path` only when complete.
    """
    started = time.perf_counter()
    if not scenes:
        raise ValueError("a film needs at least one scene")
    if crossfade_seconds < 0 or fade_seconds < 0:
        raise ValueError(f"fade and crossfade must be >= 0 s, got {fade_seconds} and {crossfade_seconds}")
    check_even_size(width, height)
    counts = [round(sc.seconds * fps) for sc in scenes]
    requested = round(crossfade_seconds * fps)
    xfade = min(requested, min(counts) // 2) if len(scenes) > 1 else 0
    fade = (clamp_fade_frames(counts[0], fade_seconds, fps), clamp_fade_frames(counts[-1], fade_seconds, fps))

    def shot(k: int) -> Iterator[np.ndarray]:  # lazy: one image in memory at a time
        sc = scenes[k]
        yield from render_frames(
            _image(sc.image),
            width=width,
            height=height,
            fps=fps,
            seconds=sc.seconds,
            motion=sc.motion,
            zoom=zoom,
            pan=pan,
            fade_in=fade[0] if k == 0 else 0,
            fade_out=fade[1] if k == len(scenes) - 1 else 0,
        )

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open_h264(tmp, width, height, fps, crf, preset) as enc:
        _stream([shot(k) for k in range(len(scenes))], xfade, enc)
    return FilmInfo(
        path=out_path,
        scenes=len(scenes),
        width=width,
        height=height,
        fps=fps,
        frames=enc.frames,
        seconds=enc.frames / fps,
        fade_frames=fade[0],
        crossfade_frames=xfade,
        requested_crossfade_frames=requested,
        crossfade_clamped=len(scenes) > 1 and xfade < requested,
        render_seconds=time.perf_counter() - started,
    )
