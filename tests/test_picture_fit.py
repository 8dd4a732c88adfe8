"""A person's own picture: upright, sRGB, cover-fitted once; the clip framed from the same pixels."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.bundle.pictures import (
    PictureError,
    check_picture,
    cover_box,
    fit,
    fit_picture,
    load_picture,
)
from pipeline.video.encode import RGB_TO_YUV709, VideoEncoding
from pipeline.video.kenburns import render_frames

from bundles import icc_swapped_red_blue, picture_bytes, png_claiming


def saved(tmp_path: Path, im: Image.Image, name: str, **kw: object) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def disc_picture(w: int, h: int) -> np.ndarray:
    """Grey with a white disc in the middle: any stretch makes it an ellipse."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.full((h, w, 3), 60, np.uint8)
    rgb[(x - w / 2 + 0.5) ** 2 + (y - h / 2 + 0.5) ** 2 < (0.3 * min(w, h)) ** 2] = 255
    return rgb


def extent(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


# ----------------------------------------------------------------------------------------------
# The fit


def test_cover_box_fills_and_centres() -> None:
    assert cover_box(200, 100, 64, 48) == pytest.approx((100 - 200 / 3, 0, 100 + 200 / 3, 100))
    assert cover_box(100, 200, 64, 48) == pytest.approx((0, 62.5, 100, 137.5))
    assert cover_box(128, 96, 64, 48) == (0, 0, 128, 96)
    with pytest.raises(ValueError):
        cover_box(0, 10, 64, 48)


@pytest.mark.parametrize("size", [(400, 100), (100, 400), (160, 120), (30, 20)])
def test_never_stretched(size: tuple[int, int]) -> None:
    """A circle stays a circle whatever the picture's shape, enlarged or reduced."""
    png = np.asarray(fit(disc_picture(*size), 96, 72).image())
    assert png.shape == (72, 96, 3)
    w, h = extent(png[..., 0] > 160)
    assert abs(w - h) <= 1, (w, h)


def test_png_is_one_lanczos_resampling_of_the_centre() -> None:
    """Where the crop falls on whole pixels the PNG is Pillow's crop-then-resize, except that
    at the cut edges the filter also reads the pixels beyond them (one resampling of the
    picture itself, not of a cut-out): equal inside, within a few levels at the two edges."""
    rgb = np.asarray(Image.open(io.BytesIO(picture_bytes(96, 64))).convert("RGB"))
    fitted = fit(rgb, 48, 48)
    assert fitted.box == (16, 0, 80, 64)
    expected = Image.fromarray(rgb).crop((16, 0, 80, 64)).resize((48, 48), Image.Resampling.LANCZOS)
    got, want = np.asarray(fitted.image()).astype(int), np.asarray(expected).astype(int)
    assert np.array_equal(got[:, 4:-4], want[:, 4:-4])
    assert np.abs(got - want).max() <= 4


def test_fit_picture_reads_and_fits(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.fromarray(disc_picture(300, 100)), "a.png")
    img = fit_picture(path, 64, 48).image()
    assert img.size == (64, 48) and img.mode == "RGB"


# ----------------------------------------------------------------------------------------------
# Orientation, colour, odd modes


def marked(w: int = 60, h: int = 40) -> Image.Image:
    """Dark, with a red block in the stored top-left corner."""
    rgb = np.full((h, w, 3), 30, np.uint8)
    rgb[:8, :8] = (255, 0, 0)
    return Image.fromarray(rgb)


@pytest.mark.parametrize(
    ("orientation", "shape", "corner"),
    [(1, (40, 60), "tl"), (3, (40, 60), "br"), (6, (60, 40), "tr"), (8, (60, 40), "bl"), (2, (40, 60), "tr")],
)
def test_exif_orientation_is_honoured(tmp_path: Path, orientation: int, shape: tuple, corner: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = saved(tmp_path, marked(), "a.jpg", quality=95, exif=exif)
    rgb = load_picture(path)
    assert rgb.shape[:2] == shape
    h, w = shape
    corners = {"tl": rgb[2, 2], "tr": rgb[2, w - 3], "bl": rgb[h - 3, 2], "br": rgb[h - 3, w - 3]}
    red = [k for k, v in corners.items() if v[0] > 180 and v[1] < 80]
    assert red == [corner]
    assert (check_picture(path).width, check_picture(path).height) == (w, h)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF", "WEBP"])
def test_colour_profile_is_converted_to_srgb(tmp_path: Path, fmt: str) -> None:
    """Tagged with a profile whose red is sRGB's blue, (200, 30, 30) is a blue."""
    im = Image.new("RGB", (16, 16), (200, 30, 30))
    kw = {"quality": 98} if fmt in ("JPEG", "WEBP") else {}
    path = saved(tmp_path, im, f"a.{fmt.lower()}", format=fmt, icc_profile=icc_swapped_red_blue(), **kw)
    r, g, b = (int(v) for v in load_picture(path)[8, 8])
    assert b > 170 and r < 60 and g < 60, (r, g, b)
    assert check_picture(path).icc_profile
    untagged = saved(tmp_path, im, f"plain.{fmt.lower()}", format=fmt, **kw)
    assert tuple(int(v) for v in load_picture(untagged)[8, 8]) == pytest.approx((200, 30, 30), abs=6)


def test_broken_colour_profile_is_refused(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.new("RGB", (8, 8)), "a.png", icc_profile=b"\x00\x00\x01\x00nonsense" * 20)
    with pytest.raises(PictureError, match="has a colour profile that cannot be converted to sRGB"):
        check_picture(path)


def test_transparency_is_composited_over_black(tmp_path: Path) -> None:
    path = saved(tmp_path, Image.new("RGBA", (8, 8), (200, 100, 50, 128)), "a.png")
    assert tuple(int(v) for v in load_picture(path)[4, 4]) == pytest.approx((100, 50, 25), abs=2)
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 250, 20, 20] + [0] * 762)
    assert tuple(int(v) for v in load_picture(saved(tmp_path, pal, "p.png"))[0, 0]) == (250, 20, 20)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535, 1000]], np.uint16)
    path = saved(tmp_path, Image.fromarray(arr), "a.png")
    assert load_picture(path)[0, :, 0].tolist() == [0, 128, 255, 4]


# ----------------------------------------------------------------------------------------------
# What is refused


def test_pictures_over_pillows_pixel_limit_are_refused_by_their_header(tmp_path: Path) -> None:
    """A PNG claiming 10000x10000 over a few bytes: refused before any pixel is decoded."""
    path = tmp_path / "big.png"
    path.write_bytes(png_claiming(10000, 10000))
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(PictureError) as err:
        check_picture(path)
    assert str(err.value) == (
        "is 10000x10000 = 100000000 pixels, over Pillow's limit of 89478485 pixels "
        "(PIL.Image.MAX_IMAGE_PIXELS)"
    )
    path.write_bytes(png_claiming(20000, 20000))  # past twice the limit Pillow itself refuses to open it
    with pytest.raises(
        PictureError, match=r"^is over Pillow's limit of 89478485 pixels \(PIL.Image.MAX_IMAGE_PIXELS\): "
    ):
        check_picture(path)


def test_pixel_limit_is_pillows_as_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = saved(tmp_path, Image.new("RGB", (40, 30)), "a.png")
    check_picture(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(PictureError, match="limit of 1000 pixels"),
    ):
        check_picture(path)


def test_only_everyday_formats_are_opened(tmp_path: Path) -> None:
    """EPS is a picture to Pillow (through Ghostscript, a program): not to storyreel."""
    path = tmp_path / "a.png"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    assert Image.open(path).format == "EPS"  # the threat is real
    with pytest.raises(PictureError, match=r"^is not a picture storyreel reads \(PNG, JPEG"):
        check_picture(path)


def test_truncated_picture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(picture_bytes(400, 300, "JPEG", quality=95)[:2000])
    with pytest.raises(PictureError, match="damaged or truncated"):
        check_picture(path)


# ----------------------------------------------------------------------------------------------
# The clip: framed from the original pixels, as the PNG is


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.transform(np.ascontiguousarray(rgb), RGB_TO_YUV709)[..., 0].astype(np.float64)


def first_frame_luma(source: np.ndarray, w: int, h: int) -> np.ndarray:
    enc = VideoEncoding(width=w, height=h, fps=Fraction(1), crf=18, preset="ultrafast")
    frame = next(render_frames(source, enc, seconds=1.0, zoom=0.0))
    return frame[:h].astype(np.float64)


@pytest.mark.parametrize(("video_w", "video_h"), [(96, 72), (72, 72), (96, 54)])
def test_clip_frames_what_the_png_shows(video_w: int, video_h: int) -> None:
    """The clip's resting frame from `clip_source` matches the PNG cover-fitted to the clip's
    size (as a generated scene's clip is), within resampling differences; the whole picture,
    given to the renderer instead, frames something else."""
    y, x = np.mgrid[0:400, 0:1000]
    rgb = np.dstack([(x * 255 // 999), (y * 255 // 399), ((x // 50 + y // 50) % 2) * 255]).astype(np.uint8)
    fitted = fit(rgb, 96, 72)
    png = np.asarray(fitted.image())
    want = luma(np.asarray(fit(png, video_w, video_h).image()))
    got = first_frame_luma(fitted.clip_source(video_w, video_h), video_w, video_h)
    assert np.abs(got - want).mean() < 6.0, np.abs(got - want).mean()
    if (video_w, video_h) == (96, 54):  # here the whole picture's 16:9 cover is a different part of it
        whole = first_frame_luma(rgb, video_w, video_h)
        assert np.abs(whole - want).mean() > 3 * np.abs(got - want).mean()


def test_clip_source_is_a_view_of_the_original_pixels() -> None:
    rgb = disc_picture(1000, 400)
    fitted = fit(rgb, 96, 72)
    src = fitted.clip_source(96, 72)
    assert np.shares_memory(src, rgb)  # no copy, no resampling
    assert (
        src.shape[0] == 400 and abs(src.shape[1] - 1600 / 3) < 1
    )  # 4:3 of 1000x400: the middle 533.3 columns
    assert fitted.clip_box(96, 72) == pytest.approx(fitted.box)
