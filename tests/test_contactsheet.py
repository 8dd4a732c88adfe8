"""Contact sheet: a readable JPEG grid with one captioned thumbnail per scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
