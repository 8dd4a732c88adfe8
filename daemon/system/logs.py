"""structlog set-up: JSON lines for journald/files, readable lines on a terminal."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog


def for_people(environ: Mapping[str, str]) -> bool:
    """True when stderr is a terminal that is not the journal.

    JOURNAL_STREAM alone proves nothing: a terminal opened from a systemd user session
    inherits it. systemd.exec(5) says to compare its "device:inode" with stderr's own.
    """
    try:
        if not sys.stderr.isatty():
            return False
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return environ.get("JOURNAL_STREAM") != f"{st.st_dev}:{st.st_ino}"


class BarSafeLogger(structlog.PrintLogger):
    """Prints through `tqdm.write`, which lifts any progress bar off the line, prints, and
    redraws the bar below: a log line never lands in the middle of a bar (tqdm 4.66+)."""

    def msg(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message, file=self._file)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def configure_logging(environ: Mapping[str, str], verbose: bool = False) -> None:
    """Readable lines on a terminal (where progress bars may be drawn too); JSON lines for
    journald, files and pipes."""
    people = for_people(environ)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=True) if people else structlog.processors.JSONRenderer()
    )
    logger_factory = structlog.PrintLoggerFactory(file=sys.stderr) if not people else _bar_safe_logger_factory
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=logger_factory,
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(logging.DEBUG if verbose else logging.INFO)


class ToStructlog(logging.Handler):
    """Hands stdlib logging records (watchdog's, logger "watchdog") to structlog, so they come
    out as the same JSON lines (or readable lines) as ours, with the logger's name."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, object] = {"logger": record.name}
            if record.exc_info:
                fields["exc_info"] = record.exc_info
            structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)
        except Exception:  # a log line must never take the daemon down
            self.handleError(record)


def _route_stdlib_logging(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(ToStructlog())
    root.setLevel(level)


def _bar_safe_logger_factory(*args: object) -> BarSafeLogger:
    return BarSafeLogger(file=sys.stderr)
