"""Shared test set-up: the one tiny model, the fixtures, and the harness (tests/harness/) re-exported.

Tests import the harness's names from here (`from conftest import Setup, story, wait_for`):
storyreel runs as a real process (a command, or a daemon over temp folders), either as shipped
or through tests/faulty.py with faults armed, and every wait is on an event.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.checks import (
    PAGE_ENTRIES,
    check_film_and_sheet,
    check_published,
    count_frames,
    has_audio,
    outbox_entries,
    read_frames,
)
from harness.daemons import Daemon, Setup, stop_leftovers
from harness.order import DURATIONS, Durations
from harness.order import longest_first as _longest_first
from harness.world import (
    FAULTY,
    HANG_SECONDS,
    REPO,
    SHARED,
    SMALL,
    command,
    story,
    storyreel,
    wait_for,
    write_config,
)

__all__ = [
    "FAULTY",
    "HANG_SECONDS",
    "PAGE_ENTRIES",
    "REPO",
    "SHARED",
    "SMALL",
    "Daemon",
    "Setup",
    "_longest_first",
    "check_film_and_sheet",
    "check_published",
    "command",
    "count_frames",
    "has_audio",
    "outbox_entries",
    "read_frames",
    "story",
    "storyreel",
    "wait_for",
    "write_config",
]

# Fixtures of real SMB/SFTP servers on loopback (tests/shares.py).
pytest_plugins = ["shares"]


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs four test processes on two cores, each running torch (in the test, in its
    daemons): one OpenMP thread each, or idle threads spin on the cores the others need (quiet,
    2 cores: 336 s with torch's default of a thread per core, 278 s with one). Set before any
    test process or daemon loads torch; nothing tested depends on the thread count, and the
    Ray actors follow the daemon's (pipeline/images/ray_start.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not hasattr(config, "workerinput"):  # the run's one controller (or a run without xdist)
        config.pluginmanager.register(Durations(config), "storyreel-durations")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, and before xdist renames items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` means "runs the real tiny model or a full daemon", and every such test needs
    `tiny_dir` (a daemon is configured with it): the fixture is the one place that says so.
    The few tests that build a tiny model of their own carry the mark themselves."""
    for item in items:
        if "tiny_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    last = getattr(config, "workerinput", {}).get(DURATIONS)  # an xdist worker's; see Durations
    if last is not None:  # a run without xdist keeps the files' order
        _longest_first(items, last)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per test session: every test and every daemon loads this one."""
    from pipeline.images.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_pipeline(path)
    return path


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    stop_leftovers()


@pytest.fixture
def setup(tmp_path: Path, tiny_dir: Path) -> Iterator[Setup]:
    yield Setup(tmp_path, tiny_dir)
