"""A one-page overview of a story: every scene's image as a thumbnail with its caption, then
the cast (a picture of each character, captioned with the name) when there is one.

Meant to be glanced at by a person deciding whether a story came out right, so it
favours legibility: white page, dark text, aspect-true thumbnails, captions cut at
a word boundary with an ellipsis rather than clipped mid-glyph.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from pathlib import Path

import structlog
from PIL import Image, ImageDraw, ImageFont

from pipeline.fsutil import atomic_writer

__all__ = ["make_contact_sheet"]

log = structlog.get_logger("storyreel")

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_FRAME = (200, 200, 200)
_CAPTION_LINES = 2
_TITLE_LINES = 2
_TITLE_SCALE = 1.6  # title size over caption size
_ELLIPSIS = "…"
# Typographic characters the fallback font may lack, and plain stand-ins that it has.
_ASCII = {"—": "-", "–": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...", "\u00a0": " "}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class _Face:
    """A font the sheet draws with when the system has it, and the Debian package providing it."""

    files: tuple[str, ...]  # file names, found by Pillow in the system's font folders
    family: str  # for fontconfig, when the file goes by another name
    package: str


# Tried in order for every character: the first face that has its glyph draws it.
_FACES = (
    _Face(("DejaVuSans.ttf",), "DejaVu Sans", "fonts-dejavu-core"),  # Latin, Greek, Cyrillic, symbols
    _Face(("LiberationSans-Regular.ttf", "Arial.ttf"), "Liberation Sans", "fonts-liberation"),
    _Face(("NotoSansCJK-Regular.ttc", "NotoSansCJKjp-Regular.otf"), "Noto Sans CJK JP", "fonts-noto-cjk"),
    _Face(("Symbola_hint.ttf", "Symbola.ttf"), "Symbola", "fonts-symbola"),  # emoji, other symbols
)


@dataclass(frozen=True)
class _Layout:
    columns: int
    thumb_w: int
    row_image_h: tuple[int, ...]  # tallest thumbnail per row, so one tall image stretches one row only
    caption_h: int
    gap: int
    pad: int
    line_h: int
    title_h: int  # the band above the grid; 0 without a title

    @property
    def size(self) -> tuple[int, int]:
        rows = len(self.row_image_h)
        return (
            self.columns * self.thumb_w + (self.columns + 1) * self.gap,
            self.title_h + sum(self.row_image_h) + rows * (self.caption_h + self.gap) + self.gap,
        )

    def cell(self, index: int) -> tuple[int, int, int]:
        """(x, y, image area height) of the cell for item `index`."""
        col, row = index % self.columns, index // self.columns
        y = self.title_h + self.gap + sum(self.row_image_h[:row]) + row * (self.caption_h + self.gap)
        return self.gap + col * (self.thumb_w + self.gap), y, self.row_image_h[row]


def _font_file(face: _Face) -> str | None:
    """Where the face is installed: by file name in the usual folders, else by asking fontconfig."""
    for name in face.files:
        try:
            ImageFont.truetype(name, 10)  # Pillow searches the XDG font folders for a bare file name
            return name
        except OSError:
            continue
    if shutil.which("fc-list") is None:  # no fontconfig (a minimal container): the names above only
        return None
    try:
        out = subprocess.run(
            ["fc-list", "--format", "%{file}\n", f":family={face.family}"],
            capture_output=True,
            text=True,
            timeout=10,
            start_new_session=True,  # a Ctrl-C meant for the daemon is not meant for its helpers
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line for line in out.splitlines() if line.strip()), None)


@cache
def _installed(faces: tuple[_Face, ...]) -> tuple[tuple[_Face, str], ...]:
    """The faces this system has, with their files; looked up once per process."""
    return tuple((face, file) for face in faces if (file := _font_file(face)) is not None)


@lru_cache(maxsize=32)
def _open(file: str | None, size: int) -> Font:
    """One font object per file and size, so the glyph cache below keeps its answers across sheets."""
    return ImageFont.truetype(file, size) if file else ImageFont.load_default(size=size)


@lru_cache(maxsize=4096)
def _has_glyph(font: Font, char: str) -> bool:
    """True unless `char` renders as the font's 'missing glyph' box."""
    if char.isspace():
        return True
    if not isinstance(font, ImageFont.FreeTypeFont):
        return char.isascii()
    missing = font.getmask("\U0010fffd")
    mask = font.getmask(char)
    return (mask.size, bytes(mask)) != (missing.size, bytes(missing))


def _package_for(char: str) -> str:
    """The package whose font would draw `char`, for the warning when none here does."""
    if unicodedata.category(char) == "So":
        return "fonts-symbola"
    if unicodedata.east_asian_width(char) in ("W", "F"):
        return "fonts-noto-cjk"
    return "fonts-dejavu-core"


class _Fonts:
    """The installed faces at one size, as one font: each character is drawn by the first face that
    has its glyph, on a shared baseline. Pillow's own font comes last, so something always draws.

    Characters no face has become plain stand-ins (é -> e) or '?', and are remembered in `missing`
    so the sheet can say so: text is never dropped silently.
    """

    def __init__(self, size: int) -> None:
        self.fonts: list[Font] = [_open(file, size) for _, file in _installed(_FACES)]
        self.fonts.append(_open(None, size))
        metrics = [f.getmetrics() if isinstance(f, ImageFont.FreeTypeFont) else (11, 3) for f in self.fonts]
        self.ascent = max(a for a, _ in metrics)
        self.height = self.ascent + max(d for _, d in metrics)
        self.missing: set[str] = set()

    def font_for(self, char: str) -> Font | None:
        return next((f for f in self.fonts if _has_glyph(f, char)), None)

    def has(self, char: str) -> bool:
        return self.font_for(char) is not None

    def printable(self, text: str) -> str:
        """Swap characters no font can draw for close plain ones (é -> e, — -> -), or '?'."""
        out = []
        for char in " ".join(text.split()):
            if self.has(char):
                out.append(char)
                continue
            self.missing.add(char)
            plain = _ASCII.get(char) or unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            out.append(plain if plain and all(self.has(c) for c in plain) else "?")
        return "".join(out)

    def _runs(self, text: str) -> list[tuple[str, Font]]:
        runs: list[tuple[str, Font]] = []
        for char in text:
            font = self.font_for(char) or self.fonts[-1]
            if runs and runs[-1][1] is font:
                runs[-1] = (runs[-1][0] + char, font)
            else:
                runs.append((char, font))
        return runs

    def getlength(self, text: str) -> float:
        return sum(font.getlength(run) for run, font in self._runs(text))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
        x, y = xy
        for run, font in self._runs(text):
            if isinstance(font, ImageFont.FreeTypeFont):
                draw.text((x, y + self.ascent), run, font=font, fill=_TEXT, anchor="ls")
            else:
                draw.text((x, y), run, font=font, fill=_TEXT)
            x += round(font.getlength(run))

    def warn_missing(self, *others: _Fonts) -> None:
        """One warning for every character this font and `others` could not draw."""
        chars = sorted(self.missing.union(*(o.missing for o in others)))
        if not chars:
            return
        log.warning(
            "contact sheet: no installed font draws these characters; they are shown as '?' or plain letters",
            characters=" ".join(f"{c} (U+{ord(c):04X} {unicodedata.name(c, 'unnamed')})" for c in chars),
            install=" ".join(sorted({_package_for(c) for c in chars})),
        )


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in ("W", "F")


def _breaks(text: str) -> list[str]:
    """The pieces a line may break between: words, and each wide (CJK) character on its own,
    since Chinese and Japanese put no spaces between words. A piece keeps its leading space."""
    pieces: list[str] = []
    for char in text:
        after_space = bool(pieces) and pieces[-1].isspace()
        in_word = bool(pieces) and not _is_wide(char) and not char.isspace() and not _is_wide(pieces[-1][-1])
        if after_space or in_word:
            pieces[-1] += char
        else:
            pieces.append(char)
    return pieces


def _wrap(text: str, font: _Fonts, width: int, lines: int) -> list[str]:
    """Greedy wrap into at most `lines` lines; the last one ends in an ellipsis if cut."""
    pieces = _breaks(text)
    result: list[str] = []
    while pieces and len(result) < lines:
        line = pieces.pop(0).lstrip(" ")
        while pieces and font.getlength(line + pieces[0]) <= width:
            line += pieces.pop(0)
        result.append(line)
    if pieces or (result and font.getlength(result[-1]) > width):
        result[-1] = _ellipsize(result[-1], font, width)
    return result


def _ellipsize(line: str, font: _Fonts, width: int) -> str:
    ellipsis = _ELLIPSIS if font.has(_ELLIPSIS) else "..."
    pieces = _breaks(line)
    while pieces and font.getlength("".join(pieces) + ellipsis) > width:
        if len(pieces) > 1:
            pieces.pop()
        else:
            pieces[0] = pieces[0][:-1]
        pieces = _breaks("".join(pieces).rstrip(" ,;:-—"))
    return "".join(pieces) + ellipsis


def _caption(label: str, text: str, font: _Fonts, width: int) -> list[str]:
    dash = "—" if font.has("—") else "-"
    return _wrap(font.printable(f"{label} {dash} {text.strip()}"), font, width, _CAPTION_LINES)


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
        title_h=0,
    )


def _title(title: str | None, font: _Fonts, layout: _Layout) -> tuple[list[str], _Layout]:
    """The title's lines across the page, and the layout with room made for them above the grid."""
    if not title or not title.strip():
        return [], layout
    width = layout.size[0] - 2 * layout.gap
    lines = _wrap(font.printable(title.strip()), font, width, _TITLE_LINES)
    line_h = round(font.height * 1.15)
    return lines, replace(layout, title_h=layout.gap + len(lines) * line_h)


def make_contact_sheet(
    items: list[tuple[Path | Image.Image, int, str]],
    out_path: Path,
    *,
    title: str | None = None,
    thumb_width: int = 320,
    columns: int | None = None,
    cast: Sequence[tuple[str, Path | Image.Image]] = (),
) -> None:
    """Write a JPEG page: the title (when given) over a grid of (image, scene number, description)
    items, in the order given, then one cell per `cast` entry (name, picture), captioned
    "Cast — name".

    Columns default to a roughly square grid. Characters no installed font can draw are logged
    as a warning naming the font package to install. The file appears under `out_path` only once
    it is completely written.
    """
    if not items:
        raise ValueError("a contact sheet needs at least one item")
    if thumb_width < 16:
        raise ValueError(f"thumb_width must be at least 16, got {thumb_width}")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    size = max(10, round(thumb_width / 20))
    font, title_font = _Fonts(size), _Fonts(round(size * _TITLE_SCALE))
    cells = [(source, f"Scene {scene}", description) for source, scene, description in items]
    cells += [(picture, "Cast", name) for name, picture in cast]
    thumbs = [_thumbnail(source, thumb_width) for source, _, _ in cells]
    layout = _layout(thumbs, thumb_width, columns, line_h=round(font.height * 1.15))
    title_lines, layout = _title(title, title_font, layout)
    sheet = Image.new("RGB", layout.size, _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        title_font.draw(draw, (layout.gap, layout.gap + i * round(title_font.height * 1.15)), line)
    for index, (thumb, (_, label, text)) in enumerate(zip(thumbs, cells, strict=True)):
        x, y, image_h = layout.cell(index)
        top = y + image_h - thumb.height  # bottom-aligned: each caption sits right under its image
        sheet.paste(thumb, (x, top))
        draw.rectangle((x - 1, top - 1, x + thumb.width, top + thumb.height), outline=_FRAME)
        text_y = y + image_h + layout.pad
        for line in _caption(label, text, font, thumb_width):
            font.draw(draw, (x, text_y), line)
            text_y += layout.line_h
    title_font.warn_missing(font)
    out_path = Path(out_path)
    with atomic_writer(out_path) as fh:
        sheet.save(fh, format="JPEG", quality=90, subsampling=0, optimize=True)  # 4:4:4 keeps text crisp
