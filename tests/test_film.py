"""The film: clips joined in order, crossfades that really are blends, exact frame counts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline.film import FilmInfo, join_clips, probe_clip
from pipeline.kenburns import render_clip

W, H, FPS = 128, 96, 12
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def flat_clip(folder: Path, name: str, colour: tuple[int, int, int], seconds: float) -> Path:
    """A constant-colour clip (no fades), so every frame of it is the same known colour."""
    path = folder / f"{name}.mp4"
    image = np.full((H, W, 3), colour, np.uint8)
    render_clip(
        image, path, width=W, height=H, fps=FPS, seconds=seconds, fade_seconds=0.0, preset="ultrafast"
    )
    return path


def centre_colours(path: Path) -> np.ndarray:
    """Mean colour of the central region of every frame, frames x 3."""
    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader]
    return np.array([f[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0) for f in frames])


def film(clips: list[Path], out: Path, crossfade_seconds: float) -> FilmInfo:
    return join_clips(
        clips,
        out,
        width=W,
        height=H,
        fps=FPS,
        crossfade_seconds=crossfade_seconds,
        crf=18,
        preset="ultrafast",
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "red": flat_clip(d, "red", RED, 1.0),  # 12 frames
        "blue": flat_clip(d, "blue", BLUE, 1.5),  # 18 frames
        "green": flat_clip(d, "green", GREEN, 1.0),  # 12 frames
    }


def test_frame_count_is_sum_minus_crossfades(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"], clips["green"]], out, 0.25)  # 3 frames
    assert info.crossfade_frames == 3 and not info.crossfade_clamped
    assert info.frames == 12 + 18 + 12 - 2 * 3
    probe = probe_clip(out)
    assert probe.frames == info.frames
    assert (probe.codec, probe.pix_fmt, probe.width, probe.height, probe.fps) == (
        "h264",
        "yuv420p",
        W,
        H,
        FPS,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["film.mp4"], "temp file left behind"


def test_crossfade_frames_are_blends_of_the_neighbours(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"]], out, 0.5)  # 6 crossfade frames
    colours = centre_colours(out)
    assert len(colours) == info.frames == 12 + 18 - 6
    np.testing.assert_allclose(colours[5], RED, atol=4)  # last frame before the crossfade
    np.testing.assert_allclose(colours[12], BLUE, atol=4)  # first frame after it
    red, blue = colours[5], colours[12]  # as decoded; YUV->RGB rounding still leaves ~2-3 levels
    weights = []
    for i in range(6, 12):
        a = (colours[i, 0] - blue[0]) / (red[0] - blue[0])  # share of the previous clip, from red
        np.testing.assert_allclose(colours[i], a * red + (1 - a) * blue, atol=4)
        weights.append(a)
    assert all(0.05 < a < 0.95 for a in weights), f"crossfade frames must mix both clips: {weights}"
    assert all(np.diff(weights) < 0), f"the previous clip must fade out steadily: {weights}"
    np.testing.assert_allclose(colours[8], (4 / 7) * red + (3 / 7) * blue, atol=4)  # (j+1)/(n+1) weights


def test_zero_crossfade_is_a_hard_cut(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"]], out, 0.0)
    colours = centre_colours(out)
    assert info.crossfade_frames == 0 and len(colours) == info.frames == 30
    np.testing.assert_allclose(colours[11], RED, atol=4)
    np.testing.assert_allclose(colours[12], BLUE, atol=4)


def test_one_clip_film_is_the_clip(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["blue"]], out, 0.5)
    assert info.copied and info.frames == 18 == probe_clip(out).frames
    assert out.read_bytes() == clips["blue"].read_bytes()


def test_crossfade_is_clamped_to_half_the_shortest_clip(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"], clips["green"]], out, 5.0)  # asks for 60 frames
    assert info.requested_crossfade_frames == 60
    assert info.crossfade_clamped and info.crossfade_frames == 6  # half of the 12-frame clips
    assert info.frames == probe_clip(out).frames == 12 + 18 + 12 - 2 * 6


def test_mismatched_clip_size_is_refused(tmp_path: Path, clips: dict[str, Path]) -> None:
    other = tmp_path / "other.mp4"
    image = np.zeros((48, 64, 3), np.uint8)
    render_clip(image, other, width=64, height=48, fps=FPS, seconds=0.5, preset="ultrafast")
    with pytest.raises(ValueError, match="64x48"):
        film([clips["red"], other], tmp_path / "film.mp4", 0.25)
    assert not (tmp_path / "film.mp4").exists()


def test_no_clips_or_unreadable_clip_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        film([], tmp_path / "film.mp4", 0.5)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        film([junk, junk], tmp_path / "film.mp4", 0.5)


def test_film_plays_in_ffmpeg_without_errors(tmp_path: Path, clips: dict[str, Path]) -> None:
    out = tmp_path / "film.mp4"
    film([clips["red"], clips["green"]], out, 0.25)
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
