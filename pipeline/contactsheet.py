"""A one-page overview of a story: every scene's image as a thumbnail with its caption.

Meant to be glanced at by a person deciding whether a story came out right, so it
favours legibility: white page, dark text, aspect-true thumbnails, captions cut at
a word boundary with an ellipsis rather than clipped mid-glyph.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pipeline.fsutil import atomic_writer

__all__ = ["make_contact_sheet"]

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_FRAME = (200, 200, 200)
_CAPTION_LINES = 2
_ELLIPSIS = "…"
# Typographic characters the fallback font may lack, and plain stand-ins that it has.
_ASCII = {"—": "-", "–": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...", "\u00a0": " "}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class _Layout:
    columns: int
    thumb_w: int
    row_image_h: tuple[int, ...]  # tallest thumbnail per row, so one tall image stretches one row only
    caption_h: int
    gap: int
    pad: int
    line_h: int

    @property
    def size(self) -> tuple[int, int]:
        rows = len(self.row_image_h)
        return (
            self.columns * self.thumb_w + (self.columns + 1) * self.gap,
            sum(self.row_image_h) + rows * (self.caption_h + self.gap) + self.gap,
        )

    def cell(self, index: int) -> tuple[int, int, int]:
        """(x, y, image area height) of the cell for item `index`."""
        col, row = index % self.columns, index // self.columns
        y = self.gap + sum(self.row_image_h[:row]) + row * (self.caption_h + self.gap)
        return self.gap + col * (self.thumb_w + self.gap), y, self.row_image_h[row]


@lru_cache(maxsize=8)
def _font(size: int) -> Font:
    """A full Unicode font where the system has one; Pillow's embedded font otherwise.

    Pillow's scalable default covers little beyond ASCII, so an em dash or an accent in
    a description would otherwise print as a box.
    """
    for name in ("DejaVuSans.ttf", "LiberationSans-Regular.ttf", "Arial.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=4096)
def _has_glyph(font: Font, char: str) -> bool:
    """True unless `char` renders as the font's 'missing glyph' box."""
    if char.isspace() or char.isascii():
        return True
    missing = font.getmask("\U0010fffd")
    mask = font.getmask(char)
    return (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def _printable(text: str, font: Font) -> str:
    """Swap characters the font cannot draw for close plain ones (é -> e, — -> -)."""
    out = []
    for char in " ".join(text.split()):
        if _has_glyph(font, char):
            out.append(char)
            continue
        plain = _ASCII.get(char) or unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
        out.append(plain or "?")
    return "".join(out)


def _wrap(text: str, font: Font, width: int, lines: int) -> list[str]:
    """Greedy word wrap into at most `lines` lines; the last one ends in an ellipsis if cut."""
    words = text.split(" ")
    result: list[str] = []
    while words and len(result) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        result.append(line)
    if words or (result and font.getlength(result[-1]) > width):
        result[-1] = _ellipsize(result[-1], font, width)
    return result


def _ellipsize(line: str, font: Font, width: int) -> str:
    ellipsis = _ELLIPSIS if _has_glyph(font, _ELLIPSIS) else "..."
    while line and font.getlength(line + ellipsis) > width:
        cut = line.rsplit(" ", 1)[0] if " " in line else line[:-1]
        line = cut.rstrip(" ,;:-—")
    return line + ellipsis


def _caption(scene: int, description: str, font: Font, width: int) -> list[str]:
    dash = "—" if _has_glyph(font, "—") else "-"
    return _wrap(_printable(f"Scene {scene} {dash} {description.strip()}", font), font, width, _CAPTION_LINES)


def _thumbnail(source: Path | Image.Image, thumb_w: int) -> Image.Image:
    """Aspect-true thumbnail `thumb_w` wide; big JPEGs are decoded at reduced size directly."""
    if isinstance(source, Image.Image):
        return _shrink(source, thumb_w)
    with Image.open(source) as img:
        img.draft("RGB", (thumb_w, max(1, thumb_w * img.height // max(1, img.width))))
        return _shrink(img, thumb_w)


def _shrink(img: Image.Image, thumb_w: int) -> Image.Image:
    rgb = img.convert("RGB")
    thumb_h = max(1, round(thumb_w * rgb.height / rgb.width))
    return rgb.resize((thumb_w, thumb_h), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _layout(thumbs: list[Image.Image], thumb_w: int, columns: int | None, line_h: int) -> _Layout:
    n = len(thumbs)
    cols = max(1, min(n, columns if columns else math.ceil(math.sqrt(n))))
    pad = max(4, thumb_w // 40)
    return _Layout(
        columns=cols,
        thumb_w=thumb_w,
        row_image_h=tuple(max(t.height for t in thumbs[r : r + cols]) for r in range(0, n, cols)),
        caption_h=2 * pad + _CAPTION_LINES * line_h,
        gap=max(8, thumb_w // 20),
        pad=pad,
        line_h=line_h,
    )


def make_contact_sheet(
    items: list[tuple[Path | Image.Image, int, str]],
    out_path: Path,
    *,
    thumb_width: int = 320,
    columns: int | None = None,
) -> None:
    """Write a JPEG grid of (image, scene number, description) items, in the order given.

    Columns default to a roughly square grid. The file appears under `out_path` only once
    it is completely written.
    """
    if not items:
        raise ValueError("a contact sheet needs at least one item")
    if thumb_width < 16:
        raise ValueError(f"thumb_width must be at least 16, got {thumb_width}")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    font = _font(max(10, round(thumb_width / 20)))
    ascent, descent = font.getmetrics() if isinstance(font, ImageFont.FreeTypeFont) else (11, 3)
    thumbs = [_thumbnail(source, thumb_width) for source, _, _ in items]
    layout = _layout(thumbs, thumb_width, columns, line_h=round((ascent + descent) * 1.15))
    sheet = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for index, (thumb, (_, scene, description)) in enumerate(zip(thumbs, items, strict=True)):
        x, y, image_h = layout.cell(index)
        top = y + image_h - thumb.height  # bottom-aligned: each caption sits right under its image
        sheet.paste(thumb, (x, top))
        draw.rectangle((x - 1, top - 1, x + thumb.width, top + thumb.height), outline=_FRAME)
        text_y = y + image_h + layout.pad
        for line in _caption(scene, description, font, thumb_width):
            draw.text((x, text_y), line, font=font, fill=_TEXT)
            text_y += layout.line_h
    out_path = Path(out_path)
    with atomic_writer(out_path) as fh:
        sheet.save(fh, format="JPEG", quality=90, subsampling=0, optimize=True)  # 4:4:4 keeps text crisp
