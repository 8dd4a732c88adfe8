"""The story as one film: every scene clip in order, joined by linear crossfades.

Clips are decoded one at a time, streaming, straight into the encoder's own I420 layout
(a blend of YUV frames is exactly the YUV of the blended RGB frames, and no colour
conversion happens on either side). At most the crossfade tail of the previous clip is
held in memory, so a long story costs no more memory than a short one.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np

from pipeline.encode import H264Writer, check_even_size, open_h264
from pipeline.fsutil import atomic_path, copy_durably

__all__ = ["ClipProbe", "FilmInfo", "join_clips", "probe_clip"]

_STREAM = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<pix>\w+)(?:\([^)]*\))?, (?P<w>\d+)x(?P<h>\d+)"
)
_FPS = re.compile(r", (?P<fps>[\d.]+) fps")
_FRAME = re.compile(r"^frame=(\d+)$", re.MULTILINE)


@dataclass(frozen=True)
class ClipProbe:
    """A clip's video stream as ffmpeg reads it; frames is counted, not estimated from duration."""

    path: Path
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frames: int


@dataclass(frozen=True)
class FilmInfo:
    """What was written; crossfade_clamped says the requested crossfade did not fit the shortest clip."""

    path: Path
    clips: int
    width: int
    height: int
    fps: int
    frames: int
    seconds: float
    crossfade_frames: int  # used
    requested_crossfade_frames: int
    crossfade_clamped: bool
    copied: bool  # a one-clip film is the clip itself, copied without re-encoding
    render_seconds: float


def probe_clip(path: Path) -> ClipProbe:
    """Read the stream header and count frames by stream copy, which costs milliseconds.

    The header's duration only estimates the frame count; the crossfade clamp and the
    output frame count need the exact number.
    """
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-hide_banner", "-nostdin", "-nostats", "-i", str(path),
        "-map", "0:v:0", "-c", "copy", "-progress", "pipe:1", "-f", "null", "-",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    header = proc.stderr.split("Stream mapping:")[0]
    stream = _STREAM.search(header)
    fps = _FPS.search(header)
    frames = _FRAME.findall(proc.stdout)
    if proc.returncode != 0 or stream is None or fps is None or not frames:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise ValueError(f"{path}: not a readable video: {' / '.join(tail) or 'no video stream'}")
    return ClipProbe(
        path=Path(path),
        codec=stream["codec"],
        pix_fmt=stream["pix"],
        width=int(stream["w"]),
        height=int(stream["h"]),
        fps=float(fps["fps"]),
        frames=int(frames[-1]),
    )


def _check_clips(probes: list[ClipProbe], width: int, height: int, fps: int) -> None:
    """Clips are made by render_clip with the same settings; anything else is a caller bug."""
    for p in probes:
        if (p.width, p.height) != (width, height) or abs(p.fps - fps) > 1e-3:
            raise ValueError(
                f"{p.path}: clip is {p.width}x{p.height} at {p.fps:g} fps, "
                f"the film is {width}x{height} at {fps} fps"
            )
        if p.frames < 1:
            raise ValueError(f"{p.path}: clip has no frames")


def _decode(probe: ClipProbe) -> Iterator[np.ndarray]:
    """I420 frames (height*3/2 x width uint8), one at a time, from an ffmpeg decoder process."""
    reader = imageio_ffmpeg.read_frames(str(probe.path), pix_fmt="yuv420p", bits_per_pixel=12)
    try:
        next(reader)  # the metadata dict
        for raw in reader:
            yield np.frombuffer(raw, np.uint8).reshape(probe.height * 3 // 2, probe.width)
    finally:
        reader.close()


def _stream(probes: list[ClipProbe], xfade: int, enc: H264Writer) -> None:
    """Write every frame once; the first `xfade` frames of each clip after the first are blended
    with the held tail of the one before (weights (j+1)/(xfade+1), so no crossfade frame is a
    plain copy of either side)."""
    tail: list[np.ndarray] = []
    for k, probe in enumerate(probes):
        keep = xfade if k < len(probes) - 1 else 0
        held: deque[np.ndarray] = deque()
        seen = 0
        for frame in _decode(probe):
            if seen < len(tail):
                a = (seen + 1) / (len(tail) + 1)
                enc.write(cv2.addWeighted(tail[seen], 1.0 - a, frame, a, 0.0))
            else:
                held.append(frame)
                if len(held) > keep:
                    enc.write(held.popleft())
            seen += 1
        if seen < len(tail) + keep:
            raise RuntimeError(f"{probe.path}: decoded {seen} frames, expected {probe.frames}")
        tail = list(held)


def join_clips(
    clips: list[Path],
    out_path: Path,
    *,
    width: int,
    height: int,
    fps: int,
    crossfade_seconds: float,
    crf: int = 18,
    preset: str = "medium",
) -> FilmInfo:
    """Join `clips` in order into one MP4 with crossfades of round(crossfade_seconds*fps) frames.

    Frames out = sum of clip frames - (n-1) * crossfade frames. The crossfade is clamped to
    half the shortest clip so that no clip is consumed by two crossfades at once; 0 gives hard
    cuts. A single clip is copied as it is. The film appears under `out_path` only when complete.
    """
    started = time.perf_counter()
    if not clips:
        raise ValueError("a film needs at least one clip")
    if crossfade_seconds < 0:
        raise ValueError(f"crossfade_seconds must be >= 0, got {crossfade_seconds}")
    check_even_size(width, height)
    out_path = Path(out_path)
    probes = [probe_clip(Path(c)) for c in clips]
    _check_clips(probes, width, height, fps)
    requested = round(crossfade_seconds * fps)
    xfade = min(requested, min(p.frames for p in probes) // 2) if len(probes) > 1 else 0
    if len(probes) == 1:
        copy_durably(probes[0].path, out_path)
        frames = probes[0].frames
    else:
        with atomic_path(out_path) as tmp, open_h264(tmp, width, height, fps, crf, preset) as enc:
            _stream(probes, xfade, enc)
        frames = enc.frames
    return FilmInfo(
        path=out_path,
        clips=len(probes),
        width=width,
        height=height,
        fps=fps,
        frames=frames,
        seconds=frames / fps,
        crossfade_frames=xfade,
        requested_crossfade_frames=requested,
        crossfade_clamped=len(probes) > 1 and xfade < requested,
        copied=len(probes) == 1,
        render_seconds=time.perf_counter() - started,
    )
