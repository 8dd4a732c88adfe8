"""Contact sheet: a readable JPEG grid with one captioned thumbnail per scene."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import structlog
from PIL import Image

from pipeline import contactsheet
from pipeline.contactsheet import make_contact_sheet

THUMB = 120


def scene_image(seed: int, w: int = 256, h: int = 192) -> Image.Image:
    """A saturated, busy picture, unmistakable against the white page."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(arr).resize((w, h), Image.Resampling.NEAREST)


def cells(sheet: np.ndarray, rows: int, cols: int) -> list[np.ndarray]:
    """Split the page into equal grid cells (all images here share one aspect, so rows are equal)."""
    h, w = sheet.shape[:2]
    return [
        sheet[r * h // rows : (r + 1) * h // rows, c * w // cols : (c + 1) * w // cols]
        for r in range(rows)
        for c in range(cols)
    ]


def test_grid_of_captioned_thumbnails(tmp_path: Path) -> None:
    png = tmp_path / "scene_002.png"
    scene_image(2).save(png)
    items: list[tuple[Path | Image.Image, int, str]] = [
        (scene_image(1), 1, "Mara walks into the silver forest at dawn."),
        (png, 2, "The ravens follow her — one of them speaks."),
        (scene_image(3), 3, "A very long description " * 20),
        (scene_image(4), 4, "Zürich, déjà vu, “quotes” and an em dash — all drawable."),
        (scene_image(5), 5, "Short."),
    ]
    out = tmp_path / "contact_sheet.jpg"
    make_contact_sheet(items, out, thumb_width=THUMB, columns=3)

    with Image.open(out) as img:
        assert img.format == "JPEG"
        sheet = np.asarray(img.convert("RGB")).astype(np.int16)
    h, w = sheet.shape[:2]
    thumb_h = THUMB * 192 // 256
    assert 3 * THUMB < w < 3 * THUMB + 100, f"width {w} does not fit 3 columns of {THUMB}"
    assert 2 * thumb_h + 2 * 20 < h < 2 * (thumb_h + 120), f"height {h} does not fit 2 rows"
    assert np.all(sheet[:3, :3] > 240), "background should be white"

    grid = cells(sheet, rows=2, cols=3)
    for i, cell in enumerate(grid[:5]):
        colourful_rows = np.flatnonzero(((cell.max(axis=2) - cell.min(axis=2)) > 60).mean(axis=1) > 0.3)
        assert len(colourful_rows) > 0.8 * thumb_h, f"cell {i}: no thumbnail"
        caption = cell[colourful_rows.max() + 3 :]  # everything under the picture
        dark_text = caption.max(axis=2) < 100
        assert dark_text.sum() > 30, f"cell {i}: no caption text under the thumbnail"
    assert np.all(grid[5] > 235), "the unused sixth cell should be blank page"


def test_long_captions_stay_inside_their_column(tmp_path: Path) -> None:
    items: list[tuple[Path | Image.Image, int, str]] = [
        (scene_image(i), i, "Supercalifragilistic " * 30 + "end") for i in range(2)
    ]
    out = tmp_path / "sheet.jpg"
    make_contact_sheet(items, out, thumb_width=THUMB, columns=2)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    w = sheet.shape[1]
    gutter = sheet[:, w // 2 - 2 : w // 2 + 2]  # between the columns
    assert gutter.min() > 225, "caption text ran into the next column"


def test_default_columns_make_a_roughly_square_grid(tmp_path: Path) -> None:
    items: list[tuple[Path | Image.Image, int, str]] = [(scene_image(i), i, f"scene {i}") for i in range(9)]
    out = tmp_path / "sheet.jpg"
    make_contact_sheet(items, out, thumb_width=64)
    w, h = Image.open(out).size
    assert 3 * 64 < w < 4 * 64 and h > 3 * 48


def test_written_atomically_and_refuses_nothing_to_show(tmp_path: Path) -> None:
    out = tmp_path / "sheet.jpg"
    with pytest.raises(ValueError):
        make_contact_sheet([], out)
    assert list(tmp_path.iterdir()) == []
    make_contact_sheet([(scene_image(0), 1, "one")], out, thumb_width=64)
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.jpg"]


# -- title and scripts beyond Latin ----------------------------------------------------------------------
def cjk_font_installed() -> bool:
    """Asked of the system, not of the code under test: is there a font that draws CJK?"""
    if shutil.which("fc-list"):
        out = subprocess.run(["fc-list", ":lang=ja", "file"], capture_output=True, text=True).stdout
        return bool(out.strip())
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".local/share/fonts"]
    return any(any(root.rglob("*CJK*")) for root in roots if root.is_dir())


needs_cjk_font = pytest.mark.skipif(
    not cjk_font_installed(), reason="no CJK font here: apt-get install fonts-noto-cjk (CI installs it)"
)


def sheet_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).astype(np.int16)


def caption_band(sheet: np.ndarray) -> np.ndarray:
    """The page under the (single) thumbnail: where its caption is."""
    colourful = np.flatnonzero(((sheet.max(axis=2) - sheet.min(axis=2)) > 60).mean(axis=1) > 0.3)
    return sheet[colourful.max() + 3 :]


@needs_cjk_font
def test_cjk_captions_are_drawn_not_replaced_by_question_marks(tmp_path: Path) -> None:
    def sheet(description: str) -> np.ndarray:
        out = tmp_path / f"{len(description)}-{ord(description[0])}.jpg"
        make_contact_sheet([(scene_image(1), 1, description)], out, thumb_width=THUMB)
        return caption_band(sheet_pixels(out))

    cjk, fallback = sheet("灯台守の夜"), sheet("?????")
    assert (cjk.max(axis=2) < 100).sum() > 30, "no caption text"
    differ = np.abs(cjk - fallback).max(axis=2) > 100
    assert differ.sum() > 30, "CJK text was drawn as the '?' fallback"


def test_emoji_are_drawn_by_a_font_that_has_them(tmp_path: Path) -> None:
    outs = []
    for text in ("sun ☀ smile 😀", "sun ? smile ?"):
        outs.append(tmp_path / f"{len(outs)}.jpg")
        make_contact_sheet([(scene_image(1), 1, text)], outs[-1], thumb_width=THUMB)
    emoji, fallback = (caption_band(sheet_pixels(p)) for p in outs)
    assert (np.abs(emoji - fallback).max(axis=2) > 100).sum() > 20, "emoji drawn as '?'"


def test_characters_no_font_has_are_never_dropped_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(contactsheet, "_FACES", ())  # a system with no fonts installed at all
    with structlog.testing.capture_logs() as logs:
        make_contact_sheet([(scene_image(1), 1, "灯台 and 🌊")], tmp_path / "s.jpg", title="夜")
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1, logs
    text = str(warnings[0])
    assert "灯" in text and "台" in text and "夜" in text and "🌊" in text
    assert "fonts-noto-cjk" in text and "fonts-symbola" in text


def title_band(sheet: np.ndarray) -> np.ndarray:
    """The page above the first thumbnail."""
    colourful = np.flatnonzero(((sheet.max(axis=2) - sheet.min(axis=2)) > 60).mean(axis=1) > 0.3)
    return sheet[: colourful.min()]


def test_the_title_heads_the_page(tmp_path: Path) -> None:
    items: list[tuple[Path | Image.Image, int, str]] = [(scene_image(i), i, f"scene {i}") for i in range(3)]
    make_contact_sheet(items, tmp_path / "titled.jpg", thumb_width=THUMB, title="The Lighthouse Keeper")
    make_contact_sheet(items, tmp_path / "plain.jpg", thumb_width=THUMB)
    titled, plain = sheet_pixels(tmp_path / "titled.jpg"), sheet_pixels(tmp_path / "plain.jpg")
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    assert (title_band(titled).max(axis=2) < 100).sum() > 100, "no title text above the thumbnails"
    assert (title_band(plain).max(axis=2) < 100).sum() == 0


@needs_cjk_font
def test_a_cjk_title_is_drawn_not_replaced_by_question_marks(tmp_path: Path) -> None:
    def band(title: str) -> np.ndarray:
        out = tmp_path / f"{ord(title[0])}.jpg"
        make_contact_sheet([(scene_image(1), 1, "one")], out, thumb_width=THUMB, title=title)
        return title_band(sheet_pixels(out))

    cjk, fallback = band("灯台守の夜"), band("?????")
    assert (cjk.max(axis=2) < 100).sum() > 50, "no title text"
    assert cjk.shape == fallback.shape
    assert (np.abs(cjk - fallback).max(axis=2) > 100).sum() > 50, "CJK title drawn as '?'"
