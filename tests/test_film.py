"""The film: scenes in order, crossfades that really are blends of pictures, exact frame counts."""

from __future__ import annotations

import subprocess
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from pipeline.video.encode import VideoEncoding
from pipeline.video.film import FilmInfo, FilmScene, make_film
from pipeline.video.kenburns import render_clip

from media import probe_clip

W, H, FPS = 128, 96, 12
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)
ENCODING = VideoEncoding(width=W, height=H, fps=Fraction(FPS), crf=18, preset="ultrafast")


def flat(colour: tuple[int, int, int], seconds: float) -> FilmScene:
    """A constant-colour scene, so every frame of it (unfaded) is the same known colour."""
    return FilmScene(np.full((H, W, 3), colour, np.uint8), seconds)


def centre_colours(path: Path) -> np.ndarray:
    """Mean colour of the central region of every frame, frames x 3."""
    reader = imageio_ffmpeg.read_frames(str(path))
    w, h = next(reader)["size"]
    frames = [np.frombuffer(raw, np.uint8).reshape(h, w, 3) for raw in reader]
    return np.array([f[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0) for f in frames])


def film(scenes: list[FilmScene], out: Path, crossfade_seconds: float, fade_seconds: float = 0.0) -> FilmInfo:
    return make_film(scenes, out, ENCODING, fade_seconds=fade_seconds, crossfade_seconds=crossfade_seconds)


@pytest.fixture(scope="module")
def clips() -> dict[str, FilmScene]:
    return {
        "red": flat(RED, 1.0),  # 12 frames
        "blue": flat(BLUE, 1.5),  # 18 frames
        "green": flat(GREEN, 1.0),  # 12 frames
    }


def test_frame_count_is_sum_minus_crossfades(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
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


def test_crossfade_frames_are_blends_of_the_neighbours(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
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


def test_zero_crossfade_is_a_hard_cut(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"]], out, 0.0)
    colours = centre_colours(out)
    assert info.crossfade_frames == 0 and len(colours) == info.frames == 30
    np.testing.assert_allclose(colours[11], RED, atol=4)
    np.testing.assert_allclose(colours[12], BLUE, atol=4)


def test_one_scene_film_is_the_scene_s_clip(tmp_path: Path) -> None:
    image = np.full((H, W, 3), BLUE, np.uint8)
    clip = tmp_path / "clip.mp4"
    render_clip(image, clip, ENCODING, seconds=1.5, fade_seconds=0.25)
    out = tmp_path / "film.mp4"
    info = film([FilmScene(image, 1.5)], out, 0.5, fade_seconds=0.25)
    assert info.frames == 18 == probe_clip(out).frames and info.crossfade_frames == 0
    np.testing.assert_allclose(centre_colours(out), centre_colours(clip), atol=2)


def test_only_the_film_s_own_ends_fade_to_black(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"]], out, 0.5, fade_seconds=0.25)  # 3 fade frames
    colours = centre_colours(out)
    assert info.fade_frames == 3 and len(colours) == 24
    assert colours[0].max() < 20 and colours[-1].max() < 20, "first and last frames are black"
    np.testing.assert_allclose(colours[3], RED, atol=4)  # faded in
    np.testing.assert_allclose(colours[-4], BLUE, atol=4)  # not yet fading out
    brightness = colours.sum(axis=1)
    cut = brightness[3:-3]
    assert cut.min() >= min(sum(RED), sum(BLUE)) - 12, f"the crossfade dips: {brightness.round()}"


def test_crossfade_is_clamped_to_half_the_shortest_clip(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
    out = tmp_path / "film.mp4"
    info = film([clips["red"], clips["blue"], clips["green"]], out, 5.0)  # asks for 60 frames
    assert info.requested_crossfade_frames == 60
    assert info.crossfade_clamped and info.crossfade_frames == 6  # half of the 12-frame clips
    assert info.frames == probe_clip(out).frames == 12 + 18 + 12 - 2 * 6


def test_scenes_of_any_image_size_are_cover_fitted(tmp_path: Path) -> None:
    odd = FilmScene(np.full((37, 203, 3), GREEN, np.uint8), 0.5)
    out = tmp_path / "film.mp4"
    info = film([odd, flat(RED, 0.5)], out, 0.0)
    probe = probe_clip(out)
    assert (probe.width, probe.height, probe.frames) == (W, H, info.frames) == (W, H, 12)


def test_no_scenes_or_unreadable_image_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        film([], tmp_path / "film.mp4", 0.5)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        film([FilmScene(junk, 1.0), FilmScene(junk, 1.0)], tmp_path / "film.mp4", 0.5)
    assert not (tmp_path / "film.mp4").exists()


def test_film_plays_in_ffmpeg_without_errors(tmp_path: Path, clips: dict[str, FilmScene]) -> None:
    out = tmp_path / "film.mp4"
    film([clips["red"], clips["green"]], out, 0.25)
    proc = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(out), "-f", "null", "-"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
