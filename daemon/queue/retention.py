"""`[retention]`: what may leave the outbox and the state folder, and when.

Planning is a pure function of a listing (names, sizes, mtimes), the names that
are queued or being made, the limits and the time, so it is tested without a
daemon. Executing a plan is done by the daemon between stories (the spool's lock
held): for each story the sidecar gets a last `expired` line first (written by
the ledger, the one place a story changes state: `Ledger.expired`), the removal
is logged, then its folder (renamed to a hidden name first, so nothing
half-removed is visible under the story's name) and its ZIP go. The sidecar
stays, small, as the record of what happened; it also keeps the name taken, so a
later story never reuses it. Every step is safe to repeat after a crash.

Only names that are ours are considered: a folder or ZIP with a sidecar beside it.
Hidden names, the status page (index.html, .storyreel/) and foreign files are
never touched. A story in the queue or being made is never touched.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from daemon.queue import history
from pipeline.fsutil import fsync_dir, remove_tree
from pipeline.names import SIDECAR_SUFFIX, is_reserved
from pipeline.settings import RetentionSettings, Settings

log = structlog.get_logger("storyreel.retention")

# Says that NAME's outputs go, and why: `daemon.queue.ledger.Ledger.expired`. Raises OSError when it cannot.
RecordExpiry = Callable[[str, str], None]

DAY = 86400.0
GB = 1e9
EXPIRING = ".expiring"


@dataclass(frozen=True)
class Published:
    """One story's removable outputs in the outbox."""

    name: str
    paths: tuple[Path, ...]  # outbox/NAME/ and/or outbox/NAME.zip
    mtime: float  # the newest of them: when it was published
    size: int  # bytes


@dataclass(frozen=True)
class Removal:
    story: Published
    reason: str


@dataclass
class Report:
    expired: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    failed_inputs: list[str] = field(default_factory=list)
    history_lines_folded: int = 0


# ------------------------------------------------------------------ listing


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def list_published(outbox: Path) -> list[Published]:
    """Stories of ours with something removable: a folder or ZIP with a sidecar beside it."""
    found: dict[str, list[Path]] = {}
    sidecars: set[str] = set()
    for entry in os.scandir(outbox):
        name = entry.name
        if name.startswith(".") or is_reserved(name):
            continue
        if name.endswith(SIDECAR_SUFFIX):
            sidecars.add(name[: -len(SIDECAR_SUFFIX)])
        elif entry.is_dir(follow_symlinks=False):
            found.setdefault(name, []).append(Path(entry.path))
        elif name.endswith(".zip") and entry.is_file(follow_symlinks=False):
            found.setdefault(name[:-4], []).append(Path(entry.path))
    out = []
    for name, paths in sorted(found.items()):
        if name not in sidecars:
            continue  # not ours
        # Not the sidecar's mtime: the `expired` line itself would make the story young again.
        mtime = max(p.lstat().st_mtime for p in paths)
        size = sum(_tree_size(p) if p.is_dir() else p.lstat().st_size for p in paths)
        out.append(Published(name, tuple(sorted(paths)), mtime, size))
    return out


def list_files(folder: Path) -> list[tuple[Path, float]]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            if entry.is_file(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_mtime))
    return out


# ------------------------------------------------------------------ planning (pure)


def plan_outbox(
    stories: Iterable[Published], busy: Collection[str], limits: RetentionSettings, now: float
) -> list[Removal]:
    """What to remove: stories older than keep_days, then the oldest until under max_outbox_gb.

    `busy` holds the names queued or being made: never removed, though they count
    toward the cap (which may then stay exceeded until they are done).
    """
    stories = list(stories)
    candidates = sorted((s for s in stories if s.name not in busy), key=lambda s: (s.mtime, s.name))
    plan: list[Removal] = []
    if limits.keep_days > 0:
        cutoff = now - limits.keep_days * DAY
        reason = f"older than retention.keep_days = {limits.keep_days:g}"
        plan += [Removal(s, reason) for s in candidates if s.mtime < cutoff]
    if limits.max_outbox_gb > 0:
        cap = limits.max_outbox_gb * GB
        going = {r.story.name for r in plan}
        total = sum(s.size for s in stories if s.name not in going)
        reason = f"outbox over retention.max_outbox_gb = {limits.max_outbox_gb:g}"
        for s in candidates:
            if total <= cap:
                break
            if s.name not in going:
                plan.append(Removal(s, reason))
                total -= s.size
    return plan


def plan_failed(files: Iterable[tuple[Path, float]], failed_days: float, now: float) -> list[Path]:
    """Kept inputs of failed stories (and refusal records) older than failed_days."""
    if failed_days <= 0:
        return []
    cutoff = now - failed_days * DAY
    return sorted(path for path, mtime in files if mtime < cutoff)


# ------------------------------------------------------------------ executing


def expire(outbox: Path, removal: Removal, record: RecordExpiry) -> None:
    """Sidecar line, log, then the outputs go. Repeating it after a crash at any step is harmless."""
    story = removal.story
    record(story.name, removal.reason)
    log.info("expired", story=story.name, reason=removal.reason, freed_bytes=story.size)
    for path in story.paths:
        if path.is_dir():
            hidden = path.with_name(f".{path.name}{EXPIRING}")
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, hidden)
            remove_tree(hidden)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    fsync_dir(outbox)


def _clear_leftovers(outbox: Path) -> None:
    """Folders a crash left half-removed under their hidden name."""
    for entry in os.scandir(outbox):
        if entry.name.startswith(".") and entry.name.endswith(EXPIRING):
            remove_tree(Path(entry.path))


def enforce(
    settings: Settings, busy: Collection[str], record: RecordExpiry, now: float | None = None
) -> Report:
    """Apply `[retention]` once: the outbox (`enforce_outbox`), then the state folder (`enforce_state`).

    Raises OSError when the outbox or state cannot be listed or written (the caller waits).
    """
    report = enforce_outbox(settings, busy, record, now)
    enforce_state(settings, report, now)
    return report


def enforce_outbox(
    settings: Settings, busy: Collection[str], record: RecordExpiry, now: float | None = None
) -> Report:
    """What goes from the outbox; the daemon runs it on the outbox's lane (a share may hang), with
    `busy` (the names queued or being made) as they were when it was asked for.

    `record(name, reason)` writes the story's `expired` line before anything goes. Raises OSError
    when the outbox cannot be listed or written.
    """
    now = time.time() if now is None else now
    limits, outbox = settings.retention, settings.paths.outbox
    report = Report()
    if limits.keep_days > 0 or limits.max_outbox_gb > 0:
        _clear_leftovers(outbox)
        for removal in plan_outbox(list_published(outbox), busy, limits, now):
            expire(outbox, removal, record)
            report.expired.append(removal.story.name)
            report.freed_bytes += removal.story.size
    return report


def enforce_state(settings: Settings, report: Report, now: float | None = None) -> None:
    """What goes from the state folder (local disk; the daemon runs it holding the spool's lock):
    kept inputs of failed stories past `failed_days`, and history compaction. Noted in `report`."""
    now = time.time() if now is None else now
    limits, state = settings.retention, settings.paths.state
    for path in plan_failed(list_files(state / "failed"), limits.failed_days, now):
        reason = f"older than retention.failed_days = {limits.failed_days:g}"
        log.info("failed input removed", path=str(path), reason=reason)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        report.failed_inputs.append(path.name)
    keep = max(history.KEEP_LINES, settings.daemon.history)
    report.history_lines_folded = history.compact(state / history.HISTORY, settings.paths.inbox, keep)
