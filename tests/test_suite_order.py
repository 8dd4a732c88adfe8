"""How `make test` hands out the tests (conftest._longest_first, Makefile `unit`): longest first,
and a module marked `xdist_group` whole on one worker. Without these the suite still passes, only
slower (test_page_daemon's shared daemon run made four times): so they are checked here."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import _longest_first


@dataclass
class FakeItem:
    nodeid: str
    marks: dict[str, Any] = field(default_factory=dict)

    def get_closest_marker(self, name: str) -> Any:
        return self.marks.get(name)


def test_longest_first_by_the_last_run_with_groups_kept_whole() -> None:
    group = pytest.mark.xdist_group("g").mark
    slow = pytest.mark.slow.mark
    items = [
        FakeItem("a.py::fast"),
        FakeItem("b.py::one", {"xdist_group": group}),
        FakeItem("c.py::long"),
        FakeItem("b.py::two", {"xdist_group": group}),
        FakeItem("d.py::new_daemon_test", {"slow": slow}),
        FakeItem("e.py::new_unit_test"),
    ]
    last = {"a.py::fast": 0.1, "b.py::one": 20.0, "b.py::two": 20.0, "c.py::long": 35.0}
    _longest_first(items, last)  # type: ignore[arg-type]
    # the group weighs 40 s together (its own tests, in file order); unknown: 30 s if slow, else 1 s
    assert [i.nodeid for i in items] == [
        "b.py::one",
        "b.py::two",
        "c.py::long",
        "d.py::new_daemon_test",
        "e.py::new_unit_test",
        "a.py::fast",
    ]


GROUPED = """
import os, pytest
pytestmark = pytest.mark.xdist_group("shared")
@pytest.mark.parametrize("i", range(6))
def test_grouped(i):
    with open(os.environ["RECORD"], "a") as f:
        f.write(os.environ["PYTEST_XDIST_WORKER"] + "\\n")
"""


def test_an_xdist_group_runs_on_one_worker(tmp_path: Path) -> None:
    """The pytest/xdist pair installed honours xdist_group (pytest 9.2 with xdist 3.8 does not:
    pytest-dev/pytest-xdist#1386, hence the pin in pyproject.toml)."""
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_other.py").write_text("".join(f"def test_{i}(): pass\n" for i in range(6)))
    record = tmp_path / "record"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadgroup"],
        cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, "RECORD": str(record)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    workers = record.read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers
