"""Delivery sizes, exact frame rates, BT.709 and master clips: every file decoded back and checked."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from streams import colour_tags, decode_rgb, decode_yuv420, probe

from pipeline.settings import ConfigError, VideoSettings, settings_from_dict
from pipeline.video.encode import RGB_TO_YUV709, VideoEncoding, video_encoding
from pipeline.video.film import FilmScene, make_film
from pipeline.video.framerate import frame_rate_json, parse_frame_rate
from pipeline.video.kenburns import render_clip, render_frames
from pipeline.video.master import handle_frames, master_name, write_master_clip

from conftest import storyreel, write_config

NTSC_FILM = Fraction(24000, 1001)
BT709 = {"range": "tv", "matrix": "bt709", "primaries": "bt709", "transfer": "bt709"}


def encoding(width: int, height: int, fps: Fraction, **kw: Any) -> VideoEncoding:
    v = VideoSettings()
    return VideoEncoding(
        **{"width": width, "height": height, "fps": fps, "crf": v.crf, "preset": v.preset, **kw}
    )


def detailed(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A card with detail at every scale: fine noise, thin lines, a sine grating."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    grating = 60 * np.sin(x * 0.9) * np.sin(y * 0.7)
    lines = np.where((x % 17 == 0) | (y % 23 == 0), 70, 0)
    return (
        np.clip(128 + grating + lines + rng.normal(0, 20, (h, w)), 0, 255)
        .astype(np.uint8)[:, :, None]
        .repeat(3, 2)
    )


def disc(w: int, h: int, r: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 255, np.uint8)
    img[(x + 0.5 - w / 2) ** 2 + (y + 0.5 - h / 2) ** 2 < r * r] = 0
    return img


def dark_extent(luma: np.ndarray) -> tuple[float, float]:
    """Sub-pixel (width, height) of the dark region, by coverage sums over limited-range luma."""
    dark = np.clip((235.0 - luma.astype(np.float64)) / 219.0, 0, 1)
    return dark.sum(axis=1).max(), dark.sum(axis=0).max()


def luma_of(frame: np.ndarray, height: int) -> np.ndarray:
    return frame[:height]


# ----------------------------------------------------------------------------------------------
# Frame rates


@pytest.mark.parametrize(
    ("given", "rate"),
    [
        (24, Fraction(24)),
        (25.0, Fraction(25)),
        ("30", Fraction(30)),
        (120, Fraction(120)),
        ("24000/1001", NTSC_FILM),
        (23.976, NTSC_FILM),
        ("23.976", NTSC_FILM),
        (29.97, Fraction(30000, 1001)),
        ("60000/1001", Fraction(60000, 1001)),
        (59.94, Fraction(60000, 1001)),
    ],
)
def test_frame_rates_are_read_as_exact_fractions(given: object, rate: Fraction) -> None:
    assert parse_frame_rate(given) == rate
    assert VideoSettings(fps=given).fps == rate  # type: ignore[arg-type]


@pytest.mark.parametrize("given", [0, 121, -24, 23.98, 24.5, "25000/1001", "abc", "", True, None, [24]])
def test_other_rates_are_refused_naming_the_forms(given: object) -> None:
    with pytest.raises(ValueError, match="24000/1001"):
        parse_frame_rate(given)


def test_config_and_manifest_write_the_rate_as_people_do(tmp_path: Path) -> None:
    ntsc = settings_from_dict({"video": {"fps": "24000/1001"}}, tmp_path)
    assert ntsc.video.fps == NTSC_FILM
    dumped = json.loads(json.dumps(ntsc.video.model_dump()))  # how the manifest writes [video]
    assert dumped["fps"] == "24000/1001" and json.loads(ntsc.video.model_dump_json())["fps"] == "24000/1001"
    assert settings_from_dict({"video": {"fps": 23.976}}, tmp_path).video.fps == NTSC_FILM
    whole = settings_from_dict({}, tmp_path).video
    assert whole.model_dump()["fps"] == 24 and isinstance(whole.model_dump()["fps"], int)
    assert VideoSettings.model_validate(ntsc.video.model_dump()).fps == NTSC_FILM  # a dump reads back
    assert frame_rate_json(Fraction(30000, 1001)) == "30000/1001"
    with pytest.raises(ConfigError, match=r"video\.fps: must be an integer 1-120"):
        settings_from_dict({"video": {"fps": 23.98}}, tmp_path)


@pytest.mark.parametrize(
    ("fps", "seconds", "frames"),
    [
        (Fraction(24), 1.0, 24),
        (Fraction(25), 0.5, 12),
        (NTSC_FILM, 5.0, 120),
        (Fraction(30000, 1001), 0.7, 21),
    ],
)
def test_clips_have_the_exact_rate_and_the_rounded_frame_count(
    tmp_path: Path, fps: Fraction, seconds: float, frames: int
) -> None:
    assert frames == round(seconds * fps)
    out = tmp_path / "clip.mp4"
    info = render_clip(detailed(96, 64), out, encoding(96, 64, fps), seconds=seconds)
    stream = probe(out)
    assert (stream.rate, stream.frames, info.frames, info.fps) == (fps, frames, frames, fps)
    assert info.seconds == pytest.approx(float(frames / fps))


# ----------------------------------------------------------------------------------------------
# Sizes


def test_the_encoding_is_built_from_the_settings_in_one_place() -> None:
    v = VideoSettings(crf=20, preset="faster", fps="30000/1001")  # type: ignore[arg-type]
    own = video_encoding(v, (1344, 768))
    assert (own.size, own.fps, own.crf, own.preset, own.codec) == (
        (1344, 768),
        Fraction(30000, 1001),
        20,
        "faster",
        "h264",
    )
    hd = video_encoding(VideoSettings(width=1920, height=1080), (1344, 768))
    assert hd.size == (1920, 1080) and hd.preset == VideoSettings().preset == "veryfast"
    assert video_encoding(VideoSettings(), (1023, 767)).size == (1022, 766)  # made even
    assert video_encoding(VideoSettings(width=1920, height=1080), (1344, 768), size=(640, 360)).size == (
        640,
        360,
    )
    with pytest.raises(ValueError, match="even"):
        encoding(1919, 1080, Fraction(24))


@pytest.mark.parametrize("fps", [Fraction(24), Fraction(25), NTSC_FILM])
def test_a_16_9_picture_is_delivered_at_1920x1080_exactly(tmp_path: Path, fps: Fraction) -> None:
    """Clip, film and master from a 1344x768 picture: 1920x1080, BT.709, the exact rate."""
    enc = encoding(1920, 1080, fps, preset="ultrafast")
    picture = Image.fromarray(detailed(1344, 768))
    clip = render_clip(picture, tmp_path / "clip.mp4", enc, seconds=0.3, fade_seconds=0.0)
    film = make_film(
        [FilmScene(picture, 0.3), FilmScene(picture, 0.3, "pan_left")],
        tmp_path / "film.mp4",
        enc,
        fade_seconds=0.0,
        crossfade_seconds=0.1,
    )
    master = write_master_clip(
        picture, tmp_path / "m.mp4", enc, seconds=0.3, motion="zoom_in", zoom=0.12, pan=0.1, handles=2
    )
    for path, frames in ((clip.path, clip.frames), (film.path, film.frames), (master.path, master.frames)):
        stream = probe(path)
        assert (stream.width, stream.height, stream.rate, stream.frames) == (1920, 1080, fps, frames), path
        assert colour_tags(path) == BT709, path


def test_enlarged_frames_keep_the_picture_s_detail() -> None:
    """A 1080p frame from a 1344x768 card is at least as sharp as a plain bicubic upscale of the
    same crop (variance of the Laplacian); bilinear sampling would be softer."""
    card = detailed(1344, 768)
    enc = encoding(1920, 1080, Fraction(24))
    frame = next(render_frames(card, enc, seconds=1.0, motion="zoom_in"))  # z = 1: the cover crop itself
    ours = frame[:1080].astype(np.float64)
    crop_h = 1344 * 1080 / 1920  # cover fit by the width: 1344 x 756 of the card
    top = round((768 - crop_h) / 2)
    luma = cv2.transform(card[top : top + round(crop_h)], RGB_TO_YUV709)[:, :, 0]
    bicubic = cv2.resize(luma, (1920, 1080), interpolation=cv2.INTER_CUBIC).astype(np.float64)
    pil_bicubic = np.asarray(Image.fromarray(luma).resize((1920, 1080), Image.Resampling.BICUBIC), np.float64)
    bilinear = cv2.resize(luma, (1920, 1080), interpolation=cv2.INTER_LINEAR).astype(np.float64)

    def sharpness(a: np.ndarray) -> float:
        return float(cv2.Laplacian(a, cv2.CV_64F).var())

    assert np.abs(ours - bicubic).mean() < 6, "not the same crop of the card"
    assert sharpness(ours) >= sharpness(bicubic) >= sharpness(pil_bicubic) > sharpness(bilinear) * 1.2


def test_cover_fit_from_a_source_box_never_stretches() -> None:
    """A provided picture (here 400x200 with a square box) is cropped, not squashed, into 16:9."""
    image = np.full((200, 400, 3), (200, 30, 30), np.uint8)  # red outside the box
    inside = disc(160, 160, 40)
    image[20:180, 200:360] = inside
    enc = encoding(320, 180, Fraction(24))
    frames = [f.copy() for f in render_frames(image, enc, seconds=0.25, source_box=(200, 20, 360, 180))]
    for k, f in enumerate(frames):
        y = luma_of(f, 180)
        width, height = dark_extent(y)
        assert width == pytest.approx(height, rel=0.03), "the disc must stay round"
        if k in (0, len(frames) - 1):  # cover fit by the box's width, then the zoom
            assert width == pytest.approx(80 * 320 / 160 * (1.12 if k else 1.0), rel=0.02)
        cr = f.reshape(-1)[320 * 180 * 5 // 4 :].reshape(90, 160).astype(np.float64)
        assert cr[:, 2:-2].max() < 132, "nothing from outside the source box shows (its red would raise Cr)"
        assert cr.max() < 160, "past the box only what the resampling kernel reaches at its very edge"
    with pytest.raises(ValueError, match="source box"):
        render_frames(image, enc, seconds=0.25, source_box=(300, 0, 500, 100))


# ----------------------------------------------------------------------------------------------
# Colour


def test_colour_card_values_survive_the_round_trip(tmp_path: Path) -> None:
    """Flat patches through H.264: stored as BT.709 limited-range YUV, decoded back to the card's
    RGB with BT.709, and visibly not with BT.601 (so the check can tell the two apart)."""
    patches = [(235, 40, 40), (40, 200, 60), (40, 60, 220), (128, 128, 128), (224, 172, 140), (250, 230, 40)]
    card = np.zeros((96, 64 * len(patches), 3), np.uint8)
    for i, colour in enumerate(patches):
        card[:, i * 64 : (i + 1) * 64] = colour
    out = tmp_path / "card.mp4"
    enc = encoding(card.shape[1], 96, Fraction(24))
    render_clip(card, out, enc, seconds=0.25, zoom=0.0, fade_seconds=0.0)
    assert colour_tags(out) == BT709
    y, cb, cr = decode_yuv420(out, card.shape[1], 96)[1]
    expected = cv2.transform(np.array([patches], np.uint8), RGB_TO_YUV709)[0]
    rgb709, rgb601 = decode_rgb(out, "bt709")[1], decode_rgb(out, "bt470bg")[1]
    for i, colour in enumerate(patches):
        centre = (slice(32, 64), slice(i * 64 + 16, i * 64 + 48))
        half = (slice(16, 32), slice(i * 32 + 8, i * 32 + 24))
        stored = np.array([y[centre].mean(), cb[half].mean(), cr[half].mean()])
        np.testing.assert_allclose(stored, expected[i], atol=1.5, err_msg=f"patch {colour} stored")
        np.testing.assert_allclose(
            rgb709[centre].reshape(-1, 3).mean(0), colour, atol=3, err_msg=f"patch {colour}"
        )
        if i in (0, 1, 2):  # saturated primaries: BT.601 decoding is off by far more than the tolerance
            assert np.abs(rgb601[centre].reshape(-1, 3).mean(0) - colour).max() >= 3 * 3


# ----------------------------------------------------------------------------------------------
# Master clips


def test_handles_are_at_least_half_a_crossfade() -> None:
    assert handle_frames(Fraction(24), 12) == 12  # half a second
    assert handle_frames(Fraction(24), 48) == 24  # half the crossfade
    assert handle_frames(NTSC_FILM, 25) == 13
    assert handle_frames(Fraction(1), 0) == 1


def test_a_master_clip_is_clean_with_moving_handles(tmp_path: Path) -> None:
    fps, seconds, h = Fraction(12), 2.0, 6
    enc = encoding(128, 96, fps)
    image = disc(128, 96, 20)
    master = write_master_clip(
        image,
        tmp_path / master_name("scene_001", enc),
        enc,
        seconds=seconds,
        motion="zoom_in",
        zoom=0.3,
        pan=0.1,
        handles=h,
    )
    assert (master.frames, master.scene_frames, master.handles) == (24 + 2 * h, 24, h)
    frames = decode_yuv420(master.path, 128, 96)
    assert len(frames) == master.frames == probe(master.path).frames
    means = [f[0].mean() for f in frames]
    assert min(means) > 180, "no fades: the first and last frames are the picture, not black"
    # The camera moves through the handles: the disc grows all the way, no frame held.
    raw = [luma_of(f, 96).copy() for f in render_frames(image, enc, seconds=seconds, zoom=0.3, handles=h)]
    widths = [dark_extent(f)[0] for f in raw]
    assert len(raw) == master.frames
    assert all(b > a for a, b in itertools.pairwise(widths[1:])), widths
    assert widths[h] - widths[h - 1] > 0.05 and widths[-h] - widths[-h - 1] > 0.05, (
        "moving at the edit points"
    )
    # The scene part is the clip's picture (to within the stretched time base).
    clip = render_clip(image, tmp_path / "clip.mp4", enc, seconds=seconds, zoom=0.3, fade_seconds=0.0)
    clip_frames = decode_yuv420(clip.path, 128, 96)
    middle = h + clip.frames // 2
    assert np.abs(frames[middle][0].astype(float) - clip_frames[clip.frames // 2][0]).mean() < 2.0


@pytest.mark.parametrize(
    ("codec", "name", "pix"), [("prores", "prores", "yuv422p10le"), ("dnxhr", "dnxhd", "yuv422p")]
)
def test_masters_in_an_editing_codec(tmp_path: Path, codec: str, name: str, pix: str) -> None:
    enc = encoding(256, 144, NTSC_FILM).for_master(codec)  # type: ignore[arg-type]
    path = tmp_path / master_name("scene_001", enc)
    assert path.suffix == ".mov"
    info = write_master_clip(
        detailed(256, 144), path, enc, seconds=0.25, motion="pan_left", zoom=0.1, pan=0.1, handles=3
    )
    stream = probe(path)
    assert (stream.codec, stream.pix_fmt, stream.rate, stream.frames) == (name, pix, NTSC_FILM, info.frames)
    assert info.frames == round(0.25 * NTSC_FILM) + 6
    assert colour_tags(path) == BT709
    with pytest.raises(ValueError, match=r"\.mov file"):
        write_master_clip(
            detailed(256, 144),
            tmp_path / "x.mp4",
            enc,
            seconds=0.25,
            motion="zoom_in",
            zoom=0.1,
            pan=0.1,
            handles=3,
        )


def test_master_names_follow_the_codec() -> None:
    base = encoding(64, 48, Fraction(24))
    assert [master_name("scene_007", base.for_master(c)) for c in ("h264", "prores", "dnxhr")] == [
        "scene_007.mp4",
        "scene_007.mov",
        "scene_007.mov",
    ]
    assert math.isclose(base.seconds(36), 1.5)


# ----------------------------------------------------------------------------------------------
# storyreel animate


@pytest.mark.parametrize(
    ("given", "rate"), [("24000/1001", NTSC_FILM), ("29.97", Fraction(30000, 1001)), ("25", Fraction(25))]
)
def test_animate_takes_every_rate_form(tmp_path: Path, given: str, rate: Fraction) -> None:
    Image.fromarray(detailed(96, 64)).save(tmp_path / "in.png")
    res = storyreel("animate", "in.png", "out.mp4", "--seconds", "0.5", "--fps", given, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    stream = probe(tmp_path / "out.mp4")
    assert (stream.rate, stream.frames) == (rate, round(0.5 * rate))
    assert res.stdout == f"out.mp4: 96x64, {round(0.5 * rate)} frames at {frame_rate_json(rate)} fps\n"


def test_animate_refuses_other_rates_in_one_line(tmp_path: Path) -> None:
    Image.fromarray(detailed(96, 64)).save(tmp_path / "in.png")
    res = storyreel("animate", "in.png", "out.mp4", "--fps", "23.98", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--fps 23.98: must be an integer 1-120, or 24000/1001" in res.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_animate_size_is_the_options_else_the_config_s_else_the_image_s(tmp_path: Path) -> None:
    Image.fromarray(detailed(96, 64)).save(tmp_path / "in.png")
    cfg = write_config(tmp_path / "c.toml", {"video": {"width": 160, "height": 90, "fps": "24000/1001"}})
    configured = storyreel(
        "animate", "in.png", "a.mp4", "--seconds", "0.25", "--config", str(cfg), cwd=tmp_path
    )
    assert configured.returncode == 0, configured.stderr
    stream = probe(tmp_path / "a.mp4")
    assert (stream.width, stream.height, stream.rate) == (160, 90, NTSC_FILM)
    given = storyreel(
        "animate", "in.png", "b.mp4", "--seconds", "0.25", "--width", "64", "--config", str(cfg), cwd=tmp_path
    )
    assert given.returncode == 0, given.stderr
    assert (probe(tmp_path / "b.mp4").width, probe(tmp_path / "b.mp4").height) == (64, 90)
    own = storyreel("animate", "in.png", "c.mp4", "--seconds", "0.25", cwd=tmp_path)
    assert own.returncode == 0 and (probe(tmp_path / "c.mp4").width, probe(tmp_path / "c.mp4").height) == (
        96,
        64,
    )
