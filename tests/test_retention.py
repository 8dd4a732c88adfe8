"""`[retention]` and `[outputs] folder/zip` over real folders with mtimes in the past."""

from __future__ import annotations

import json
import os
import time
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from daemon.queue import history
from daemon.queue.claim import Identity
from daemon.queue.history import read_history
from daemon.queue.ledger import Ledger
from daemon.queue.retention import Report, enforce, list_published, plan_outbox
from daemon.queue.sidecar import append_status
from daemon.queue.spool import Spool
from daemon.report.page import PageSnapshot, write_page
from daemon.report.status import status_report
from daemon.system.hooks import Hooks
from daemon.system.notify import Notifier
from pipeline.package import build_zip, publish
from pipeline.settings import HooksSettings, RetentionSettings, Settings, settings_from_dict

NOW = time.time()
DAY = 86400


def settings(root: Path, **retention: float) -> Settings:
    s = settings_from_dict(
        {"paths": {"inbox": "inbox", "outbox": "outbox", "state": "state"}, "retention": retention}, root
    )
    for folder in (s.paths.inbox, s.paths.outbox, s.paths.state / "failed"):
        folder.mkdir(parents=True, exist_ok=True)
    return s


def retain(s: Settings, busy: set[str]) -> Report:
    """`enforce` as the daemon runs it: its `expired` lines written by the ledger."""
    spool = Spool(s.paths.state, s.paths.inbox)
    ledger = Ledger(s.paths, spool, Notifier(None), Hooks(HooksSettings(), {}))
    return enforce(s, busy, ledger.expired, now=NOW)


def age(path: Path, days: float) -> None:
    t = NOW - days * DAY
    for p in [*sorted(path.rglob("*"), reverse=True), path] if path.is_dir() else [path]:
        os.utime(p, (t, t), follow_symlinks=False)


def story(
    outbox: Path, name: str, days: float, size: int = 1000, folder: bool = True, zip_: bool = True
) -> None:
    """A published story as the daemon leaves it: folder, ZIP, sidecar ending `done`."""
    append_status(outbox, name, "queued", 0, 2)
    append_status(outbox, name, "done", 2, 2)
    paths = [outbox / f"{name}.status.jsonl"]
    if folder:
        (outbox / name / "images").mkdir(parents=True)
        (outbox / name / "images" / "scene_001.png").write_bytes(b"x" * size)
        paths.append(outbox / name)
    if zip_:
        (outbox / f"{name}.zip").write_bytes(b"z" * size)
        paths.append(outbox / f"{name}.zip")
    for p in paths:
        age(p, days)


def states(outbox: Path, name: str) -> list[str]:
    return [json.loads(x)["state"] for x in (outbox / f"{name}.status.jsonl").read_text().splitlines()]


def test_keep_days_removes_old_stories_and_nothing_else(tmp_path: Path) -> None:
    s = settings(tmp_path, keep_days=30)
    out = s.paths.outbox
    story(out, "old", 40)
    story(out, "zip-only", 45, folder=False)
    story(out, "recent", 10)
    story(out, "queued-old", 50)  # its name is in the queue again: never touched
    (out / "foreign").mkdir()  # no sidecar: not ours
    age(out / "foreign", 90)
    write_page(out, PageSnapshot(time=datetime.now(UTC), state="idle"))
    for p in (out / "index.html", out / ".storyreel"):
        age(p, 90)
    (out / ".recent.00000009.staging").mkdir()  # a publish in flight
    age(out / ".recent.00000009.staging", 90)

    report = retain(s, {"queued-old"})

    assert sorted(report.expired) == ["old", "zip-only"]
    assert report.freed_bytes == 3000
    left = {p.name for p in out.iterdir()}
    assert not {"old", "old.zip", "zip-only.zip"} & left
    assert {
        "recent",
        "recent.zip",
        "queued-old",
        "queued-old.zip",
        "foreign",
        "index.html",
        ".storyreel",
    } <= left
    assert ".recent.00000009.staging" in left
    assert not [n for n in left if n.endswith(".expiring")]
    assert states(out, "old") == ["queued", "done", "expired"]  # the sidecar stays, its last line says so
    last = json.loads((out / "old.status.jsonl").read_text().splitlines()[-1])
    assert last["error"] == "older than retention.keep_days = 30" and last["scenes"] == 2
    assert states(out, "recent")[-1] == "done" and states(out, "queued-old")[-1] == "done"
    assert retain(s, {"queued-old"}).expired == []  # repeating does nothing
    assert states(out, "old") == ["queued", "done", "expired"]


def test_the_outbox_cap_removes_the_oldest_first_and_holds(tmp_path: Path) -> None:
    s = settings(tmp_path, max_outbox_gb=0.00001)  # 10 000 bytes
    out = s.paths.outbox
    for i, name in enumerate(["a", "b", "c", "d", "e"]):
        story(out, name, days=10 - i, size=1500)  # 3000 bytes each, "a" the oldest
    story(out, "busy", days=20, size=1500)  # the oldest of all, but being made
    assert sum(p.size for p in list_published(out)) == 18000
    report = retain(s, {"busy"})
    assert report.expired == ["a", "b", "c"]
    assert sum(p.size for p in list_published(out)) <= 10000
    assert {p.name for p in list_published(out)} == {"busy", "d", "e"}
    assert retain(s, {"busy"}).expired == []  # the cap holds


def test_a_half_removed_story_is_finished_after_a_crash(tmp_path: Path) -> None:
    s = settings(tmp_path, keep_days=1)
    out = s.paths.outbox
    story(out, "x", 5)
    append_status(out, "x", "expired", 2, 2, error="older than retention.keep_days = 1")
    os.rename(out / "x", out / ".x.expiring")  # the crash came after the rename
    retain(s, set())
    assert sorted(p.name for p in out.iterdir()) == ["x.status.jsonl"]
    assert states(out, "x") == ["queued", "done", "expired"]  # not said twice


def test_plan_is_pure_and_off_by_default(tmp_path: Path) -> None:
    s = settings(tmp_path)
    story(s.paths.outbox, "ancient", 3650)
    assert plan_outbox(list_published(s.paths.outbox), set(), RetentionSettings(), NOW) == []
    (s.paths.state / "failed" / "00000001-bad.json").write_text("{}")
    age(s.paths.state / "failed" / "00000001-bad.json", 3650)
    report = retain(s, set())
    assert report.expired == [] and report.failed_inputs == []
    assert (s.paths.outbox / "ancient").is_dir()


def test_failed_inputs_older_than_failed_days_go(tmp_path: Path) -> None:
    s = settings(tmp_path, failed_days=7)
    failed = s.paths.state / "failed"
    for name, days in (("00000001-old.json", 8), ("refused-1-link.txt", 30), ("00000002-new.json", 2)):
        (failed / name).write_text("{}")
        age(failed / name, days)
    report = retain(s, set())
    assert sorted(report.failed_inputs) == ["00000001-old.json", "refused-1-link.txt"]
    assert [p.name for p in failed.iterdir()] == ["00000002-new.json"]


def test_history_compaction_keeps_identities_totals_and_recent_lines(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    spool = Spool(tmp_path / "state", inbox)
    spool.open()
    for i in range(300):
        outputs = {"images": ["a", "b"]} if i % 3 else None
        spool.remember(
            Identity(f"s{i}.json", i, i, i), f"s{i}", "failed" if outputs is None else "done", outputs=outputs
        )
    (inbox / "s5.json").write_text("{}")  # an original a crash left behind: its identity must stay
    path = spool.history_path
    before = history.totals(path)
    recent = read_history(path, 20)
    report_before = status_report(spool.state)
    spool.close()

    folded = history.compact(path, inbox, keep=50, over_bytes=1000)

    assert folded == 300 - 50 - 1
    assert len(path.read_text().splitlines()) == 1 + 50 + 1
    after = history.totals(path)
    assert after == before and before.outcomes == {"done": 200, "failed": 100} and before.scenes == 400
    reopened = Spool(tmp_path / "state", inbox)
    reopened.open()
    assert reopened.already_claimed(Identity("s5.json", 5, 5, 5))  # still never claimed twice
    assert reopened.already_claimed(Identity("s299.json", 299, 299, 299))
    assert not reopened.already_claimed(Identity("s6.json", 6, 6, 6))  # its file is long gone
    assert read_history(path, 20) == recent
    assert status_report(reopened.state) == report_before
    reopened.close()
    assert history.compact(path, inbox, keep=50, over_bytes=1000) == 0  # nothing more to fold
    history.compact(path, inbox, keep=10, over_bytes=1000)  # a second summary folds into one
    assert history.totals(path) == before
    assert sum(1 for x in read_history(path) if x["state"] == "compacted") == 1


def test_history_is_not_compacted_when_the_inbox_cannot_be_listed(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    path.write_text('{"state": "done", "identity": {"source": "a.json"}}\n' * 100)
    assert history.compact(path, tmp_path / "share-gone", keep=1, over_bytes=10) == 0
    assert len(path.read_text().splitlines()) == 100


@pytest.mark.parametrize(("folder", "zip_"), [(True, False), (False, True)])
def test_outputs_folder_or_zip_only(tmp_path: Path, folder: bool, zip_: bool) -> None:
    tree = tmp_path / "work" / "out"
    (tree / "images").mkdir(parents=True)
    (tree / "clips").mkdir()
    (tree / "images" / "scene_001.png").write_bytes(b"png")
    (tree / "clips" / "scene_001.mp4").write_bytes(b"mp4")
    (tree / "manifest.json").write_text('{"claim": "00000001"}')
    build_zip(tree, tmp_path / "work" / "package.zip", top="s")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    listed = publish(
        tree, tmp_path / "work" / "package.zip", outbox, "s", "00000001", folder=folder, zip=zip_
    )
    assert (outbox / "s").is_dir() == folder and (outbox / "s.zip").exists() == zip_
    assert ("folder" in listed) == folder and ("zip" in listed) == zip_
    if folder:
        assert listed["images"] == ["s/images/scene_001.png"]
    else:
        assert listed["images"] == ["s/images/scene_001.png"] and listed["clips"] == ["s/clips/scene_001.mp4"]
        with zipfile.ZipFile(outbox / "s.zip") as zf:  # the ZIP unpacks into one folder, s/
            assert zf.read("s/images/scene_001.png") == b"png"
