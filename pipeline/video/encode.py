"""The video formats storyreel writes, one object that says how, and the process that writes them.

Frames are I420 (planar YUV 4:2:0) in BT.709 limited ("tv") range, the encoder's own layout,
so whoever makes frames (Ken Burns clips, the film, the timeline's master clips) does the one
colour conversion itself and ffmpeg only encodes. The stream is tagged BT.709 so every decoder
converts it back with the matrix it was made with (untagged, players guess differently).

How a video is encoded (size, exact frame rate, codec, quality, colour) is one frozen
`VideoEncoding`, built from `[video]` in one place (`video_encoding`), so no function has a
default of its own that could drift from the settings.

Imports only numpy, imageio-ffmpeg and the frame-rate parser so `storyreel animate` starts fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, TYPE_CHECKING, ClassVar, Literal

import imageio_ffmpeg
import numpy as np

from pipeline.video.framerate import frame_rate_json, parse_frame_rate

if TYPE_CHECKING:
    from pipeline.settings import VideoSettings

__all__ = [
    "BLACK_C",
    "BLACK_Y",
    "BT709",
    "RGB_TO_YUV709",
    "Codec",
    "Colour",
    "EncoderStopped",
    "H264Writer",
    "VideoEncoding",
    "VideoWriter",
    "check_even_size",
    "open_video",
    "video_encoding",
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
_PIPE_BYTES = 1 << 20  # Linux's unprivileged maximum: fewer, larger writes to ffmpeg
_FFMPEG_SIGNALLED = 255  # ffmpeg's exit status after it caught SIGINT, SIGTERM or SIGQUIT

Codec = Literal["h264", "prores", "dnxhr"]
# The encoder arguments of each codec. ProRes 422 HQ is prores_ks profile 3 (10-bit 4:2:2, "apl0"
# vendor so Apple's decoders take it as their own); DNxHR HQ is 8-bit 4:2:2 at any size. Both
# take our 4:2:0 frames, ffmpeg upsampling the chroma; neither has a quality knob (fixed rates).
_CODEC_ARGS: dict[str, list[str]] = {
    "h264": ["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    "prores": ["-c:v", "prores_ks", "-profile:v", "3", "-vendor", "apl0", "-pix_fmt", "yuv422p10le"],
    "dnxhr": ["-c:v", "dnxhd", "-profile:v", "dnxhr_hq", "-pix_fmt", "yuv422p"],
}
_SUFFIX = {"h264": ".mp4", "prores": ".mov", "dnxhr": ".mov"}


@dataclass(frozen=True)
class Colour:
    """The colour tags written into every stream (ffmpeg's names for them)."""

    primaries: str
    transfer: str
    matrix: str
    range: str

    def ffmpeg_args(self) -> list[str]:
        return [
            "-color_primaries", self.primaries, "-color_trc", self.transfer,
            "-colorspace", self.matrix, "-color_range", self.range,
        ]  # fmt: skip


BT709 = Colour(primaries="bt709", transfer="bt709", matrix="bt709", range="tv")


@dataclass(frozen=True)
class VideoEncoding:
    """How one video is encoded: size, exact frame rate, codec and quality, colour.

    Build it from the settings with `video_encoding`; there are no defaults here that could
    disagree with `[video]`. `codec` is H.264 (what clips/ and film.mp4 are, always) unless a
    master clip asks for an editing codec (`for_master`). The colour is not a choice: the frames
    are converted with BT.709's matrix (RGB_TO_YUV709), so the tags say BT.709.
    """

    width: int
    height: int
    fps: Fraction
    crf: int  # libx264 only; ProRes and DNxHR have fixed data rates
    preset: str  # libx264 only
    codec: Codec = "h264"
    # An ffmpeg video filter applied while encoding ("" = none): the film's burned captions
    # (pipeline.sound.burn.caption_filter). It draws on the frames; it never resizes them.
    video_filter: str = ""
    colour: ClassVar[Colour] = BT709

    def __post_init__(self) -> None:
        check_even_size(self.width, self.height)
        object.__setattr__(self, "fps", parse_frame_rate(self.fps))
        if not (isinstance(self.crf, int) and 0 <= self.crf <= 51):
            raise ValueError(f"crf must be an integer 0-51, got {self.crf!r}")
        if self.codec not in _CODEC_ARGS:
            raise ValueError(f"unknown codec {self.codec!r}; expected one of {', '.join(_CODEC_ARGS)}")

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def suffix(self) -> str:
        """The container that goes with the codec: .mp4 for H.264, .mov for ProRes and DNxHR."""
        return _SUFFIX[self.codec]

    @property
    def rate_label(self) -> str:
        """24 or 24000/1001, as people and ffmpeg write it."""
        return str(frame_rate_json(self.fps))

    def frames(self, seconds: float) -> int:
        """A shot of `seconds` lasts this many frames, wherever it is made: round(seconds x fps)."""
        return round(seconds * self.fps)

    def seconds(self, frames: int) -> float:
        return float(frames / self.fps)

    def for_master(self, codec: Codec) -> VideoEncoding:
        return dataclasses.replace(self, codec=codec)

    def with_filter(self, video_filter: str) -> VideoEncoding:
        return dataclasses.replace(self, video_filter=video_filter)

    def ffmpeg_output_args(self) -> list[str]:
        args = ["-vf", self.video_filter] if self.video_filter else []
        args += _CODEC_ARGS[self.codec]
        if self.codec == "h264":
            args += ["-crf", str(self.crf), "-preset", self.preset]
        return args + self.colour.ffmpeg_args()


def video_encoding(
    video: VideoSettings, image_size: tuple[int, int], *, size: tuple[int, int] | None = None
) -> VideoEncoding:
    """The one place `[video]` becomes a VideoEncoding, at its exact rate, crf and preset.

    The size: `size` when a caller was given one (`storyreel animate --width/--height`), else
    `[video]` width x height, else (both 0) the image's own size made even.
    """
    if size is None:
        size = (
            (video.width, video.height) if video.width else (image_size[0] // 2 * 2, image_size[1] // 2 * 2)
        )
    return VideoEncoding(width=size[0], height=size[1], fps=video.fps, crf=video.crf, preset=video.preset)


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


class VideoWriter:
    """An ffmpeg process fed raw I420 frames (BT.709, limited range) on stdin, encoding as told.

    We own the process instead of using imageio_ffmpeg.write_frames because that helper
    never checks ffmpeg's exit status: a failed encode would look like a finished clip.
    """

    def __init__(self, path: Path, encoding: VideoEncoding) -> None:
        width, height = encoding.size
        self.encoding = encoding
        self.frame_bytes = width * height * 3 // 2
        self.frames = 0
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the writer
        tags = encoding.colour.ffmpeg_args()
        container = ["-movflags", "+faststart", "-f", encoding.suffix.lstrip(".")]
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-hide_banner", "-nostats", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}", "-r", encoding.rate_label,
            *tags, "-i", "pipe:0", "-an", *encoding.ffmpeg_output_args(), *container, str(path),
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


H264Writer = VideoWriter  # its older name, which tests patch to inject failures


@contextlib.contextmanager
def open_video(path: Path, encoding: VideoEncoding) -> Iterator[VideoWriter]:
    """A VideoWriter that is closed on success and killed on any error."""
    writer = VideoWriter(path, encoding)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()
