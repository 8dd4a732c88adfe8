"""An AAC track into an existing MP4, the video stream copied as it is (no re-encoding).

The track is made exactly as long as the pictures (pipeline.sound.mix counts it in samples
from the frame count), so no `-shortest` is needed or wanted: `-shortest` cuts at a packet
boundary and can drop the end of the last AAC frame or the last picture. AAC's encoder delay
is written into the MP4's edit list by ffmpeg, so a player starts the sound on the first
picture and the decoded sound is exactly as long as it was before encoding.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.fsutil import atomic_path
from pipeline.sound.ffmpeg import run_ffmpeg

__all__ = ["mux_audio"]


def mux_audio(video: Path, audio: Path, out: Path | None = None) -> Path:
    """`video`'s first video stream and `audio`'s first audio stream, copied into `out`
    (default: `video` itself, replaced atomically). Any audio `video` had is dropped."""
    out = Path(out or video)
    with atomic_path(out) as tmp:
        run_ffmpeg(
            ["-i", str(video), "-i", str(audio), "-map", "0:v:0", "-map", "1:a:0", "-c", "copy",
             "-map_metadata", "0", "-movflags", "+faststart", "-f", "mp4", str(tmp)],
            what=f"adding sound to {out.name}",
        )  # fmt: skip
    return out
