"""Ken Burns motion: one still image -> a slow, eased zoom or pan with fades, as I420 frames.

Every frame is rendered here with a float affine warp (no integer crop boxes, which is
what makes the MoviePy approach shudder) directly in the encoder's own colour space
(pipeline.encode): the source is converted once to BT.709 limited-range YUV, luma is
warped at full size and chroma at half size, and the I420 frames go straight down a pipe
to ffmpeg. That halves the pixels we warp and spares ffmpeg its RGB->YUV conversion,
which on a 2-core machine cost more than all the warping.

Imports only numpy, OpenCV and Pillow so `storyreel animate` starts fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.encode import BLACK_C, BLACK_Y, RGB_TO_YUV709, check_even_size, open_h264
from pipeline.fsutil import atomic_path
from pipeline.settings import MOTIONS

__all__ = ["ClipInfo", "clamp_fade_frames", "render_clip", "render_frames"]

_WARP_FLAGS = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP


@dataclass(frozen=True)
class ClipInfo:
    """What was written, for whoever reports it (`storyreel animate` prints it)."""

    path: Path
    width: int
    height: int
    fps: int
    frames: int
    seconds: float  # frames / fps, i.e. what a player shows
    motion: str
    fade_frames: int  # per end, after clamping so fade-in and fade-out never overlap
    render_seconds: float  # wall time of rendering + encoding
    bytes: int


# ----------------------------------------------------------------------------------------------
# Source preparation


@dataclass(frozen=True)
class _Source:
    """The image once, in the encoder's colour space, at the resolution the warps sample from."""

    y: np.ndarray  # working-size luma
    u: np.ndarray  # half-size chroma, pre-filtered so the half-size warp does not alias
    v: np.ndarray
    src_w: int  # the original image size, in which the camera is defined
    src_h: int
    chroma_sx: float  # chroma px per working luma px (~0.5, exact for odd sizes)
    chroma_sy: float


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        rgb = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"image arrays must be uint8, got {arr.dtype}")
        if arr.ndim == 2:
            arr = np.dstack([arr] * 3)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image array must be HxW, HxWx3 or HxWx4, got shape {arr.shape}")
        rgb = arr[:, :, :3]
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError("image is empty")
    return np.ascontiguousarray(rgb)


def _prepare_source(rgb: np.ndarray, cover: float, max_zoom: float) -> _Source:
    """Shrink once, with area averaging, to the largest scale the clip ever samples at.

    Warping straight from a much larger image with bilinear sampling would alias; from
    this working copy the warps only magnify or shrink by at most 1/max_zoom.
    """
    src_h, src_w = rgb.shape[:2]
    need = cover * max_zoom
    work = rgb
    if need < 1.0:
        size = (max(1, math.ceil(src_w * need)), max(1, math.ceil(src_h * need)))
        work = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    yuv = cv2.transform(work, RGB_TO_YUV709)
    h, w = yuv.shape[:2]
    cw, ch = (w + 1) // 2, (h + 1) // 2
    chroma = cv2.resize(np.ascontiguousarray(yuv[:, :, 1:]), (cw, ch), interpolation=cv2.INTER_AREA)
    return _Source(
        y=np.ascontiguousarray(yuv[:, :, 0]),
        u=np.ascontiguousarray(chroma[:, :, 0]),
        v=np.ascontiguousarray(chroma[:, :, 1]),
        src_w=src_w,
        src_h=src_h,
        chroma_sx=cw / w,
        chroma_sy=ch / h,
    )


# ----------------------------------------------------------------------------------------------
# Camera path


def _smootherstep(p: float) -> float:
    """Zero velocity and acceleration at both ends: the move starts and settles without a jolt."""
    p = min(1.0, max(0.0, p))
    return p * p * p * (p * (6.0 * p - 15.0) + 10.0)


def _camera(
    motion: str, p: float, zoom: float, pan: float, width: int, height: int
) -> tuple[float, float, float]:
    """(z, ox, oy) at progress p: zoom over the cover fit, and view-centre offset in output px at z=1.

    Pans run at a constant 1+pan zoom and travel across exactly the room that zoom makes,
    which is `pan` of the frame in output pixels.
    """
    e = _smootherstep(p)
    if motion == "zoom_in":
        return (1.0 + zoom) ** e, 0.0, 0.0
    if motion == "zoom_out":
        return (1.0 + zoom) ** (1.0 - e), 0.0, 0.0
    z = 1.0 + pan
    room_x, room_y = width * (1.0 - 1.0 / z), height * (1.0 - 1.0 / z)
    travel = {
        "pan_right": (room_x * (e - 0.5), 0.0),
        "pan_left": (room_x * (0.5 - e), 0.0),
        "pan_down": (0.0, room_y * (e - 0.5)),
        "pan_up": (0.0, room_y * (0.5 - e)),
    }[motion]
    return z, travel[0], travel[1]


def _axis(a: float, b: float, out_scale: float, src_scale: float) -> tuple[float, float]:
    """Pixel-index map src = k*dst + o for one axis, from the edge-coordinate map U = a*X + b.

    Pixel i covers [i, i+1) in its own grid; out_scale/src_scale convert chroma grids to luma.
    """
    return a * out_scale * src_scale, (a * out_scale * 0.5 + b) * src_scale - 0.5


def _matrices(
    src: _Source, z: float, ox: float, oy: float, width: int, height: int, work_w: int, work_h: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float inverse-warp matrices (output -> working image) for luma and for chroma."""
    kx, ky = work_w / src.src_w, work_h / src.src_h
    cover = max(width / src.src_w, height / src.src_h)
    ax, ay = kx / (cover * z), ky / (cover * z)
    bx = kx * (src.src_w / 2 + ox / cover) - ax * width / 2
    by = ky * (src.src_h / 2 + oy / cover) - ay * height / 2
    lx, ly = _axis(ax, bx, 1.0, 1.0), _axis(ay, by, 1.0, 1.0)
    cx, cy = _axis(ax, bx, 2.0, src.chroma_sx), _axis(ay, by, 2.0, src.chroma_sy)
    luma = np.array([[lx[0], 0.0, lx[1]], [0.0, ly[0], ly[1]]])
    chroma = np.array([[cx[0], 0.0, cx[1]], [0.0, cy[0], cy[1]]])
    return luma, chroma


def fade_levels(frames: int, fade_in: int, fade_out: int) -> list[float]:
    """Brightness per frame: linear ramps from black over the first `fade_in` frames and to black
    over the last `fade_out` (the first and last frame black when their fade is on), 1 between."""
    levels = []
    for i in range(frames):
        a = 1.0
        if fade_in > 0:
            a = min(a, i / fade_in)
        if fade_out > 0:
            a = min(a, (frames - 1 - i) / fade_out)
        levels.append(a)
    return levels


def clamp_fade_frames(frames: int, fade_seconds: float, fps: int) -> int:
    """Fades never overlap: each gets at most half the clip."""
    return max(0, min(round(fade_seconds * fps), frames // 2))


# ----------------------------------------------------------------------------------------------
# Rendering


class _FrameRenderer:
    """Owns one I420 buffer whose plane views the warps write into directly (no copies)."""

    def __init__(self, src: _Source, width: int, height: int) -> None:
        self.src, self.width, self.height = src, width, height
        self.buf = np.empty((height * 3 // 2, width), np.uint8)
        flat = self.buf.reshape(-1)
        n, q = width * height, width * height // 4
        self.y = flat[:n].reshape(height, width)
        self.u = flat[n : n + q].reshape(height // 2, width // 2)
        self.v = flat[n + q :].reshape(height // 2, width // 2)
        self.chroma = flat[n:].reshape(height // 2, width)  # U and V, for the fades

    def render(self, z: float, ox: float, oy: float, level: float) -> np.ndarray:
        if level <= 0.0:
            self.y.fill(BLACK_Y)
            self.chroma.fill(BLACK_C)
            return self.buf
        s = self.src
        work_h, work_w = s.y.shape
        luma, chroma = _matrices(s, z, ox, oy, self.width, self.height, work_w, work_h)
        half = (self.width // 2, self.height // 2)
        cv2.warpAffine(s.y, luma, (self.width, self.height), self.y, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        cv2.warpAffine(s.u, chroma, half, self.u, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        cv2.warpAffine(s.v, chroma, half, self.v, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        if level < 1.0:  # fade towards video black: Y -> 16, Cb/Cr -> 128
            cv2.convertScaleAbs(self.y, self.y, level, BLACK_Y * (1.0 - level))
            cv2.convertScaleAbs(self.chroma, self.chroma, level, BLACK_C * (1.0 - level))
        return self.buf


def _validate(width: int, height: int, fps: int, seconds: float, motion: str, zoom: float, pan: float) -> int:
    check_even_size(width, height)
    if not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    if zoom < 0 or not 0 <= pan < 1:
        raise ValueError(f"zoom must be >= 0 and pan in [0, 1), got zoom={zoom} pan={pan}")
    frames = round(seconds * fps)
    if frames < 1:
        raise ValueError(f"{seconds}s at {fps} fps is less than one frame")
    return frames


def render_frames(
    image: Image.Image | np.ndarray,
    *,
    width: int,
    height: int,
    fps: int,
    seconds: float,
    motion: str = "zoom_in",
    zoom: float = 0.12,
    pan: float = 0.10,
    fade_in: int = 0,
    fade_out: int = 0,
) -> Iterator[np.ndarray]:
    """The round(seconds*fps) I420 frames of one Ken Burns shot, in order; a clip is these, encoded.

    The image is cover-fitted (scaled to fill, centre-cropped at sub-pixel precision), never
    stretched. `fade_in`/`fade_out` frames ramp from/to black at the start/end. Arguments are
    checked now, not at the first frame. One buffer is rewritten for every frame: copy a frame
    to keep it past the next.
    """
    frames = _validate(width, height, fps, seconds, motion, zoom, pan)
    rgb = _as_rgb(image)
    cover = max(width / rgb.shape[1], height / rgb.shape[0])
    max_zoom = 1.0 + (zoom if motion in ("zoom_in", "zoom_out") else pan)
    renderer = _FrameRenderer(_prepare_source(rgb, cover, max_zoom), width, height)
    levels = fade_levels(frames, fade_in, fade_out)

    def generate() -> Iterator[np.ndarray]:
        for i, level in enumerate(levels):
            p = i / (frames - 1) if frames > 1 else 0.0
            z, ox, oy = _camera(motion, p, zoom, pan, width, height)
            yield renderer.render(z, ox, oy, level)

    return generate()


def render_clip(
    image: Image.Image | np.ndarray,
    out_path: Path,
    *,
    width: int,
    height: int,
    fps: int,
    seconds: float,
    motion: str = "zoom_in",
    zoom: float = 0.12,
    pan: float = 0.10,
    fade_seconds: float = 0.5,
    crf: int = 18,
    preset: str = "medium",
) -> ClipInfo:
    """Write one Ken Burns clip of round(seconds*fps) frames to `out_path` (MP4, H.264, yuv420p),
    fading in from and out to black. The file appears under `out_path` only once it is complete.
    """
    started = time.perf_counter()
    frames = _validate(width, height, fps, seconds, motion, zoom, pan)
    fade = clamp_fade_frames(frames, fade_seconds, fps)
    shot = render_frames(
        image,
        width=width,
        height=height,
        fps=fps,
        seconds=seconds,
        motion=motion,
        zoom=zoom,
        pan=pan,
        fade_in=fade,
        fade_out=fade,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open_h264(tmp, width, height, fps, crf, preset) as enc:
        for frame in shot:
            enc.write(frame)
    return ClipInfo(
        path=out_path,
        width=width,
        height=height,
        fps=fps,
        frames=frames,
        seconds=frames / fps,
        motion=motion,
        fade_frames=fade,
        render_seconds=time.perf_counter() - started,
        bytes=out_path.stat().st_size,
    )
