"""The spool's naming rule, and publishing, at the crash points that matter."""

from __future__ import annotations

import errno
import json
import os
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

import daemon.queue.claim
import daemon.queue.spool
from daemon.queue.claim import Attempts, Identity, read_claims
from daemon.queue.history import read_history
from daemon.queue.spool import Spool, SpoolLocked, _move_in
from pipeline.package import build_zip, publish


def identity_of(path: Path) -> Identity:
    st = path.stat()
    return Identity(path.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    (tmp_path / "inbox").mkdir()
    s = Spool(tmp_path / "state", tmp_path / "inbox")
    s.open()
    return s


def drop(spool: Spool, name: str, data: bytes = b'{"scenes": ["x"]}') -> Path:
    path = spool.inbox / name
    path.write_bytes(data)
    return path


def test_claims_run_in_sequence_order_and_numbers_only_grow(spool: Spool) -> None:
    for name in ("b.json", "a.json", "c.json"):
        path = drop(spool, name)
        spool.claim(path, identity_of(path), name[0])
        assert not path.exists()
    claims = spool.claims()
    assert [(c.seq, c.name) for c in claims] == [(1, "b"), (2, "a"), (3, "c")]
    spool.finish(claims[2], "done")
    path = drop(spool, "d.json")
    assert spool.claim(path, identity_of(path), "d").seq == 4  # never reuses 3


def test_a_second_daemon_is_refused(spool: Spool) -> None:
    other = Spool(spool.state, spool.inbox)
    with pytest.raises(SpoolLocked):
        other.open()


def test_copy_across_filesystems_keeps_the_original_until_the_claim_exists(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate EXDEV (inbox on a share): copy, fsync, rename the claim in, then remove."""
    real_rename = os.rename

    def rename(src: object, dst: object) -> None:
        if str(src).startswith(str(spool.inbox)):
            raise OSError(errno.EXDEV, "cross-device link")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    path = drop(spool, "s.json", b'{"scenes": ["copied"]}')
    claim = spool.claim(path, identity_of(path), "s")
    assert claim.input.read_bytes() == b'{"scenes": ["copied"]}'
    assert not path.exists()


def test_crash_after_copy_before_unlink_does_not_claim_twice(spool: Spool) -> None:
    path = drop(spool, "s.json")
    ident = identity_of(path)
    # The copy made it into the queue; the crash came before the original was removed.
    stage = spool.tmp / "00000001"
    stage.mkdir()
    (stage / "claim.json").write_text(
        json.dumps({"seq": 1, "name": "s", "identity": ident.__dict__, "claimed": "t"})
    )
    (stage / "input.json").write_bytes(path.read_bytes())
    os.rename(stage, spool.queue / "00000001")
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert again.already_claimed(identity_of(path))  # the claimer removes it instead of claiming
    assert len(again.claims()) == 1


def test_the_same_inode_on_another_filesystem_is_another_file(spool: Spool) -> None:
    path = drop(spool, "s.json")
    ident = identity_of(path)
    spool.claim(path, ident, "s")
    assert ident.dev is not None
    twin = Identity(ident.source, ident.size, ident.mtime_ns, ident.inode, ident.dev + 1)
    assert spool.already_claimed(ident) and not spool.already_claimed(twin)
    spool.finish(spool.claims()[0], "done")
    again = Spool(spool.state, spool.inbox)  # from history.jsonl, as after a restart
    spool.close()
    again.open()
    assert again.already_claimed(ident) and not again.already_claimed(twin)


def test_records_from_before_the_device_was_kept_still_match(spool: Spool) -> None:
    """claim.json and history.jsonl written by the previous version have no "dev"."""
    queued = drop(spool, "q.json")
    finished = drop(spool, "f.json")
    old = {
        p.name: {k: v for k, v in asdict(identity_of(p)).items() if k != "dev"} for p in (queued, finished)
    }
    folder = spool.queue / "00000001"
    folder.mkdir()
    (folder / "claim.json").write_text(
        json.dumps({"seq": 1, "name": "q", "identity": old["q.json"], "claimed": "t"})
    )
    (folder / "input.json").write_bytes(queued.read_bytes())
    line = {"time": "t", "story": "f", "state": "done", "identity": old["f.json"], "seq": 0}
    spool.history_path.write_text(json.dumps(line) + "\n")
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert again.already_claimed(identity_of(queued)) and again.already_claimed(identity_of(finished))
    (claim,) = again.claims()
    assert claim.identity.dev is None
    again.finish(claim, "done")
    assert again.claims() == [] and again.already_claimed(identity_of(queued))


def test_crash_inside_tmp_is_rolled_back_or_forward(spool: Spool) -> None:
    # (a) copied into tmp, original still in the inbox: roll back (it is claimed again later)
    path = drop(spool, "a.json")
    stage = spool.tmp / "00000001"
    stage.mkdir()
    (stage / "claim.json").write_text(
        json.dumps({"seq": 1, "name": "a", "identity": identity_of(path).__dict__, "claimed": "t"})
    )
    (stage / "input.json").write_bytes(path.read_bytes())
    # (b) renamed into tmp (same filesystem): the inbox no longer has it, so roll forward
    other = drop(spool, "b.json")
    ident_b = identity_of(other)
    stage_b = spool.tmp / "00000002"
    stage_b.mkdir()
    (stage_b / "claim.json").write_text(
        json.dumps({"seq": 2, "name": "b", "identity": ident_b.__dict__, "claimed": "t"})
    )
    assert _move_in(other, stage_b / "input.json", ident_b)
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert [c.name for c in again.claims()] == ["b"]
    assert path.exists() and list(again.tmp.iterdir()) == []


def test_a_claim_owes_its_queued_line_until_marked(spool: Spool) -> None:
    path = drop(spool, "s.json")
    claim = spool.claim(path, identity_of(path), "s")
    assert not claim.announced()
    claim.mark_announced()
    assert claim.announced()
    claim.mark_announced()  # repeatable: a crash may come between the line and the mark
    assert read_claims(spool.queue)[0].announced()


def test_attempts_are_persisted(spool: Spool) -> None:
    path = drop(spool, "s.json")
    claim = spool.claim(path, identity_of(path), "s")
    assert claim.attempts() == Attempts()
    claim.save_attempts(Attempts(crashes=2, running=True, fault_mark=7))
    assert read_claims(spool.queue)[0].attempts() == Attempts(2, 0, True, 7)


def test_failed_input_is_kept_byte_for_byte(spool: Spool) -> None:
    path = drop(spool, "bad.json", b"\x00\xffnot json")
    claim = spool.claim(path, identity_of(path), "bad")
    kept = spool.keep_input(claim, spool.failed)
    spool.finish(claim, "failed", error="x")
    assert kept.read_bytes() == b"\x00\xffnot json"
    assert spool.claims() == [] and read_history(spool.history_path)[-1]["state"] == "failed"


def _tree(root: Path, claim: str) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "images" / "scene_001.png").write_bytes(b"png")
    (root / "manifest.json").write_text(json.dumps({"claim": claim}))
    return root


def test_publish_is_atomic_and_idempotent(tmp_path: Path) -> None:
    tree = _tree(tmp_path / "work" / "out", "00000007")
    zip_path = tmp_path / "work" / "package.zip"
    build_zip(tree, zip_path, top="s")
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    publish(tree, zip_path, outbox, "s", "00000007")
    # A crash after the folder's rename but before the ZIP: publishing again completes it.
    (outbox / "s.zip").unlink()
    publish(tree, zip_path, outbox, "s", "00000007")
    assert sorted(p.name for p in outbox.iterdir()) == ["s", "s.zip"]
    with zipfile.ZipFile(outbox / "s.zip") as zf:
        assert sorted(zf.namelist()) == ["s/images/scene_001.png", "s/manifest.json"]
    with pytest.raises(FileExistsError):
        publish(tree, zip_path, outbox, "s", "00000008")  # someone else's output: never overwritten


def test_the_queue_is_read_from_disk_once(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loop turn never re-reads the claims: after open, the spool answers from memory."""
    for name in ("a", "b"):
        path = drop(spool, f"{name}.json")
        spool.claim(path, identity_of(path), name)
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()

    def no_reading(*args: object) -> None:
        raise AssertionError("claims re-read from disk")

    monkeypatch.setattr(daemon.queue.claim, "read_claim", no_reading)
    monkeypatch.setattr(daemon.queue.spool, "read_claims", no_reading)
    path = drop(again, "c.json")
    again.claim(path, identity_of(path), "c")
    assert [c.name for c in again.claims()] == ["a", "b", "c"] and again.head() is again.claims()[0]
    assert again.queued("b") is again.claims()[1] and "c" in again.names_in_use() and len(again) == 3
    again.finish(again.claims()[0], "done")
    assert [c.name for c in again.claims()] == ["b", "c"] and "a" not in again.names_in_use()


def test_an_ending_under_way_survives_a_restart(spool: Spool) -> None:
    path = drop(spool, "s.json")
    claim = spool.claim(path, identity_of(path), "s")
    spool.begin_ending(claim, {"state": "cancelled", "scene": 0, "scenes": 1, "facts": {}})
    kept = spool.keep_input(claim, spool.cancelled)
    assert spool.keep_input(claim, spool.cancelled) == kept and kept.read_bytes() == b'{"scenes": ["x"]}'
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    (ending,) = again.endings()
    assert ending.ending is not None and ending.ending["state"] == "cancelled"
    again.finish(ending, "cancelled", kept=str(kept))
    again.finish(ending, "cancelled", kept=str(kept))  # repeatable: one history line per claim
    assert [h["state"] for h in read_history(again.history_path)] == ["cancelled"] and again.endings() == []


def test_retry_requeues_the_kept_input_at_the_end_under_the_same_name(spool: Spool) -> None:
    path = drop(spool, "s.json", b'{"scenes": ["retried"]}')
    first = spool.claim(path, identity_of(path), "s")
    kept = spool.keep_input(first, spool.failed)
    spool.finish(first, "failed", error="x", kept=str(kept))
    other = drop(spool, "t.json")
    spool.claim(other, identity_of(other), "t")
    ended = spool.last_ended("s")
    assert ended is not None
    again = spool.requeue(dict(ended), "box:1-2.retry.json")
    assert (again.name, again.seq, again.request) == ("s", 3, "box:1-2.retry.json")
    assert [c.name for c in spool.claims()] == ["t", "s"]  # at the end of the queue
    assert again.input.read_bytes() == kept.read_bytes() == b'{"scenes": ["retried"]}'  # copied, still kept
    assert not again.announced()  # its new "queued" line is owed
    spool.close()
    reopened = Spool(spool.state, spool.inbox)
    reopened.open()
    found = reopened.queued("s")
    assert found is not None and found.request == "box:1-2.retry.json"


def test_a_retry_a_crash_interrupted_is_rolled_back(spool: Spool) -> None:
    """Its request is still there (removed only once the claim exists): the retry is made again."""
    path = drop(spool, "s.json")
    stage = spool.tmp / "00000001"
    stage.mkdir()
    ident = identity_of(path)
    meta = {"seq": 1, "name": "s", "identity": asdict(ident), "claimed": "t", "request": "box:x"}
    (stage / "claim.json").write_text(json.dumps(meta))
    (stage / "input.json").write_bytes(path.read_bytes())
    path.unlink()  # would roll forward for a drop; not for a retry
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert again.claims() == [] and list(again.tmp.iterdir()) == []


def test_a_claim_is_removed_whole_or_not_at_all(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 inside the removal of a finished claim's folder: on restart it is neither a claim
    again (seen under load: a cancelled story's folder left with claim.json only, read as a
    queued story without input, and the queue stuck on it) nor a leftover."""
    path = drop(spool, "c.json")
    claim = spool.claim(path, identity_of(path), "c")
    kept = drop(spool, "k.json")
    spool.claim(kept, identity_of(kept), "k")

    def crash(path: Path) -> None:  # the rename out of queue/ happened; the deletion did not
        if path.exists():
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(daemon.queue.spool, "remove_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        spool.finish(claim, "cancelled")
    monkeypatch.undo()
    assert not claim.folder.exists()
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert [c.name for c in again.claims()] == ["k"]
    assert list(again.tmp.iterdir()) == []


def test_a_half_removed_claim_from_an_older_version_is_finished_at_start(spool: Spool) -> None:
    """Before removal was one rename, a crash could leave claim.json alone in a finished claim's
    folder; history says it ended, so the start removes the rest instead of running it."""
    path = drop(spool, "c.json")
    claim = spool.claim(path, identity_of(path), "c")
    spool.remember(claim.identity, claim.name, "cancelled", seq=claim.seq)
    for child in claim.folder.iterdir():
        if child.name != "claim.json":
            child.unlink() if child.is_file() else None
    spool.close()
    again = Spool(spool.state, spool.inbox)
    again.open()
    assert again.claims() == [] and not claim.folder.exists()
