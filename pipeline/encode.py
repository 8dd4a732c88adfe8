"""The one video format storyreel writes, and the process that writes it.

Frames are I420 (planar YUV 4:2:0) in BT.709 limited ("tv") range, the encoder's own layout,
so whoever makes frames (Ken Burns clips, the film) does the one colour conversion itself and
ffmpeg only encodes. The stream is tagged BT.709 so every decoder converts it back with the
matrix it was made with (untagged, players guess differently).

Imports only numpy and imageio-ffmpeg so `storyreel animate` starts fast.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import imageio_ffmpeg
import numpy as np

__all__ = [
    "BLACK_C",
    "BLACK_Y",
    "RGB_TO_YUV709",
    "EncoderStopped",
    "H264Writer",
    "check_even_size",
    "open_h264",
]

# BT.709, limited ("tv") range: rows give Y, Cb, Cr from R, G, B in 0..255, last column the offset.
_KR, _KB = 0.2126, 0.0722
_KG = 1.0 - _KR - _KB
RGB_TO_YUV709 = np.array(
    [
        [219 / 255 * _KR, 219 / 255 * _KG, 219 / 255 * _KB, 16.0],
        [-224 / 255 * _KR / (2 - 2 * _KB), -224 / 255 * _KG / (2 - 2 * _KB), 224 / 255 * 0.5, 128.0],
        [224 / 255 * 0.5, -224 / 255 * _KG / (2 - 2 * _KR), -224 / 255 * _KB / (2 - 2 * _KR), 128.0],
    ],
    dtype=np.float32,
)
BLACK_Y, BLACK_C = 16, 128
_COLOUR_TAGS = ["-colorspace", "bt709", "-color_primaries", "bt709"]
_COLOUR_TAGS += ["-color_trc", "bt709", "-color_range", "tv"]
_PIPE_BYTES = 1 << 20  # Linux's unprivileged maximum: fewer, larger writes to ffmpeg
_FFMPEG_SIGNALLED = 255  # ffmpeg's exit status after it caught SIGINT, SIGTERM or SIGQUIT


class EncoderStopped(RuntimeError):
    """ffmpeg ended because a signal stopped it, not because of the frames or the disk.

    Whether that is an error depends on who sent the signal: during our own stop it is not
    the story's fault (pipeline.render turns it into an interruption).
    """


def check_even_size(width: int, height: int) -> None:
    """H.264 in yuv420p stores chroma at half size, so odd sizes cannot be encoded as asked."""
    if not (isinstance(width, int) and isinstance(height, int)) or width < 2 or height < 2:
        raise ValueError(f"video size must be positive integers >= 2, got {width!r}x{height!r}")
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs an even width and height, got {width}x{height}")


class H264Writer:
    """An ffmpeg/libx264 process fed raw I420 frames (BT.709, limited range) on stdin.

    We own the process instead of using imageio_ffmpeg.write_frames because that helper
    never checks ffmpeg's exit status: a failed encode would look like a finished clip.
    """

    def __init__(self, path: Path, width: int, height: int, fps: int, crf: int, preset: str) -> None:
        check_even_size(width, height)
        self.frame_bytes = width * height * 3 // 2
        self.frames = 0
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the writer
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-nostats", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", str(fps),
            *_COLOUR_TAGS, "-i", "pipe:0", "-an",
            "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", preset,
            *_COLOUR_TAGS, "-movflags", "+faststart", "-f", "mp4", str(path),
        ]  # fmt: skip
        # A session of its own: a Ctrl-C (SIGINT to the whole process group) or a supervisor's
        # signal to the group must not reach ffmpeg. Our stop is ours to carry out: the scene in
        # progress is finished, and ffmpeg is stopped by closing its stdin (or killed by abort).
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True
        )
        assert self._proc.stdin is not None
        self._stdin = self._proc.stdin
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)

    def write(self, frame: np.ndarray) -> None:
        """Send one contiguous I420 frame (height*3/2 x width uint8)."""
        if frame.nbytes != self.frame_bytes or frame.dtype != np.uint8:
            raise ValueError(f"frame has {frame.nbytes} bytes, the encoder expects {self.frame_bytes}")
        try:
            self._stdin.write(np.ascontiguousarray(frame).data)
        except (BrokenPipeError, OSError) as err:
            self._raise_if_signalled(self._proc.wait())
            raise RuntimeError(f"ffmpeg stopped accepting frames ({err}): {self._stderr()}") from None
        self.frames += 1

    def close(self) -> None:
        """Finish the file; raise with ffmpeg's own message if it did not succeed."""
        try:
            with contextlib.suppress(BrokenPipeError):
                self._stdin.close()
            rc = self._proc.wait()
            self._raise_if_signalled(rc)
            if rc != 0:
                raise RuntimeError(f"ffmpeg exited with status {rc}: {self._stderr()}")
            if self.frames == 0:
                raise RuntimeError("no frames were written")
        finally:
            self._log.close()

    def abort(self) -> None:
        """Stop ffmpeg at once; the caller discards the partial file."""
        with contextlib.suppress(OSError):
            self._proc.kill()
        self._proc.wait()
        with contextlib.suppress(OSError):
            self._stdin.close()
        self._log.close()

    def _raise_if_signalled(self, rc: int) -> None:
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:  # a real-time signal has no name
                name = f"signal {-rc}"
            raise EncoderStopped(f"ffmpeg was killed by {name}")
        if rc == _FFMPEG_SIGNALLED:
            raise EncoderStopped(f"ffmpeg stopped on a signal (exit status {rc}): {self._stderr()}")

    def _stderr(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:].decode("utf-8", "replace").strip() or "(no message)"


@contextlib.contextmanager
def open_h264(path: Path, width: int, height: int, fps: int, crf: int, preset: str) -> Iterator[H264Writer]:
    """An H264Writer that is closed on success and killed on any error."""
    writer = H264Writer(path, width, height, fps, crf, preset)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()
