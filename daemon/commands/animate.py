"""`storyreel animate IMAGE OUT.mp4`: one Ken Burns clip, no model needed.

The output path, the numbers (the config's `[video]` with the options laid over it, held to the
same limits) and the image are each checked before any frame is made: a mistake is one line
and exit 2 (daemon/commands/usage.py), never a half-written clip.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from daemon.commands.usage import UsageError
from pipeline.settings import Settings, VideoSettings

if TYPE_CHECKING:
    from PIL import Image


def animate(args: argparse.Namespace, settings: Settings) -> int:
    """1. the output path, 2. the numbers, 3. the image: each checked before any frame is made."""
    from pipeline.video.encode import video_encoding
    from pipeline.video.kenburns import render_clip

    out = _output_mp4(Path(args.out))
    video = _animate_video(settings.video, args)
    image = _read_image(Path(args.image))
    width, height = _clip_size(args, image, video)
    info = render_clip(
        image,
        out,
        video_encoding(video, image.size, size=(width, height)),
        seconds=video.seconds_per_scene,
        motion=video.motion,
        zoom=video.zoom,
        pan=video.pan,
        fade_seconds=video.fade_seconds,
    )
    print(f"{args.out}: {info.width}x{info.height}, {info.frames} frames at {info.fps} fps")
    return 0


def _output_mp4(out: Path) -> Path:
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"{out}: animate writes an MP4 (H.264) video; name the output *.mp4")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; name the file to write, e.g. {out / 'clip.mp4'}")
    folder = out.parent
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such folder; create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{folder}: cannot write there (permission denied)")
    return out


_ANIMATE_OPTIONS = {"seconds_per_scene": "seconds", "fps": "fps", "motion": "motion"}


def _animate_video(video: VideoSettings, args: argparse.Namespace) -> VideoSettings:
    """The config's [video] with the options laid over it, held to the same limits as the config."""
    given = {
        key: getattr(args, opt) for key, opt in _ANIMATE_OPTIONS.items() if getattr(args, opt) is not None
    }
    try:
        merged = VideoSettings.model_validate({**video.model_dump(), **given})
    except ValidationError as err:
        e = err.errors()[0]
        opt = _ANIMATE_OPTIONS[str(e["loc"][0])]
        given = getattr(args, opt)
        shown = f"{given:g}" if isinstance(given, float) else given
        message = e["msg"].removeprefix("Input ").removeprefix("Value error, ")
        raise UsageError(f"--{opt} {shown}: {message}") from None
    if round(merged.seconds_per_scene * merged.fps) < 1:
        raise UsageError(
            f"--seconds {merged.seconds_per_scene} at {merged.fps} fps is less than one frame; give more"
        )
    return merged


def _read_image(path: Path) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a folder, not an image") from None
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image Pillow can read (PNG, JPEG, WebP, TIFF, ...)") from None
    except (OSError, Image.DecompressionBombError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise UsageError(f"{path}: cannot read the image: {reason}") from None


def _clip_size(args: argparse.Namespace, image: Image.Image, video: VideoSettings) -> tuple[int, int]:
    """H.264 in yuv420p needs even sides: the options as given, else [video] width x height,
    else the image's own size made even."""
    for opt in ("width", "height"):
        value = getattr(args, opt)
        if value is not None and (value < 2 or value % 2):
            raise UsageError(
                f"--{opt} {value}: must be even and at least 2 (H.264), e.g. {max(2, value // 2 * 2)}"
            )
    width = args.width if args.width is not None else (video.width or image.width // 2 * 2)
    height = args.height if args.height is not None else (video.height or image.height // 2 * 2)
    if width < 2 or height < 2:
        raise UsageError(
            f"{args.image}: {image.width}x{image.height} is too small for a video; give --width and --height"
        )
    return width, height
