"""A corpus of hostile inputs through the real daemon in one go, a valid story last."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from conftest import Setup, check_published

SECRET = "TOP-SECRET-CONTENT-4711"

BAD: dict[str, tuple[bytes, str]] = {
    "not-json.json": (b"hello there", "not valid JSON"),
    "truncated.json": (b'{"scenes": ["a lake", ', "not valid JSON"),
    "empty.json": (b"", "empty"),
    "blank.json": (b"  \n\n\t  ", "empty"),
    "garbage.json": (bytes(range(256)) * 4, "UTF-8"),
    "array.json": (b'["a", "b"]', "JSON object"),
    "deep.json": (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    "nan.json": (b'{"scenes": ["x"], "seed": NaN}', "NaN"),
    "inf.json": (b'{"scenes": [{"description": "x", "seconds": Infinity}]}', "Infinity"),
    "utf16.json": ('{"scenes": ["x"]}'.encode("utf-16"), "UTF-16"),
    "latin1.json": ('{"scenes": ["café"]}'.encode("latin-1"), "UTF-8"),
    "typo.json": (b'{"scenes": ["x"], "titel": "t"}', "titel"),
    "seed.json": (b'{"scenes": [{"description": "x", "seed": 4294967296}]}', "scenes.0.seed"),
    "motion.json": (b'{"scenes": [{"description": "x", "motion": "spin"}]}', "scenes.0.motion"),
    "noscenes.json": (b'{"title": "t"}', "scenes"),
    "toomany.json": (json.dumps({"scenes": ["x"] * 500}).encode(), "limit of 200"),
    "huge.json": (b'{"scenes": ["' + b"x" * 30_000_000 + b'"]}', "over the limit"),
    "traversal.json": (b'{"title": "../../../etc/x", "scenes": [{"description": "x", "seed": -5}]}', "seed"),
}

IGNORED = [
    ".hidden.json",
    "draft.json.part",
    "copy.json.tmp",
    "~$lock.json",
    ".~lock.story.json#",
    "notes.txt",
    "story.json.crdownload",
    "README",
]


def snapshot(root: Path, skip: set[Path]) -> set[str]:
    out = set()
    for p in root.rglob("*"):
        if not any(p == s or s in p.parents for s in skip):
            out.add(str(p.relative_to(root)))
    return out


def test_hostile_corpus(setup: Setup, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    base = time.time() - 1000
    for i, (name, (data, _)) in enumerate(BAD.items()):
        setup.drop(name, data, in_place=True, mtime=base + i)
    for name in IGNORED:
        (setup.inbox / name).write_text("{}")
    (setup.inbox / "link.json").symlink_to(secret)
    os.mkfifo(setup.inbox / "fifo.json")
    (setup.inbox / "folder.json").mkdir()
    # Two names that sanitise alike must not overwrite each other.
    setup.drop("a:b.json", {"scenes": ["a quiet pond"]}, mtime=base + 100)
    setup.drop("a_b.json", {"scenes": ["a windy hill"]}, mtime=base + 101)
    setup.drop("zz-valid.json", {"title": "../../../x", "scenes": ["a lighthouse at dawn"]}, mtime=base + 200)
    before = snapshot(tmp_path, {setup.inbox, setup.outbox, setup.state})

    result = setup.run_once(timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    for name, (data, words) in BAD.items():
        stem = name[:-5]
        last = setup.status(stem)[-1]
        assert last["state"] == "failed", (name, last)
        assert words in last["error"], (name, last["error"])
        assert Path(last["input_kept"]).read_bytes() == data, name
    for name in IGNORED:
        assert (setup.inbox / name).read_text() == "{}"
    assert not any(setup.outbox.glob(".hidden*")) and not (setup.outbox / "notes.status.jsonl").exists()
    link = setup.status("link")[-1]
    assert link["state"] == "failed" and "symbolic link" in link["error"]
    fifo = setup.status("fifo")[-1]
    assert fifo["state"] == "failed" and "not a regular file" in fifo["error"]
    assert (setup.inbox / "folder.json").is_dir() and not (setup.outbox / "folder.status.jsonl").exists()
    for root in (setup.outbox, setup.state):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and p.stat().st_size < 50_000_000:
                assert SECRET.encode() not in p.read_bytes(), p
    check_published(setup, "a_b", 1)
    check_published(setup, "a_b-2", 1)
    assert json.loads((setup.outbox / "a_b" / "story.json").read_text())["scenes"] == ["a quiet pond"]
    check_published(setup, "zz-valid", 1)
    assert snapshot(tmp_path, {setup.inbox, setup.outbox, setup.state}) == before
    assert secret.read_text() == SECRET
