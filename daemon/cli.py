"""The `storyreel` command. The only place that reads the environment and argv.

    storyreel run [--config FILE] [--once]
    storyreel animate IMAGE OUT.mp4 [--seconds S] [--fps N] [--motion M] [--width W] [--height H]
                      [--config FILE]
    storyreel validate STORY.json|BUNDLE.zip [...] [--config FILE]
    storyreel schema
    storyreel status [--config FILE]
    storyreel pause [--config FILE] / storyreel resume [--config FILE]
    storyreel cancel NAME [--config FILE] / storyreel retry NAME [--config FILE]

Heavy imports (torch, diffusers) happen only in `run`, so the other commands
start fast. A mistake in how a command is called gets one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from daemon.commands.usage import UsageError
from pipeline.settings import (
    MOTIONS,
    ConfigError,
    Settings,
    VideoSettings,
    load_settings,
    require_named_files,
)
from pipeline.version import storyreel_version

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse's own errors in one line too, with where to look."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


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
    from daemon.system.logs import configure_logging, for_people

    configure_logging(os.environ, verbose=args.verbose)
    settings = _settings(args)
    require_named_files(settings)
    # transformers warns at import about image processors we never use (no torchvision).
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from pipeline.images.sdxl_load import configure_allocator

    configure_allocator(os.environ)  # before torch initialises CUDA
    import structlog

    from daemon.loop import EXIT_SETUP, Loop
    from daemon.queue.spool import SpoolLocked
    from daemon.system.notify import Notifier
    from pipeline.errors import ModelNotFound
    from pipeline.images.sdxl import open_generator

    notifier = Notifier.from_environ(os.environ, unset=True, on_error=log_notify_error)
    loop = Loop(
        settings,
        notifier,
        open_generator,
        once=args.once,
        progress=for_people(os.environ),  # a bar per story on a terminal, in both modes
        environ=dict(os.environ),  # what [hooks] commands inherit (NOTIFY_SOCKET already unset)
    )
    loop.install_signals()
    try:
        return exit_past_stuck_threads(loop.run(), loop.shares.stuck_threads())
    except (ModelNotFound, SpoolLocked) as err:
        if for_people(os.environ):  # a terminal: the message as written, once
            print(f"storyreel: {err}", file=sys.stderr)
        else:  # journald, a file: one JSON line, like every other line the daemon writes
            structlog.get_logger("storyreel").error("cannot start", error=str(err))
        return EXIT_SETUP


def exit_past_stuck_threads(code: int, stuck: int) -> int:
    """A thread stuck in the kernel on a share that does not answer cannot be killed, and the
    interpreter's own exit would wait on whatever touched it (an executor's atexit join, a
    flush): with any such thread left, the process ends here, its cleanup done and said."""
    if not stuck:
        return code
    import structlog

    structlog.get_logger("storyreel").warning(
        "exiting past threads stuck on a share", threads=stuck, code=code
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def log_notify_error(err: OSError) -> None:
    """sd_notify failures cost nothing but a lost message; still, say so (as gunicorn does).
    The notifier calls this once per run of failures, so a gone socket is one line, not one per ping."""
    import structlog

    structlog.get_logger("storyreel").warning("sd_notify failed", error=str(err))


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file's result on stdout, each problem on stderr, one line each, like a compiler.

    A bundle (NAME.zip) is checked as the daemon checks it when it runs: every entry read under
    the limits, every named file decoded, in a temporary folder removed before this returns."""
    from pipeline.bundle import check_bundle
    from pipeline.names import story_kind
    from pipeline.story import StoryError, load_story

    settings = _settings(args)
    code = 0
    for name in args.stories:
        bundle = story_kind(name) == "bundle"
        try:
            if bundle:
                story = check_bundle(Path(name), settings.limits)
            else:
                story = load_story(Path(name).read_bytes(), settings.limits)
        except OSError as err:
            print(f"{name}: cannot read: {err.strerror or err}", file=sys.stderr)
            code = 1
        except StoryError as err:
            for problem in err.problems:
                print(f"{name}: {problem}", file=sys.stderr)
            code = 1
        else:
            n, files = len(story.scenes), len({path for _, path in story.files()})
            brings = f", a bundle with {files} file{'s' if files != 1 else ''} it names" if bundle else ""
            print(f"{name}: valid, {n} scene{'s' if n != 1 else ''}{brings}")
    return code


def cmd_animate(args: argparse.Namespace) -> int:
    from daemon.commands.animate import animate

    return animate(args, _settings(args))


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.commands import box

    return box.status(_settings(args))


def cmd_pause(args: argparse.Namespace) -> int:
    from daemon.commands import box

    return box.pause(_settings(args), _who())


def cmd_resume(args: argparse.Namespace) -> int:
    from daemon.commands import box

    return box.resume(_settings(args))


def cmd_control(args: argparse.Namespace) -> int:
    from daemon.commands import box

    return box.control(_settings(args), args.command, args.name, _who())


def _who() -> str:
    """Who gave a command, for `storyreel status`: the user behind sudo, at this host."""
    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@{socket.gethostname()}"


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.story import story_schema

    print(json.dumps(story_schema(), indent=2))
    return 0


def _help_defaults(argv: Sequence[str]) -> tuple[VideoSettings, str]:
    """The [video] values `animate --help` shows: those of the config this command line would use."""
    if not {"-h", "--help"} & set(argv):
        return VideoSettings(), ""  # no help to print
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--config")
    try:
        known, _ = pre.parse_known_args(argv)
        path = config_path(known.config, dict(os.environ))
        return load_settings(path).video, f" in {path}" if path else ", built in"
    except (argparse.ArgumentError, ConfigError):
        return VideoSettings(), ", built in (the config cannot be read)"


def parser(video: VideoSettings | None = None, origin: str = ", built in") -> argparse.ArgumentParser:
    v = video or VideoSettings()
    p = _Parser(prog="storyreel", description="Story JSON -> SDXL images -> Ken Burns clips.")
    p.add_argument("--version", action="version", version=f"%(prog)s {storyreel_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config", metavar="FILE", help="config.toml (default: $STORYREEL_CONFIG, else ./config.toml)"
        )
        return sp

    run = with_config(sub.add_parser("run", help="the daemon: watch the inbox and make every story"))
    run.add_argument("--once", action="store_true", help="process what is in the inbox, then exit 0")
    run.add_argument(
        "-v", "--verbose", action="store_true", help="log debug lines too (default: info and up)"
    )
    run.set_defaults(func=cmd_run)

    an = with_config(sub.add_parser("animate", help="one Ken Burns clip from an image"))
    an.add_argument("image", metavar="IMAGE", help="a picture Pillow can read (PNG, JPEG, WebP, ...)")
    an.add_argument(
        "out", metavar="OUT.mp4", help="the clip to write, *.mp4 (H.264), in a folder that exists"
    )
    an.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        help=f"clip length (default: {v.seconds_per_scene}, video.seconds_per_scene{origin})",
    )
    an.add_argument(
        "--fps",
        metavar="N",
        help="frames per second: an integer 1-120, or 24000/1001, 30000/1001, 60000/1001 (23.976, 29.97, "
        f"59.94) (default: {v.fps}, video.fps{origin})",
    )
    an.add_argument(
        "--motion",
        choices=MOTIONS,
        metavar="M",
        help=f"{', '.join(MOTIONS)} (default: {v.motion}, video.motion{origin})",
    )
    an.add_argument(
        "--width", type=int, metavar="W", help="output width, even (default: video.width, else the image's)"
    )
    an.add_argument(
        "--height",
        type=int,
        metavar="H",
        help="output height, even (default: video.height, else the image's)",
    )
    an.set_defaults(func=cmd_animate)

    va = with_config(
        sub.add_parser(
            "validate", help="check story files and bundles: exit 0 if all are valid, 1 with the problems"
        )
    )
    va.add_argument("stories", nargs="+", metavar="STORY.json|BUNDLE.zip")
    va.set_defaults(func=cmd_validate)

    sc = sub.add_parser("schema", help="JSON Schema of the story format")
    sc.set_defaults(func=cmd_schema)

    st = with_config(
        sub.add_parser(
            "status", help="queue with positions and estimated starts, current story, recent results"
        )
    )
    st.set_defaults(func=cmd_status)

    pa = with_config(sub.add_parser("pause", help="finish the scene in progress, then start nothing new"))
    pa.set_defaults(func=cmd_pause)
    re_ = with_config(sub.add_parser("resume", help="go on after storyreel pause"))
    re_.set_defaults(func=cmd_resume)
    ca = with_config(
        sub.add_parser(
            "cancel", help="a queued story ends cancelled; a running one after its scene in progress"
        )
    )
    ca.add_argument("name", metavar="NAME", help="the story's name (as in storyreel status)")
    ca.set_defaults(func=cmd_control)
    rt = with_config(
        sub.add_parser("retry", help="a failed or cancelled story re-enters the queue at its end, same NAME")
    )
    rt.add_argument("name", metavar="NAME", help="the story's name (as in storyreel status)")
    rt.set_defaults(func=cmd_control)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    try:
        args = parser(*_help_defaults(argv)).parse_args(argv)
        command = args.command
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the try, not at exit
        return code
    except BrokenPipeError:
        if command == "run":
            raise  # the daemon writes no stdout: this is some other pipe, and a bug
        # The reader went away (`storyreel status | head`): the recipe from the Python docs
        # (signal module, "Note on SIGPIPE"), so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"storyreel: {err}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as err:
        print(f"storyreel {args.command}: {err}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
