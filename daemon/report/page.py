"""`outbox/index.html`: the status page people open straight off the share.

The report describes the daemon in a plain `PageSnapshot` (daemon/report/overview.py); `write_page` renders it
with a Jinja2 template (autoescape on: a story title like `<script>` is text) and
replaces `index.html` atomically. Everything the page links to is a path relative
to the outbox, so the share can be mounted anywhere and opened over `file://`.
Its own files live under `outbox/.storyreel/` (a hidden name: never a story, see
pipeline/names.py): the style sheet and small JPEG thumbnails of the scenes of the
story in progress. The page needs no script; it reloads itself (meta refresh)
only while something is being made or waits in the queue.

Rendering is pure (same snapshot, same bytes) and an unchanged page is not rewritten;
how often it is written is daemon/report/writer.py's business.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import KW_ONLY, dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import jinja2
from PIL import Image

from daemon.report.snapshot import DaemonState
from pipeline.fsutil import atomic_write_bytes, atomic_writer, remove_tree
from pipeline.names import PAGE, PAGE_ASSETS

THUMB_WIDTH = 320
REFRESH_SECONDS = 5


# ------------------------------------------------------------------ the snapshot


@dataclass(frozen=True)
class SceneThumb:
    number: int  # 1-based scene number
    image: Path  # the finished scene's PNG, wherever it is (the claim's work folder)


@dataclass(frozen=True)
class InProgress:
    name: str
    title: str
    scene: int  # the scene being made, 1-based
    scenes: int
    eta_seconds: float | None = None
    finished: tuple[SceneThumb, ...] = ()


@dataclass(frozen=True)
class Queued:
    name: str
    title: str = ""
    scenes: int = 0
    since: datetime | None = None  # when it was claimed


@dataclass(frozen=True)
class Result:
    """A story that ended. Paths are relative to the outbox (as `pipeline.package.outputs` gives them)."""

    name: str
    state: str  # done | failed | cancelled | expired
    _: KW_ONLY
    title: str = ""
    finished: datetime | None = None
    scenes: int = 0
    error: str = ""
    film: str | None = None
    poster: str | None = None  # an image shown on the film player before it plays (the first scene)
    contact_sheet: str | None = None
    zip: str | None = None
    folder: str | None = None


@dataclass(frozen=True)
class PageSnapshot:
    time: datetime  # when this was true; shown on the page (a page that stops updating says so)
    state: DaemonState
    reason: str = ""  # why paused or waiting
    current: InProgress | None = None
    queue: tuple[Queued, ...] = ()  # in the order the stories will run
    results: tuple[Result, ...] = ()  # newest first

    @property
    def live(self) -> bool:
        """Something will change soon: the page reloads itself only then."""
        return self.state != "stopped" and (self.current is not None or bool(self.queue))


# ------------------------------------------------------------------ files under .storyreel/


def thumb_path(outbox: Path, name: str, scene: int) -> Path:
    return outbox / PAGE_ASSETS / "thumbs" / name / f"scene_{scene:03d}.jpg"


def make_thumbnail(png: Path, dest: Path, width: int = THUMB_WIDTH) -> Path:
    """A small JPEG of a scene image, written atomically; kept while newer than its source."""
    with contextlib.suppress(OSError):
        if dest.stat().st_mtime_ns >= png.stat().st_mtime_ns:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(png) as img:
        small = img.convert("RGB")
        small.thumbnail((width, width * 4), Image.Resampling.LANCZOS)
    with atomic_writer(dest) as fh:
        small.save(fh, format="JPEG", quality=82, optimize=True)
    return dest


def _thumbnails(outbox: Path, current: InProgress | None) -> list[tuple[int, str]]:
    """Thumbnails of the current story's finished scenes; those of other stories are dropped."""
    root = outbox / PAGE_ASSETS / "thumbs"
    keep = current.name if current else None
    with contextlib.suppress(OSError):
        for folder in root.iterdir():
            if folder.name != keep:
                remove_tree(folder)
    out: list[tuple[int, str]] = []
    for thumb in current.finished if current else ():
        dest = thumb_path(outbox, current.name, thumb.number)  # type: ignore[union-attr]
        try:
            make_thumbnail(thumb.image, dest)
        except OSError:
            continue  # a scene image that went missing: no thumbnail, not a broken page
        out.append((thumb.number, dest.relative_to(outbox).as_posix()))
    return out


def _write_if_changed(path: Path, data: bytes) -> bool:
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    atomic_write_bytes(path, data)
    return True


# ------------------------------------------------------------------ rendering


def _href(path: str | None) -> str | None:
    """A safe relative link: absolute paths, '..' and schemes are dropped, the rest URL-quoted."""
    if not path:
        return None
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or ":" in p.parts[0]:
        return None
    return quote(p.as_posix(), safe="/")


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "estimating…"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"about {hours} h {minutes:02d} min"
    return f"about {minutes} min {secs:02d} s" if minutes else f"about {secs} s"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("daemon.report", "templates"),
        autoescape=True,  # everything from a story is text, whatever it contains
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(href=_href, eta=_eta, when=_when)
    return env


_ENV = _environment()


def render_page(snapshot: PageSnapshot, thumbs: list[tuple[int, str]] | None = None) -> str:
    """The page's HTML for a snapshot: a pure function of its arguments."""
    current = snapshot.current
    done = 0 if current is None else max(0, min(current.scene - 1, current.scenes))
    percent = 0 if current is None or current.scenes <= 0 else round(100 * done / current.scenes)
    return _ENV.get_template("page.html.j2").render(
        s=snapshot,
        current=current,
        done=done,
        percent=percent,
        thumbs=thumbs or [],
        made=[r for r in snapshot.results if r.state == "done"],
        unmade=[r for r in snapshot.results if r.state != "done"],
        refresh=REFRESH_SECONDS if snapshot.live else None,
        css=f"{PAGE_ASSETS}/page.css",
    )


def clean_stale_temps(outbox: Path) -> int:
    """Remove the temporary files a killed daemon left mid-write of the page or its assets
    (`.index.html.PID.part`, `.scene_001.jpg.PID.part` …; pipeline/fsutil.temp_name). Run at
    start, under the spool's lock: no other writer of the page is alive. Returns how many."""
    stale = [p for p in outbox.glob(f".{PAGE}.*.part")]
    if (outbox / PAGE_ASSETS).is_dir():
        stale += [p for p in (outbox / PAGE_ASSETS).rglob(".*.part") if p.is_file()]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return len(stale)


def write_page(outbox: Path, snapshot: PageSnapshot) -> bool:
    """Write `outbox/index.html` (and its assets) for `snapshot`; True if the page changed.

    Raises OSError when the outbox cannot take it: the caller decides whether that matters.
    """
    (outbox / PAGE_ASSETS).mkdir(exist_ok=True)
    css = resources.files("daemon.report").joinpath("templates", "page.css").read_bytes()
    _write_if_changed(outbox / PAGE_ASSETS / "page.css", css)
    html = render_page(snapshot, _thumbnails(outbox, snapshot.current))
    return _write_if_changed(outbox / PAGE, html.encode("utf-8"))
