"""The house's floors: which room may import which, no cycles, nothing too large to hold in one's head.

pipeline/ is the library and never reaches into daemon/. Inside daemon/ the rooms stand on each
other (lowest first): system, inbox, queue, then report and run side by side, then the loop and
the commands, then cli.py. A room imports only from rooms below it (or itself); nothing below
imports the loop; the report only reads what the queue wrote. The data comes from
tests/rooms.py (`python tests/rooms.py` prints the rooms' sizes).
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO
from rooms import cycles, edges, modules

FOUND = modules()
GRAPH = edges(FOUND)

FLOORS = {"system": 0, "inbox": 1, "queue": 2, "report": 3, "run": 3, "loop": 4, "commands": 4, "cli": 5}

# What the report may take from the queue: readers and types, never a writer (the report only reads).
REPORT_READS = {
    "daemon.queue.claim": {"Claim", "queue_folder", "read_claims"},
    "daemon.queue.controls": {"as_source", "box_pause", "pause_text"},
    "daemon.queue.current": {"read_current", "running"},
    "daemon.queue.history": {"HISTORY", "SUMMARY", "read_history", "totals"},
    "daemon.queue.notices": {"recent_notices"},
    "daemon.queue.sidecar": {"last_status", "read_status"},
    "daemon.queue.states": {"State", "ENDED"},
    "daemon.queue": {"history"},  # `from daemon.queue import history`: its readers, as above
}


def floor(module: str) -> int:
    room = module.split(".")[1] if module.count(".") else "system"  # daemon/__init__.py: empty
    return FLOORS[room]


def test_every_room_has_a_floor() -> None:
    rooms = {m.split(".")[1] for m in FOUND if m.startswith("daemon.")}
    assert rooms == set(FLOORS), "a new room of daemon/ needs its floor here"


def test_pipeline_never_imports_daemon() -> None:
    offenders = {
        m: sorted(t for t in GRAPH[m] if t.startswith("daemon")) for m in GRAPH if m.startswith("pipeline")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_rooms_import_only_from_below() -> None:
    """Function-local imports count: a lazy import upward is still a floor broken."""
    offenders = {}
    for module, targets in GRAPH.items():
        if not module.startswith("daemon."):
            continue
        room = module.split(".")[1]
        up = [
            t
            for t in targets
            if t.startswith("daemon.") and t.split(".")[1] != room and floor(t) >= floor(module)
        ]
        if up:
            offenders[module] = sorted(up)
    assert offenders == {}


def test_nothing_below_imports_the_loop() -> None:
    importers = sorted(m for m, targets in GRAPH.items() if "daemon.loop" in targets)
    assert importers == ["daemon.cli"]


def test_the_report_only_reads() -> None:
    """From the queue it takes readers (sidecars, current.json, history, claims as they are on
    disk) and types; the claims of a running daemon come in as a function, never its spool."""
    taken = {}
    for name, module in FOUND.items():
        if not name.startswith("daemon.report"):
            continue
        for target, names, line in module.imports():
            if target.startswith("daemon.queue"):
                extra = set(names) - REPORT_READS.get(target, set())
                if extra or not names:
                    taken[f"{name}:{line}"] = f"{target}: {sorted(extra) or 'the module'}"
    assert taken == {}


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_function_local_cycle() -> None:
    """The finder itself, on a made-up graph: a cycle closed by a lazy import is a cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("package", ["daemon", "pipeline"])
def test_no_class_over_250_lines_and_no_module_over_400(package: str) -> None:
    big = {
        f"{m.name}.{c}": n
        for m in FOUND.values()
        if m.name.split(".")[0] == package
        for c, n in m.classes()
        if n > 250
    }
    long = {m.name: m.lines for m in FOUND.values() if m.name.split(".")[0] == package and m.lines > 400}
    assert (big, long) == ({}, {})


def imported_after(code: str) -> list[str]:
    """Which heavy libraries a fresh interpreter has imported after running `code`."""
    probe = f"{code}; import sys; print([m for m in ('torch', 'diffusers', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return list(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_light_commands_do_not_import_torch() -> None:
    code = "from daemon.cli import main; import pipeline.video.kenburns, pipeline.story; main(['schema'])"
    assert imported_after(code) == []


def test_the_image_seam_imports_nothing_heavy() -> None:
    """The seam's types, the engine factory and the local engine: no torch, diffusers or Ray."""
    assert imported_after("import pipeline.images.seam, pipeline.images.factory, pipeline.images.local") == []
