"""Master clips for editing software: each scene clean (no fades), with handles at both ends.

An editor's dissolve needs picture past each edit point, and clips/ has none: each clip fades
to black and stops. A master clip is the scene's shot with `handles` extra frames at each end,
made by the same camera: its move's time base is stretched over the longer clip, so the handles
keep moving (eased as ever) instead of holding a frozen frame, and never leave the picture.
Frames [handles, handles + round(seconds x fps)) are the scene as the film shows it, to within
that stretch (imperceptible with handles short against the scene; see `handle_frames`).

The codec is the encoding's: H.264 in .mp4 (small), or ProRes 422 HQ / DNxHR HQ in .mov, the
intra-frame codecs editing software scrubs without decoding whole groups of pictures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.fsutil import atomic_path
from pipeline.video.encode import VideoEncoding, open_video
from pipeline.video.kenburns import Box, render_frames

__all__ = ["MasterInfo", "handle_frames", "master_name", "write_master_clip"]


@dataclass(frozen=True)
class MasterInfo:
    """A master clip as written: the timelines place `scene_frames` of it after `handles`."""

    path: Path
    codec: str
    width: int
    height: int
    fps: Fraction
    frames: int  # scene_frames + 2 * handles
    scene_frames: int  # round(seconds x fps): the scene's own frames, as in clips/ and the film
    handles: int  # extra frames at each end
    render_seconds: float


def handle_frames(fps: Fraction, crossfade_frames: int) -> int:
    """Handles for every master clip of a story: half a second, or half the story's crossfade
    when that is longer (the least a dissolve centred on a cut draws past the cut), rounded up."""
    return max(math.ceil(crossfade_frames / 2), round(fps / 2), 1)


def master_name(stem: str, encoding: VideoEncoding) -> str:
    """scene_001.mp4 for H.264, scene_001.mov for ProRes and DNxHR: the container goes with the codec."""
    return f"{stem}{encoding.suffix}"


def write_master_clip(
    image: Image.Image | np.ndarray,
    out_path: Path,
    encoding: VideoEncoding,
    *,
    seconds: float,
    motion: str,
    zoom: float,
    pan: float,
    handles: int,
    source_box: Box | None = None,
) -> MasterInfo:
    """Write one master clip: round(seconds x fps) + 2 x handles frames, no fades, encoded as
    `encoding` says (its codec decides the container: name the file with `master_name`). The
    file appears under `out_path` only once it is complete."""
    started = time.perf_counter()
    out_path = Path(out_path)
    if out_path.suffix != encoding.suffix:
        raise ValueError(f"{out_path.name}: a {encoding.codec} master clip is a {encoding.suffix} file")
    shot = render_frames(
        image,
        encoding,
        seconds=seconds,
        motion=motion,
        zoom=zoom,
        pan=pan,
        source_box=source_box,
        handles=handles,
    )
    with atomic_path(out_path) as tmp, open_video(tmp, encoding) as enc:
        for frame in shot:
            enc.write(frame)
    return MasterInfo(
        path=out_path,
        codec=encoding.codec,
        width=encoding.width,
        height=encoding.height,
        fps=encoding.fps,
        frames=enc.frames,
        scene_frames=enc.frames - 2 * handles,
        handles=handles,
        render_seconds=time.perf_counter() - started,
    )
