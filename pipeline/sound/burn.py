"""Captions drawn into the film's pictures (`[video] burn_captions`): an ASS file and the filter.

The film's encoder (pipeline.video.encode) adds `-vf <caption_filter(ass)>`: ffmpeg's `ass` filter
renders with libass (imageio-ffmpeg's build has it), finding fonts through fontconfig, so a
caption in any script is drawn with the first installed font that has it (DejaVu Sans first:
Debian's fonts-dejavu-core; fonts-noto-cjk for Chinese, Japanese, Korean). The style is sized
from the picture: white text with a dark outline and shadow over the lower tenth, wrapped
within a centred 80 % of the width.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pysubs2

from pipeline.fsutil import atomic_write_bytes
from pipeline.sound.captions import Cue

__all__ = ["caption_filter", "write_ass"]


def write_ass(cues: Sequence[Cue], path: Path, *, width: int, height: int) -> None:
    """The cues as an ASS script whose coordinates are the video's own pixels."""
    subs = pysubs2.SSAFile()
    subs.info.update({"PlayResX": str(width), "PlayResY": str(height), "WrapStyle": "0",
                      "ScaledBorderAndShadow": "yes"})  # fmt: skip
    subs.styles["Default"] = pysubs2.SSAStyle(
        fontname="DejaVu Sans",
        fontsize=max(8.0, round(height * 0.055)),
        primarycolor=pysubs2.Color(255, 255, 255),
        outlinecolor=pysubs2.Color(0, 0, 0),
        backcolor=pysubs2.Color(0, 0, 0, 128),
        bold=False,
        outline=max(1.0, height / 300),
        shadow=max(0.5, height / 600),
        alignment=pysubs2.Alignment.BOTTOM_CENTER,
        marginl=round(width * 0.1),
        marginr=round(width * 0.1),
        marginv=round(height * 0.06),
    )
    for c in cues:
        event = pysubs2.SSAEvent(start=c.start_ms, end=c.end_ms)
        event.plaintext = c.text.replace("{", "(").replace("}", ")")  # braces open ASS override tags
        subs.append(event)
    atomic_write_bytes(path, subs.to_string("ass").encode("utf-8"))


def _escape_option(value: str) -> str:
    """An option value as ffmpeg's filter parser reads it (first level: \\ ' : are special)."""
    return value.replace("\\", "\\\\").replace("'", "\\'").replace(":", "\\:")


def _escape_graph(text: str) -> str:
    """A filter's arguments inside a filter graph (second level: \\ ' [ ] , ; are special)."""
    for ch in "\\'[],;":
        text = text.replace(ch, "\\" + ch)
    return text


def caption_filter(ass: Path) -> str:
    """The video filter that draws `ass` onto every frame (for -vf or a -filter_complex chain)."""
    return "ass=filename=" + _escape_graph(_escape_option(str(ass)))
