"""The transition function: an ending interrupted at any step is finished once, and only once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import daemon.queue.sidecar
import daemon.queue.spool
from daemon.queue.claim import Claim, Identity
from daemon.queue.history import read_history
from daemon.queue.ledger import Ledger
from daemon.queue.spool import Spool
from daemon.queue.states import ENDED, State
from daemon.system.hooks import Hooks
from daemon.system.notify import Notifier
from pipeline.settings import HooksSettings, PathsSettings

from conftest import REPO, SHARED


class Crash(BaseException):
    """The process dying at this point (nothing after it runs, no handler catches it)."""


def open_ledger(root: Path) -> tuple[Spool, Ledger]:
    paths = PathsSettings(inbox=root / "inbox", outbox=root / "outbox", state=root / "state")
    spool = Spool(paths.state, paths.inbox)
    spool.open()
    return spool, Ledger(paths, spool, Notifier(None), Hooks(HooksSettings(), {}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for sub in ("inbox", "outbox", "state"):
        (tmp_path / sub).mkdir()
    return tmp_path


def claim_one(spool: Spool, data: bytes = b'{"scenes": "not a list"}') -> Claim:
    path = spool.inbox / "s.json"
    path.write_bytes(data)
    st = path.stat()
    return spool.claim(path, Identity("s.json", st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev), "s")


def sidecar(root: Path) -> list[dict[str, Any]]:
    path = root / "outbox" / "s.status.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def after(real: Callable[..., Any], when: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., Any]:
    def crash_after(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when(*args, **kwargs):
            raise Crash()
        return result

    return crash_after


def before(*args: Any, **kwargs: Any) -> Any:
    raise Crash()


def is_state(state: State) -> Callable[..., bool]:
    """For `append_line(path, data)`: whether the line being written says `state`."""
    return lambda *args, **kwargs: json.loads(args[1])["state"] == state


CRASH_POINTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "after the intent": lambda mp: mp.setattr(Spool, "keep_input", before),
    "after keeping the input": lambda mp: mp.setattr(Spool, "keep_input", after(Spool.keep_input)),
    "after the owed queued line": lambda mp: mp.setattr(
        daemon.queue.sidecar, "append_line", after(daemon.queue.sidecar.append_line, is_state(State.QUEUED))
    ),
    "after the failed line": lambda mp: mp.setattr(
        daemon.queue.sidecar, "append_line", after(daemon.queue.sidecar.append_line, is_state(State.FAILED))
    ),
    "after the history line": lambda mp: mp.setattr(Spool, "remember", after(Spool.remember)),
    "before the claim folder is removed": lambda mp: mp.setattr(daemon.queue.spool, "remove_tree", before),
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_an_ending_interrupted_at_any_step_is_finished_once(
    root: Path, point: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, ledger = open_ledger(root)
    claim = claim_one(spool)  # its "queued" line is owed: written by the ending, first
    with monkeypatch.context() as mp:
        CRASH_POINTS[point](mp)
        with pytest.raises(Crash):
            ledger.move(claim, State.FAILED, 0, 0, error="scenes: not a list")
    spool.close()

    spool, ledger = open_ledger(root)  # the restart
    (pending,) = spool.endings()
    ledger.finish_ending(pending)
    assert [(x["state"], x["seq"]) for x in sidecar(root)] == [("queued", 1), ("failed", 1)]
    assert sidecar(root)[-1]["error"] == "scenes: not a list"
    history = read_history(spool.history_path)
    assert [(h["story"], h["state"], h["seq"]) for h in history] == [("s", "failed", 1)]
    assert Path(history[0]["kept"]).read_bytes() == b'{"scenes": "not a list"}'
    assert spool.claims() == [] and spool.endings() == [] and list(spool.queue.iterdir()) == []


def test_a_full_outbox_leaves_the_ending_pending_until_it_takes_the_line(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool, ledger = open_ledger(root)
    claim = claim_one(spool)
    real = daemon.queue.sidecar.append_line

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device", "outbox/s.status.jsonl")

    monkeypatch.setattr(daemon.queue.sidecar, "append_line", full)
    for _ in range(3):  # every try fails the same way, and repeats nothing
        with pytest.raises(OSError):
            ledger.finish_ending(claim) if claim.ending else ledger.move(claim, State.CANCELLED, 0, 1)
    assert spool.endings() == [claim] and claim.input.exists() is False  # kept aside once, not lost
    monkeypatch.setattr(daemon.queue.sidecar, "append_line", real)
    ledger.finish_ending(claim)
    assert [x["state"] for x in sidecar(root)] == ["queued", "cancelled"]
    assert Path(sidecar(root)[-1]["input_kept"]).parent == spool.cancelled
    assert spool.endings() == []


def test_pause_marker_follows_the_last_line(root: Path) -> None:
    spool, ledger = open_ledger(root)
    claim = claim_one(spool, b'{"scenes": ["x"]}')
    ledger.move(claim, State.QUEUED, 0, 1)
    ledger.move(claim, State.PAUSED, 0, 1)
    spool.close()
    spool, ledger = open_ledger(root)
    (again,) = spool.claims()
    assert again.paused  # a restart does not write "paused" a second time
    ledger.move(again, State.QUEUED, 0, 1)
    assert not again.paused and not (again.folder / "paused").exists()
    assert [x["state"] for x in sidecar(root)] == ["queued", "paused", "queued"]


def test_the_states_are_the_contracts() -> None:
    contract = SHARED / "contract.md"
    if not contract.exists():
        pytest.skip(f"no {contract} beside this checkout (a worktree elsewhere)")
    line = next(x for x in contract.read_text().splitlines() if '"state": "queued"' in x)
    listed = line.split('"state": ', 1)[1].split(', "scene"')[0]
    assert [s.strip('"') for s in listed.split("|")] == [s.value for s in State]
    assert {State.DONE, State.FAILED, State.CANCELLED, State.EXPIRED} == ENDED


def test_the_readme_state_table_lists_exactly_the_states() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme.split("| state |", 1)[1].split("\n\n", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()[2:] if line.startswith("|")]
    assert rows == [s.value for s in State]


def test_idle_turns_write_nothing(root: Path) -> None:
    """An idle loop calls `idle()` every turn: current.json is written once, and only on a change."""
    spool, ledger = open_ledger(root)
    told: list[object] = []
    ledger.activity.listener.changed = lambda view=None: told.append(view)  # type: ignore[method-assign]
    ledger.activity.started()
    current = root / "state" / "current.json"
    ledger.activity.idle(None)
    before = (current.stat().st_ino, current.stat().st_mtime_ns)
    count = len(told)
    for _ in range(50):
        ledger.activity.idle(None)
    assert (current.stat().st_ino, current.stat().st_mtime_ns) == before and len(told) == count
    ledger.activity.idle("inbox gone")  # a change: written, and the listener told
    assert json.loads(current.read_text())["inbox"] == "inbox gone" and len(told) == count + 1
    spool.close()
