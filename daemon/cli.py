"""The `storyreel` command. The only place that reads the environment and argv.

    storyreel run [--config FILE] [--once]
    storyreel animate IMAGE OUT.mp4 [--seconds S] [--fps N] [--motion M] [--config FILE]
    storyreel validate STORY.json [--config FILE]
    storyreel schema
    storyreel status [--config FILE]

Heavy imports (torch, diffusers) happen only in `run`, so the other commands
start fast.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pipeline.settings import MOTIONS, ConfigError, Settings, load_settings


def config_path(arg: str | None, environ: dict[str, str]) -> Path | None:
    """--config, else $STORYREEL_CONFIG, else ./config.toml, else the built-in defaults."""
    if arg:
        return Path(arg)
    if environ.get("STORYREEL_CONFIG"):
        return Path(environ["STORYREEL_CONFIG"])
    default = Path("config.toml")
    return default if default.exists() else None


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args.config, dict(os.environ)))


def cmd_run(args: argparse.Namespace) -> int:
    from daemon.logs import configure_logging

    configure_logging(os.environ, verbose=args.verbose)
    settings = _settings(args)
    # transformers warns at import about image processors we never use (no torchvision).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from pipeline.generate import configure_allocator

    configure_allocator(os.environ)  # before torch initialises CUDA
    import structlog

    from daemon.notify import Notifier
    from daemon.spool import SpoolLocked
    from daemon.worker import EXIT_SETUP, Worker
    from pipeline.errors import ModelNotFound
    from pipeline.generate import open_generator

    worker = Worker(
        settings,
        Notifier.from_environ(os.environ, unset=True, on_error=log_notify_error),
        open_generator,
        once=args.once,
        progress=args.once and sys.stderr.isatty(),
    )
    worker.install_signals()
    try:
        return worker.run()
    except (ModelNotFound, SpoolLocked) as err:
        structlog.get_logger("storyreel").error("cannot start", error=str(err))
        print(f"storyreel: {err}", file=sys.stderr)
        return EXIT_SETUP


def log_notify_error(err: OSError) -> None:
    """sd_notify failures cost nothing but a lost message; still, say so (as gunicorn does).
    The notifier calls this once per run of failures, so a gone socket is one line, not one per ping."""
    import structlog

    structlog.get_logger("storyreel").warning("sd_notify failed", error=str(err))


def cmd_animate(args: argparse.Namespace) -> int:
    from PIL import Image

    from pipeline.kenburns import render_clip

    settings = _settings(args)
    v = settings.video
    with Image.open(args.image) as img:
        image = img.convert("RGB")
    width = args.width or image.width - image.width % 2
    height = args.height or image.height - image.height % 2
    info = render_clip(
        image,
        Path(args.out),
        width=width,
        height=height,
        fps=args.fps or v.fps,
        seconds=args.seconds if args.seconds is not None else v.seconds_per_scene,
        motion=args.motion or v.motion,
        zoom=v.zoom,
        pan=v.pan,
        fade_seconds=v.fade_seconds,
        crf=v.crf,
        preset=v.preset,
    )
    print(f"{args.out}: {info.width}x{info.height}, {info.frames} frames at {info.fps} fps")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pipeline.story import StoryError, load_story

    settings = _settings(args)
    try:
        data = Path(args.story).read_bytes()
    except OSError as err:
        print(f"{args.story}: cannot read: {err.strerror or err}", file=sys.stderr)
        return 1
    try:
        story = load_story(data, settings.limits)
    except StoryError as err:
        report = "\n".join([f"{args.story}: invalid story", *(f"  {p}" for p in err.problems)])
        print(report, file=sys.stderr)
        if not _same_stream(sys.stdout, sys.stderr):
            print(report)  # the report is also this command's output, for scripts that read stdout
        return 1
    print(f"{args.story}: valid, {len(story.scenes)} scene{'s' if len(story.scenes) != 1 else ''}")
    return 0


def _same_stream(a: TextIO, b: TextIO) -> bool:
    """True when both go to one place (a terminal, or `2>&1`): then say things once."""
    try:
        return os.path.samestat(os.fstat(a.fileno()), os.fstat(b.fileno()))
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.story import story_schema

    print(json.dumps(story_schema(), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.spool import Spool
    from daemon.status import describe

    settings = _settings(args)
    spool = Spool(settings.paths.state, settings.paths.inbox)
    if not spool.queue.is_dir():
        print(f"daemon: never run with state {settings.paths.state}")
        return 0
    print(describe(settings.paths.state, settings.paths.outbox, spool, settings.daemon.history))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="storyreel", description="Story JSON -> SDXL images -> Ken Burns clips.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help="config.toml (default: $STORYREEL_CONFIG, else ./config.toml)")
        return sp

    run = with_config(sub.add_parser("run", help="the daemon: watch the inbox and make every story"))
    run.add_argument("--once", action="store_true", help="process what is in the inbox, then exit 0")
    run.add_argument("-v", "--verbose", action="store_true")
    run.set_defaults(func=cmd_run)

    an = with_config(sub.add_parser("animate", help="one Ken Burns clip from an image"))
    an.add_argument("image")
    an.add_argument("out")
    an.add_argument("--seconds", type=float)
    an.add_argument("--fps", type=int)
    an.add_argument("--motion", choices=MOTIONS)
    an.add_argument("--width", type=int, help="output width (default: the image's, made even)")
    an.add_argument("--height", type=int, help="output height (default: the image's, made even)")
    an.set_defaults(func=cmd_animate)

    va = with_config(sub.add_parser("validate", help="check a story file; exit 1 with the problems"))
    va.add_argument("story")
    va.set_defaults(func=cmd_validate)

    sc = sub.add_parser("schema", help="JSON Schema of the story format")
    sc.set_defaults(func=cmd_schema)

    st = with_config(sub.add_parser("status", help="queue, current story, recent results"))
    st.set_defaults(func=cmd_status)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"storyreel: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
