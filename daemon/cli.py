"""The `storyreel` command. The only place that reads the environment and argv.

    storyreel run [--config FILE] [--once]
    storyreel animate IMAGE OUT.mp4 [--seconds S] [--fps N] [--motion M] [--width W] [--height H]
                      [--config FILE]
    storyreel validate STORY.json [STORY.json ...] [--config FILE]
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
import grp
import json
import os
import pwd
import socket
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from pipeline.settings import (
    MOTIONS,
    ConfigError,
    Settings,
    VideoSettings,
    load_settings,
    require_named_files,
)

if TYPE_CHECKING:
    from PIL import Image

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake the user can fix (a missing file, a bad option): one line, exit 2."""


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
    from daemon.logs import configure_logging, for_people

    configure_logging(os.environ, verbose=args.verbose)
    settings = _settings(args)
    require_named_files(settings)
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

    notifier = Notifier.from_environ(os.environ, unset=True, on_error=log_notify_error)
    worker = Worker(
        settings,
        notifier,
        open_generator,
        once=args.once,
        progress=for_people(os.environ),  # a bar per story on a terminal, in both modes
        environ=dict(os.environ),  # what [hooks] commands inherit (NOTIFY_SOCKET already unset)
    )
    worker.install_signals()
    try:
        return worker.run()
    except (ModelNotFound, SpoolLocked) as err:
        if for_people(os.environ):  # a terminal: the message as written, once
            print(f"storyreel: {err}", file=sys.stderr)
        else:  # journald, a file: one JSON line, like every other line the daemon writes
            structlog.get_logger("storyreel").error("cannot start", error=str(err))
        return EXIT_SETUP


def log_notify_error(err: OSError) -> None:
    """sd_notify failures cost nothing but a lost message; still, say so (as gunicorn does).
    The notifier calls this once per run of failures, so a gone socket is one line, not one per ping."""
    import structlog

    structlog.get_logger("storyreel").warning("sd_notify failed", error=str(err))


def cmd_animate(args: argparse.Namespace) -> int:
    """1. the output path, 2. the numbers, 3. the image: each checked before any frame is made."""
    from pipeline.encode import video_encoding
    from pipeline.kenburns import render_clip

    settings = _settings(args)
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


def cmd_validate(args: argparse.Namespace) -> int:
    """Each file's result on stdout, each problem on stderr, one line each, like a compiler."""
    from pipeline.story import StoryError, load_story

    settings = _settings(args)
    code = 0
    for name in args.stories:
        try:
            story = load_story(Path(name).read_bytes(), settings.limits)
        except OSError as err:
            print(f"{name}: cannot read: {err.strerror or err}", file=sys.stderr)
            code = 1
        except StoryError as err:
            for problem in err.problems:
                print(f"{name}: {problem}", file=sys.stderr)
            code = 1
        else:
            n = len(story.scenes)
            print(f"{name}: valid, {n} scene{'s' if n != 1 else ''}")
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.story import story_schema

    print(json.dumps(story_schema(), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from daemon.spool import Spool
    from daemon.status import describe

    settings = _settings(args)
    state = settings.paths.state
    try:
        spool = Spool(state, settings.paths.inbox)
        report = describe(state, settings.paths.outbox, spool, settings.daemon.history)
    except PermissionError as err:
        raise UsageError(_permission_hint(Path(err.filename or state))) from None
    print(report)
    return 0


def _who() -> str:
    """Who gave a command, for `storyreel status`: the user behind sudo, at this host."""
    user = os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name
    return f"{user}@{socket.gethostname()}"


def cmd_pause(args: argparse.Namespace) -> int:
    from daemon.controls import pause_from_box
    from daemon.status import read_current

    state = _settings(args).paths.state
    try:
        existing = pause_from_box(state, _who())
        running = read_current(state) is not None
    except PermissionError as err:
        raise UsageError(_permission_hint(Path(err.filename or state))) from None
    if existing is not None:
        print(f"already paused by {existing.get('by')} since {existing.get('since')}")
    else:
        print("paused: the scene in progress finishes, then nothing new starts (storyreel resume goes on)")
    if not running:
        print("the daemon is not running: it starts paused")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Lifts the box's pause. An inbox/PAUSE is someone else's to remove: exit 1 while it holds."""
    from daemon.controls import resume_from_box
    from daemon.status import read_current

    state = _settings(args).paths.state
    try:
        lifted = resume_from_box(state)
        current = read_current(state) or {}
    except PermissionError as err:
        raise UsageError(_permission_hint(Path(err.filename or state))) from None
    share = [p for p in current.get("paused") or [] if str(p.get("by", "")).startswith("inbox/")]
    if share:
        held = share[0]
        print(
            f"storyreel resume: still paused by {held['by']} (since {held.get('since')}); "
            "remove that file from the share to go on",
            file=sys.stderr,
        )
        return 1
    print("resumed" if lifted else "not paused")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """cancel NAME / retry NAME: checked against the spool here, carried out by the daemon."""
    from daemon.controls import pending, refusal, submit
    from daemon.spool import Spool, read_claims
    from daemon.status import read_current

    settings = _settings(args)
    state, action, name = settings.paths.state, args.command, args.name
    try:
        spool = Spool(state, settings.paths.inbox)
        claims = {c.name: c for c in read_claims(spool.queue)}
        ended = {h["story"]: h for h in spool.history() if "story" in h}
        current = read_current(state)
        if name not in claims and name not in ended:
            from pipeline.story import sanitize_name

            name = sanitize_name(name, settings.limits.max_name_chars)  # as a dropped NAME.json is called
        claim = claims.get(name)
        running = claim is not None and current is not None and current.get("seq") == claim.seq
        problem = refusal(action, name, claim, ended.get(name), running)
        if problem is not None:
            print(f"storyreel {action}: {problem}", file=sys.stderr)
            return 1
        if pending(state, action, name):
            print(f"{name}: a {action} is already requested and waiting for the daemon")
            return 0
        submit(state, action, name, _who())
    except PermissionError as err:
        raise UsageError(_permission_hint(Path(err.filename or state))) from None
    if action == "cancel":
        what = "it stops after the scene in progress, then ends cancelled" if running else "it ends cancelled"
    else:
        what = "it re-enters the queue at its end"
    later = "" if current is not None else " once the daemon starts (it is not running)"
    print(f"{name}: {action} requested; {what}{later}")
    return 0


def _permission_hint(path: Path) -> str:
    """Name the first folder on the way that shuts this user out, and the group that may enter.

    The unit keeps /var/lib/storyreel at 0750 (StateDirectoryMode=) for its Group=storyreel.
    """
    closed = next((p for p in [*reversed(path.parents), path] if not os.access(p, os.R_OK | os.X_OK)), path)
    try:
        gid = closed.stat().st_gid
        group = grp.getgrgid(gid).gr_name
    except (OSError, KeyError):
        gid, group = -1, "storyreel"
    if gid == 0:
        return f"cannot read {closed}: permission denied (it is root's); run this with sudo"
    return (
        f"cannot read {closed}: permission denied; it is for group {group}: "
        f"join it (sudo usermod -aG {group} $USER, then log in again) or use sudo"
    )


def _version() -> str:
    try:
        return metadata.version("storyreel")
    except metadata.PackageNotFoundError:
        return "(not installed)"


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
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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
        sub.add_parser("validate", help="check story files: exit 0 if all are valid, 1 with the problems")
    )
    va.add_argument("stories", nargs="+", metavar="STORY.json")
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
