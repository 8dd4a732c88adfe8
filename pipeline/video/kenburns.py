"""Ken Burns motion: one still image -> a slow, eased zoom or pan with fades, as I420 frames.

Every frame is rendered here with a float affine map (no integer crop boxes, which is what
makes the MoviePy approach shudder) directly in the encoder's own colour space
(pipeline.video.encode): the source is converted once to BT.709 limited-range YUV, luma is
resampled at full size and chroma at half size, and the I420 frames go straight down a pipe
to ffmpeg. That halves the pixels we resample and spares ffmpeg its RGB->YUV conversion,
which on a 2-core machine cost more than all the warping.

The camera samples the picture once, straight from its full resolution to the output size:
- output larger than the picture (1344x768 -> 1920x1080, 4K): luma through Pillow's Lanczos
  with a float source box, so the enlargement keeps the picture's detail (bilinear would
  soften it; a bench row checks it stays at least as sharp as a plain bicubic upscale);
- output the picture's size or smaller: an OpenCV bilinear warp, from a copy area-averaged
  once to the largest scale the clip samples at (a smaller output would alias otherwise).
Chroma is warped bilinearly at half size in both cases.

Imports only numpy, OpenCV and Pillow so `storyreel animate` starts fast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.fsutil import atomic_path
from pipeline.settings import MOTIONS, VideoSettings
from pipeline.video.encode import BLACK_C, BLACK_Y, RGB_TO_YUV709, VideoEncoding, open_video

__all__ = ["Box", "ClipInfo", "clamp_fade_frames", "fade_levels", "render_clip", "render_frames"]

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in image pixels, as Pillow's box

_WARP_FLAGS = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
_ENLARGE = Image.Resampling.LANCZOS
_MARGIN = 4  # source pixels kept around a source box: the resampling kernels reach past its edges
# The camera's defaults are the settings' own, so a caller that leaves them out cannot drift.
_DEFAULT = {
    name: VideoSettings.model_fields[name].default for name in ("motion", "zoom", "pan", "fade_seconds")
}


@dataclass(frozen=True)
class ClipInfo:
    """What was written, for whoever reports it (`storyreel animate` prints it)."""

    path: Path
    width: int
    height: int
    fps: Fraction
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
    """The picture once, in the encoder's colour space, at the resolution the warps sample from.

    Coordinates: the image is cut to the source box's bounding box (plus a margin), the "crop";
    the camera is defined on the box, whose origin in the crop is (box_x, box_y).
    """

    y: np.ndarray  # working-size luma, for the bilinear warp
    u: np.ndarray  # half-size chroma, pre-filtered so the half-size warp does not alias
    v: np.ndarray
    luma: Image.Image | None  # the crop's full-resolution luma, when the output enlarges it
    crop_w: int
    crop_h: int
    box_x: float
    box_y: float
    box_w: float  # the picture (the source box), in which the camera is defined
    box_h: float
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


def _checked_box(box: Box | None, width: int, height: int) -> Box:
    if box is None:
        return (0.0, 0.0, float(width), float(height))
    x0, y0, x1, y1 = (float(c) for c in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"source box {box} is not a rectangle inside the {width}x{height} image")
    return x0, y0, x1, y1


def _prepare_source(rgb: np.ndarray, box: Box, size: tuple[int, int], max_zoom: float) -> _Source:
    """Cut the image to the box (with a margin), convert it to YUV once, and keep what the
    resampling of this clip samples from.

    Enlarging: the crop at full resolution (one resampling per frame, Lanczos). Otherwise
    shrunk once, with area averaging, to the largest scale the clip ever samples at: warping
    straight from a much larger image with bilinear sampling would alias; from this working copy
    the warps only magnify or shrink by at most 1/max_zoom.
    """
    x0, y0, x1, y1 = box
    left, top = max(0, math.floor(x0) - _MARGIN), max(0, math.floor(y0) - _MARGIN)
    right = min(rgb.shape[1], math.ceil(x1) + _MARGIN)
    bottom = min(rgb.shape[0], math.ceil(y1) + _MARGIN)
    crop = rgb[top:bottom, left:right]
    crop_h, crop_w = crop.shape[:2]
    cover = max(size[0] / (x1 - x0), size[1] / (y1 - y0))
    enlarging = cover > 1.0
    need = cover * max_zoom
    work = crop
    if need < 1.0:
        work_size = (max(1, math.ceil(crop_w * need)), max(1, math.ceil(crop_h * need)))
        work = cv2.resize(crop, work_size, interpolation=cv2.INTER_AREA)
    yuv = cv2.transform(work, RGB_TO_YUV709)
    h, w = yuv.shape[:2]
    cw, ch = (w + 1) // 2, (h + 1) // 2
    chroma = cv2.resize(np.ascontiguousarray(yuv[:, :, 1:]), (cw, ch), interpolation=cv2.INTER_AREA)
    luma = np.ascontiguousarray(yuv[:, :, 0])
    return _Source(
        y=luma,
        u=np.ascontiguousarray(chroma[:, :, 0]),
        v=np.ascontiguousarray(chroma[:, :, 1]),
        luma=Image.fromarray(luma) if enlarging else None,
        crop_w=crop_w,
        crop_h=crop_h,
        box_x=x0 - left,
        box_y=y0 - top,
        box_w=x1 - x0,
        box_h=y1 - y0,
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


def _view(
    src: _Source, z: float, ox: float, oy: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """(ax, bx, ay, by): output edge coordinates -> crop edge coordinates, U = a*X + b per axis."""
    cover = max(width / src.box_w, height / src.box_h)
    ax = ay = 1.0 / (cover * z)
    bx = src.box_x + src.box_w / 2 + ox / cover - ax * width / 2
    by = src.box_y + src.box_h / 2 + oy / cover - ay * height / 2
    return ax, bx, ay, by


def _axis(a: float, b: float, out_scale: float, src_scale: float) -> tuple[float, float]:
    """Pixel-index map src = k*dst + o for one axis, from the edge-coordinate map U = a*X + b.

    Pixel i covers [i, i+1) in its own grid; out_scale/src_scale convert chroma grids to luma.
    """
    return a * out_scale * src_scale, (a * out_scale * 0.5 + b) * src_scale - 0.5


def _matrices(src: _Source, view: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Float inverse-warp matrices (output -> working image) for luma and for chroma."""
    work_h, work_w = src.y.shape
    kx, ky = work_w / src.crop_w, work_h / src.crop_h
    ax, bx, ay, by = view[0] * kx, view[1] * kx, view[2] * ky, view[3] * ky
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


def clamp_fade_frames(frames: int, fade_seconds: float, fps: Fraction) -> int:
    """Fades never overlap: each gets at most half the clip."""
    return max(0, min(round(fade_seconds * fps), frames // 2))


# ----------------------------------------------------------------------------------------------
# Rendering


class _FrameRenderer:
    """Owns one I420 buffer whose plane views the resamplings write into directly."""

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
        s, size, half = self.src, (self.width, self.height), (self.width // 2, self.height // 2)
        view = _view(s, z, ox, oy, self.width, self.height)
        luma, chroma = _matrices(s, view)
        if s.luma is not None:
            self.y[...] = np.asarray(s.luma.resize(size, _ENLARGE, box=self._box(view)))
        else:
            cv2.warpAffine(s.y, luma, size, self.y, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        cv2.warpAffine(s.u, chroma, half, self.u, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        cv2.warpAffine(s.v, chroma, half, self.v, _WARP_FLAGS, cv2.BORDER_REPLICATE)
        if level < 1.0:  # fade towards video black: Y -> 16, Cb/Cr -> 128
            cv2.convertScaleAbs(self.y, self.y, level, BLACK_Y * (1.0 - level))
            cv2.convertScaleAbs(self.chroma, self.chroma, level, BLACK_C * (1.0 - level))
        return self.buf

    def _box(self, view: tuple[float, float, float, float]) -> Box:
        """The view as Pillow's float source box; the camera keeps it inside the picture, and
        the clamp only absorbs float rounding at its edges (Pillow refuses a box past them)."""
        ax, bx, ay, by = view
        s = self.src
        return (
            max(0.0, bx),
            max(0.0, by),
            min(float(s.crop_w), ax * self.width + bx),
            min(float(s.crop_h), ay * self.height + by),
        )


def _validate(encoding: VideoEncoding, seconds: float, motion: str, zoom: float, pan: float) -> int:
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; expected one of {', '.join(MOTIONS)}")
    if zoom < 0 or not 0 <= pan < 1:
        raise ValueError(f"zoom must be >= 0 and pan in [0, 1), got zoom={zoom} pan={pan}")
    frames = encoding.frames(seconds)
    if frames < 1:
        raise ValueError(f"{seconds}s at {encoding.rate_label} fps is less than one frame")
    return frames


def render_frames(
    image: Image.Image | np.ndarray,
    encoding: VideoEncoding,
    *,
    seconds: float,
    motion: str = _DEFAULT["motion"],
    zoom: float = _DEFAULT["zoom"],
    pan: float = _DEFAULT["pan"],
    source_box: Box | None = None,
    fade_in: int = 0,
    fade_out: int = 0,
    handles: int = 0,
) -> Iterator[np.ndarray]:
    """The I420 frames of one Ken Burns shot at `encoding`'s size, in order; a clip is these, encoded.

    round(seconds x fps) frames, plus `handles` more at each end: then the move's time base is
    stretched over all of them (the camera keeps moving through the handles, eased as ever, and
    never leaves the picture). The picture is `source_box` of the image (default: all of it),
    cover-fitted (scaled to fill, centre-cropped at sub-pixel precision), never stretched, and
    resampled once. `fade_in`/`fade_out` frames ramp from/to black at the start/end. Arguments
    are checked now, not at the first frame. One buffer is rewritten for every frame: copy a
    frame to keep it past the next.
    """
    if handles < 0:
        raise ValueError(f"handles must be >= 0 frames, got {handles}")
    frames = _validate(encoding, seconds, motion, zoom, pan) + 2 * handles
    rgb = _as_rgb(image)
    box = _checked_box(source_box, rgb.shape[1], rgb.shape[0])
    width, height = encoding.size
    max_zoom = 1.0 + (zoom if motion in ("zoom_in", "zoom_out") else pan)
    renderer = _FrameRenderer(_prepare_source(rgb, box, encoding.size, max_zoom), width, height)
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
    encoding: VideoEncoding,
    *,
    seconds: float,
    motion: str = _DEFAULT["motion"],
    zoom: float = _DEFAULT["zoom"],
    pan: float = _DEFAULT["pan"],
    fade_seconds: float = _DEFAULT["fade_seconds"],
    source_box: Box | None = None,
) -> ClipInfo:
    """Write one Ken Burns clip of round(seconds x fps) frames to `out_path`, encoded as
    `encoding` says (clips/ is H.264 in MP4), fading in from and out to black. The file appears
    under `out_path` only once it is complete.
    """
    started = time.perf_counter()
    frames = _validate(encoding, seconds, motion, zoom, pan)
    fade = clamp_fade_frames(frames, fade_seconds, encoding.fps)
    shot = render_frames(
        image,
        encoding,
        seconds=seconds,
        motion=motion,
        zoom=zoom,
        pan=pan,
        source_box=source_box,
        fade_in=fade,
        fade_out=fade,
    )
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, open_video(tmp, encoding) as enc:
        for frame in shot:
            enc.write(frame)
    return ClipInfo(
        path=out_path,
        width=encoding.width,
        height=encoding.height,
        fps=encoding.fps,
        frames=frames,
        seconds=encoding.seconds(frames),
        motion=motion,
        fade_frames=fade,
        render_seconds=time.perf_counter() - started,
        bytes=out_path.stat().st_size,
    )
