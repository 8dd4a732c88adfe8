"""structlog set-up: JSON lines for journald/files, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping

import structlog


def configure_logging(environ: Mapping[str, str], verbose: bool = False) -> None:
    """JSON when systemd runs us (JOURNAL_STREAM set) or output is not a terminal."""
    to_terminal = sys.stderr.isatty() and "JOURNAL_STREAM" not in environ
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer(colors=True) if to_terminal else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
