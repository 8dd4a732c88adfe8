"""Ken Burns clips: real MP4s decoded back and checked for format, fades, geometry and smoothness."""

from __future__ import annotations

import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from pipeline.settings import MOTIONS, VideoSettings
from pipeline.video.encode import VideoEncoding
from pipeline.video.kenburns import ClipInfo, render_clip

JITTER_TOOL = Path(__file__).resolve().parents[2] / "shared/tools/jitter.py"
W, H, FPS = 256, 192, 12


def stream_line(path: Path) -> str:
    """The video stream as ffmpeg itself describes it (codec, pixel format, size)."""
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True
    )
    lines = [line for line in proc.stderr.splitlines() if "Video:" in line]
    assert lines, proc.stderr
    return lines[0]


def decode(path: Path) -> np.ndarray:
    """All frames as RGB, frames x H x W x 3."""
    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    return np.stack([np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader])


def textured(w: int = 320, h: int = 240, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 128 + 60 * np.sin(x / 13.0) * np.cos(y / 9.0)
    return np.clip(base[:, :, None] + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)


def disc(w: int, h: int, r: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """White background, one black disc (centred unless told)."""
    cx, cy = centre or (w / 2, h / 2)
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 255, np.uint8)
    img[(x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2 < r * r] = 0
    return img


def dark_box(frame: np.ndarray) -> tuple[float, float, float, float]:
    """Sub-pixel extent of the dark region via coverage sums: (width, height, centre x, centre y)."""
    dark = 1.0 - frame[:, :, 1].astype(np.float64) / 255.0
    cols, rows = dark.sum(axis=0), dark.sum(axis=1)  # dark coverage per column / per row
    cx = (cols * np.arange(len(cols))).sum() / cols.sum()
    cy = (rows * np.arange(len(rows))).sum() / rows.sum()
    return rows.max(), cols.max(), cx, cy  # the longest row is the width, the longest column the height


_ENCODING_KEYS = ("width", "height", "fps", "crf", "preset")


def encoding(**kw: Any) -> VideoEncoding:
    """The settings' crf and preset at the tests' size and rate, unless told otherwise."""
    v = VideoSettings()
    args: dict[str, Any] = {"width": W, "height": H, "fps": Fraction(FPS), "crf": v.crf, "preset": v.preset}
    return VideoEncoding(**{**args, **kw})


def clip(tmp_path: Path, image: np.ndarray | Image.Image, name: str = "clip.mp4", **kw: Any) -> ClipInfo:
    enc = encoding(**{k: v for k, v in kw.items() if k in _ENCODING_KEYS})
    args: dict[str, Any] = {"seconds": 1.0, **{k: v for k, v in kw.items() if k not in _ENCODING_KEYS}}
    return render_clip(image, tmp_path / name, enc, **args)


def test_clip_is_h264_yuv420p_with_the_promised_frames(tmp_path: Path) -> None:
    info = clip(tmp_path, textured(), seconds=1.5)
    out = tmp_path / "clip.mp4"
    line = stream_line(out)
    assert "h264" in line and "yuv420p" in line and f"{W}x{H}" in line, line
    assert "bt709" in line, "untagged streams are decoded with different matrices by different players"
    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == info.frames == round(1.5 * FPS)
    assert (info.width, info.height, info.fps) == (W, H, FPS)
    assert info.seconds == pytest.approx(1.5)
    assert info.bytes == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"], "temp file left behind"


def test_fades_from_and_to_black_and_bright_in_between(tmp_path: Path) -> None:
    grey = np.full((H, W, 3), 200, np.uint8)
    info = clip(tmp_path, grey, seconds=2.0, fade_seconds=0.5)
    frames = decode(tmp_path / "clip.mp4").astype(np.float64)
    means = frames.mean(axis=(1, 2, 3))
    assert info.fade_frames == 6
    assert means[0] < 5 and means[-1] < 5
    assert abs(means[len(means) // 2] - 200) < 4
    ramp = means[: info.fade_frames + 1]
    assert np.all(np.diff(ramp) > 0), f"fade-in is not a steady ramp: {ramp}"
    assert np.all(np.diff(means[-info.fade_frames - 1 :]) < 0)


def test_fades_are_clamped_so_they_never_overlap(tmp_path: Path) -> None:
    grey = np.full((H, W, 3), 200, np.uint8)
    info = clip(tmp_path, grey, seconds=0.5, fade_seconds=2.0)  # 6 frames, fades asked for 24 each
    assert info.frames == 6 and info.fade_frames == 3
    means = decode(tmp_path / "clip.mp4").mean(axis=(1, 2, 3))
    assert means[0] < 5 and means[-1] < 5
    assert means.max() > 100, "a clamped fade must still reach a visible picture"


@pytest.mark.parametrize("motion", ["zoom_in", "pan_right"])
def test_no_aspect_distortion_when_the_image_aspect_differs(tmp_path: Path, motion: str) -> None:
    # Square source into a 4:3 clip: cover-fit must crop, not squash, so the disc stays round.
    info = clip(tmp_path, disc(300, 300, 40), motion=motion, fade_seconds=0.0)
    frames = decode(tmp_path / "clip.mp4")
    scale = W / 300  # cover fit of a square into a wider frame is set by the width
    for i in (0, info.frames // 2, info.frames - 1):
        width, height, _, _ = dark_box(frames[i])
        assert width == pytest.approx(height, rel=0.03), f"frame {i}: disc {width:.1f} x {height:.1f}"
        assert width >= 80 * scale * 0.97


def test_zoom_in_is_centred_and_magnifies_by_the_zoom_factor(tmp_path: Path) -> None:
    info = clip(tmp_path, disc(W, H, 30), zoom=0.2, fade_seconds=0.0)
    frames = decode(tmp_path / "clip.mp4")
    first, last = dark_box(frames[0]), dark_box(frames[info.frames - 1])
    assert first[2] == pytest.approx(W / 2 - 0.5, abs=0.3) and first[3] == pytest.approx(H / 2 - 0.5, abs=0.3)
    assert last[2] == pytest.approx(W / 2 - 0.5, abs=0.3) and last[3] == pytest.approx(H / 2 - 0.5, abs=0.3)
    assert last[0] / first[0] == pytest.approx(1.2, rel=0.02)
    assert last[1] / first[1] == pytest.approx(1.2, rel=0.02)


@pytest.mark.parametrize("motion", MOTIONS)
def test_each_motion_moves_the_picture_the_named_way(tmp_path: Path, motion: str) -> None:
    spot = disc(W, H, 12, centre=(W / 2 - 40, H / 2 - 30))
    info = clip(tmp_path, spot, motion=motion, zoom=0.2, pan=0.2, fade_seconds=0.0, seconds=0.5)
    frames = decode(tmp_path / "clip.mp4")
    _, _, x0, y0 = dark_box(frames[0])
    _, _, x1, y1 = dark_box(frames[info.frames - 1])
    dx, dy = x1 - x0, y1 - y0  # how the content moves on screen
    expected = {
        "zoom_in": (dx < -3 and dy < -3),  # off-centre content moves outwards
        "zoom_out": (dx > 3 and dy > 3),
        "pan_right": (dx < -20 and abs(dy) < 0.5),  # camera goes right, content goes left
        "pan_left": (dx > 20 and abs(dy) < 0.5),
        "pan_down": (dy < -15 and abs(dx) < 0.5),
        "pan_up": (dy > 15 and abs(dx) < 0.5),
    }[motion]
    assert expected, f"{motion}: content moved by ({dx:.1f}, {dy:.1f})"


def test_pan_travels_the_configured_fraction_of_the_frame(tmp_path: Path) -> None:
    info = clip(tmp_path, disc(W, H, 10), motion="pan_left", pan=0.1, fade_seconds=0.0)
    frames = decode(tmp_path / "clip.mp4")
    x0, x1 = dark_box(frames[0])[2], dark_box(frames[info.frames - 1])[2]
    assert x1 - x0 == pytest.approx(0.1 * W, abs=0.5)


def test_accepts_pil_grey_and_rgba_input(tmp_path: Path) -> None:
    rgb = textured(64, 48)
    rgba = np.dstack([rgb, np.full((48, 64), 255, np.uint8)])
    images: list[np.ndarray | Image.Image] = [Image.fromarray(rgb), rgb[:, :, 0], rgba]
    for i, image in enumerate(images):
        info = clip(tmp_path, image, name=f"{i}.mp4", width=64, height=48, seconds=0.25)
        assert info.frames == 3


def test_big_image_is_area_filtered_not_aliased(tmp_path: Path) -> None:
    # A 1-pixel checkerboard averages to grey; sampled without filtering it would be noise/moire.
    y, x = np.mgrid[0:960, 0:1280]
    checker = np.where((x + y) % 2 == 0, 255, 0).astype(np.uint8)
    clip(tmp_path, np.dstack([checker] * 3), fade_seconds=0.0, seconds=0.25)
    frame = decode(tmp_path / "clip.mp4")[1].astype(np.float64)
    assert abs(frame.mean() - 127.5) < 6 and frame.std() < 8


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"width": 255}, "even"),
        ({"height": 191}, "even"),
        ({"motion": "spin"}, "unknown motion"),
        ({"seconds": 0.01}, "less than one frame"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(
    tmp_path: Path, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        clip(tmp_path, textured(), **kw)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_encode_leaves_nothing_under_the_final_name(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="ffmpeg"):
        clip(tmp_path, textured(), preset="no-such-preset")
    assert (tmp_path / "clip.mp4").read_bytes() == b"previous", "old file must survive a failed render"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_module_imports_without_torch() -> None:
    heavy = "('torch', 'diffusers')"
    code = f"import sys, pipeline.video.kenburns; sys.exit(int(any(m in sys.modules for m in {heavy})))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(not JITTER_TOOL.is_file(), reason=f"jitter tool not found at {JITTER_TOOL}")
def test_motion_is_smooth_on_the_dot_card(tmp_path: Path) -> None:
    card = tmp_path / "card.png"
    subprocess.run([sys.executable, str(JITTER_TOOL), "make", str(card)], check=True)
    out = tmp_path / "card.mp4"
    render_clip(
        Image.open(card),
        out,
        encoding(width=512, height=384, fps=Fraction(24)),
        seconds=3.0,
        fade_seconds=0.25,
    )
    proc = subprocess.run(
        [sys.executable, str(JITTER_TOOL), "measure", str(out)], capture_output=True, text=True, check=True
    )
    jitter, travel = (
        float(re.findall(rf"{key}=([\d.]+)", proc.stdout)[0]) for key in ("jitter_px", "travel_px")
    )
    assert travel > 10, f"the dots hardly moved, the measurement means nothing: {proc.stdout}"
    assert jitter <= 0.05, proc.stdout
