"""Ken Burns at delivery sizes: time per clip at 1024x768, 1920x1080 and 3840x2160 (each against
our own 1024x768 and against ffmpeg's zoompan at the same size), and sharpness of an enlarged
frame against a plain bicubic upscale. Rows for bench/kenburns.py (`--sizes` prints them alone).

The 16:9 sizes are made from a 1344x768 picture (SDXL's 16:9 bucket), 1024x768 from a 1024x768
one, as a story would. zoompan is ffmpeg's own Ken Burns: an integer crop box per frame scaled by
swscale (bicubic), encoded with the same libx264 settings; it jitters (the crop box snaps to
whole pixels) but it is the fast baseline people reach for.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import cv2
import imageio_ffmpeg
import numpy as np
from PIL import Image

from pipeline.settings import VideoSettings
from pipeline.video.encode import RGB_TO_YUV709, VideoEncoding
from pipeline.video.kenburns import render_clip, render_frames
from pipeline.video.master import write_master_clip

SIZES = [((1024, 768), (1024, 768)), ((1920, 1080), (1344, 768)), ((3840, 2160), (1344, 768))]


@dataclass
class SizeRow:
    size: tuple[int, int]
    source: tuple[int, int]
    ours: float  # best render_clip wall time
    ours_cpu: float
    zoompan: float  # best ffmpeg zoompan wall time, same size, frames and encoder settings
    zoompan_cpu: float


def detail_card(width: int = 1344, height: int = 768, seed: int = 0) -> np.ndarray:
    """Detail at every scale: fine noise, a sine grating near the pixel pitch, thin lines."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    grating = 60 * np.sin(x * 0.9) * np.sin(y * 0.7)
    lines = np.where((x % 17 == 0) | (y % 23 == 0), 70, 0)
    grey = np.clip(128 + grating + lines + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8)
    return np.dstack([grey] * 3)


def encoding(size: tuple[int, int], fps: int) -> VideoEncoding:
    v = VideoSettings()
    return VideoEncoding(width=size[0], height=size[1], fps=Fraction(fps), crf=v.crf, preset=v.preset)


def _zoompan(image: Path, out: Path, size: tuple[int, int], fps: int, frames: int, zoom: float) -> None:
    v = VideoSettings()
    zp = (
        f"zoompan=z='1+{zoom}*on/{frames - 1}':x='iw/2-(iw/zoom/2)':y='ih/2-(ih/zoom/2)'"
        f":d={frames}:s={size[0]}x{size[1]}:fps={fps}"
    )
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(image), "-vf", zp,
        "-frames:v", str(frames), "-c:v", "libx264", "-crf", str(v.crf), "-preset", v.preset,
        "-pix_fmt", "yuv420p", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def size_rows(
    pictures: dict[tuple[int, int], Image.Image], tmp: Path, seconds: float, fps: int, runs: int, clock: type
) -> list[SizeRow]:
    """Best of `runs` for ours and zoompan at each size, interleaved so load elsewhere hits both."""
    zoom = VideoSettings().zoom
    rows = []
    for size, source in SIZES:
        picture = pictures[source]
        png = tmp / f"source_{source[0]}x{source[1]}.png"
        picture.save(png)
        enc, frames = encoding(size, fps), round(seconds * fps)
        ours: list[tuple[float, float]] = []
        theirs: list[tuple[float, float]] = []
        for _ in range(runs):
            with clock() as cpu:
                info = render_clip(picture, tmp / "ours.mp4", enc, seconds=seconds, motion="zoom_in")
            ours.append((info.render_seconds, cpu.seconds))
            with clock() as cpu:
                t0 = time.perf_counter()
                _zoompan(png, tmp / "zoompan.mp4", size, fps, frames, zoom)
                wall = time.perf_counter() - t0
            theirs.append((wall, cpu.seconds))
        best_ours, best_theirs = min(ours), min(theirs)  # by wall time, with that run's CPU seconds
        rows.append(SizeRow(size, source, *best_ours, *best_theirs))
    return rows


def print_size_rows(rows: list[SizeRow], seconds: float, fps: int, runs: int) -> None:
    v = VideoSettings()
    base = rows[0].ours
    print(
        f"\nKen Burns at delivery sizes, {seconds:g} s at {fps} fps, zoom_in, crf {v.crf} {v.preset}; "
        f"best of {runs}\n"
    )
    print("| size (from) | storyreel s | vs 1024x768 | zoompan s | storyreel / zoompan | CPU s ours / zp |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r.size[0]}x{r.size[1]} (from {r.source[0]}x{r.source[1]})"
        print(
            f"| {size} | {r.ours:.2f} | {r.ours / base:.2f}x | {r.zoompan:.2f} | {r.ours / r.zoompan:.2f}x "
            f"| {r.ours_cpu:.2f} / {r.zoompan_cpu:.2f} |"
        )


def sharpness_rows() -> list[tuple[str, float]]:
    """Variance of the Laplacian of the luma of a 1920x1080 frame from the 1344x768 card: our first
    zoom_in frame (z = 1, the cover crop itself) against upscales of that same crop."""
    card = detail_card()
    frame = next(render_frames(card, encoding((1920, 1080), 24), seconds=1.0, motion="zoom_in"))
    ours = frame[:1080]
    top = round((768 - 1344 * 1080 / 1920) / 2)  # cover fit by the width: 1344x756 of the card
    luma = cv2.transform(card[top : top + 756], RGB_TO_YUV709)[:, :, 0]

    def var(a: np.ndarray) -> float:
        return float(cv2.Laplacian(a.astype(np.float64), cv2.CV_64F).var())

    hd = (1920, 1080)
    return [
        ("storyreel (Lanczos, one resampling from the full picture)", var(ours)),
        ("bicubic upscale, OpenCV INTER_CUBIC", var(cv2.resize(luma, hd, interpolation=cv2.INTER_CUBIC))),
        ("bicubic upscale, Pillow BICUBIC", var(np.asarray(Image.fromarray(luma).resize(hd, Image.BICUBIC)))),
        ("bilinear upscale (the warp's kernel)", var(cv2.resize(luma, hd, interpolation=cv2.INTER_LINEAR))),
    ]


def print_sharpness(rows: list[tuple[str, float]]) -> bool:
    ours, bicubic = rows[0][1], max(v for _, v in rows[1:3])
    ok = ours >= bicubic
    print("\n| 1920x1080 frame from a 1344x768 detailed card | variance of Laplacian | vs ours |")
    print("|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.0f} | {value / ours:.3f} |")
    print(f"\nsharpness target (ours >= every bicubic upscale): {'PASS' if ok else 'FAIL'}")
    return ok


def master_rows(picture: Image.Image, tmp: Path, seconds: float, fps: int, clock: type) -> None:
    """One 1920x1080 master clip (half-second handles) per codec: time, CPU and size on disk."""
    base = encoding((1920, 1080), fps)
    print(f"\n| 1920x1080 master, {seconds:g} s + 2 x 0.5 s handles | s | CPU s | MB |")
    print("|---|---|---|---|")
    for codec in ("h264", "dnxhr", "prores"):
        enc = base.for_master(codec)  # type: ignore[arg-type]
        out = tmp / f"master{enc.suffix}"
        with clock() as cpu:
            info = write_master_clip(
                picture,
                out,
                enc,
                seconds=seconds,
                motion="zoom_in",
                zoom=0.12,
                pan=0.1,
                handles=round(fps / 2),
            )
        print(f"| {codec} | {info.render_seconds:.2f} | {cpu.seconds:.2f} | {out.stat().st_size / 1e6:.1f} |")
