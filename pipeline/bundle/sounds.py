"""Is this file a sound ffmpeg decodes, and how long is it? Asked of ffmpeg, never of headers.

The file is decoded for real (to ffmpeg's null muxer), which both proves it decodes and
measures it: a header's duration is a claim, the decoded timestamps are the fact. Decoding
stops just past the longest length that matters, so a file that is hours of silence in a
few kilobytes costs no more than one that is just too long.

ffmpeg reads only local files (`-protocol_whitelist file`) and only through the demuxers
of everyday audio containers (`-format_whitelist`): a playlist or concat script posing as
a sound cannot make it open anything else. It runs in a session of its own, so a Ctrl-C
meant for the daemon never fails a story, and under a timeout.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg

# WAV (and Wave64), FLAC, MP3, AAC (ADTS), M4A/MP4/MOV, Ogg (Vorbis, Opus, FLAC), Matroska/WebM,
# AIFF, CAF: the demuxers a bundle's sound may go through.
DEMUXERS = "wav,w64,flac,mp3,aac,mov,ogg,matroska,webm,aiff,caf"
SOUNDS_SHOWN = "WAV, FLAC, MP3, AAC/M4A, Ogg Vorbis/Opus, WebM, AIFF"
SLACK_SECONDS = 0.05  # codec padding (AAC priming, MP3 frames) a length may overrun its limit by
_AUDIO = re.compile(r"^\s*Stream #\d+:\d+\S*: Audio: (?P<codec>[A-Za-z0-9_]+)", re.MULTILINE)
_OUT_TIME = re.compile(r"^out_time_us=(\d+)$", re.MULTILINE)
_NOISE = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\] ")


class SoundError(ValueError):
    """A sound that cannot be used; the message says why, without any path (the caller names it)."""


@dataclass(frozen=True)
class SoundInfo:
    seconds: float  # decoded length; at most `decode_seconds` of the check that measured it
    codec: str  # ffmpeg's name for the first audio stream's codec (mp3, aac, opus, flac, pcm_s16le, …)


def _timeout(path: Path) -> float:
    """Generous for big files on a slow disk; a decoder that hangs is still stopped."""
    return 60.0 + path.stat().st_size / 5e6


def _last_error(stderr: str, path: Path) -> str:
    if "not on whitelist" in stderr:
        return "not a format storyreel reads"
    lines = [_NOISE.sub("", ln).strip() for ln in stderr.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith(("Error opening input file", "Input #", "Stream "))]
    text = lines[-1] if lines else "no message"
    return text.replace(str(path), "the file")


def decode_sound(path: Path, decode_seconds: float) -> SoundInfo:
    """Decode the first audio stream of `path` for at most `decode_seconds`; SoundError if it
    will not decode or holds no sound."""
    path = Path(path)
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-nostdin", "-hide_banner", "-nostats", "-v", "info",
        "-protocol_whitelist", "file", "-format_whitelist", DEMUXERS,
        "-i", f"file:{path}",
        "-map", "0:a:0", "-vn", "-sn", "-dn", "-t", f"{decode_seconds:.3f}",
        "-f", "null", "-progress", "pipe:1", "-",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_timeout(path),
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SoundError(f"ffmpeg did not finish decoding it within {_timeout(path):.0f} s") from None
    header = proc.stderr.split("Stream mapping:")[0]
    stream = _AUDIO.search(header)
    if proc.returncode != 0 and stream is None and "Input #0" in header:
        raise SoundError("holds no sound (no audio stream)")
    if proc.returncode != 0 or stream is None:
        why = _last_error(proc.stderr, path)
        raise SoundError(f"is not a sound ffmpeg can decode ({SOUNDS_SHOWN}): {why}")
    times = _OUT_TIME.findall(proc.stdout)
    seconds = int(times[-1]) / 1e6 if times else 0.0
    if seconds <= 0.0:
        raise SoundError("decodes to no sound at all (0 seconds)")
    return SoundInfo(seconds=seconds, codec=stream["codec"])


def check_sound(path: Path, most_seconds: float, limit_name: str | None) -> SoundInfo:
    """A sound no longer than `most_seconds` (plus codec slack): decoded just past that.

    `limit_name` is the config key the limit comes from, named in the refusal; None means
    the length is only a decoding bound (music longer than any film is fine, and is not
    decoded further).
    """
    info = decode_sound(path, most_seconds + 1.0)
    if limit_name is not None and info.seconds > most_seconds + SLACK_SECONDS:
        raise SoundError(f"lasts longer than the limit of {most_seconds:g} s ({limit_name})")
    return info
