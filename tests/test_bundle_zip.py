"""Hostile ZIPs: each refused with one line naming the entry and the limit; nothing written outside.

Every archive here is real bytes on disk, made with zipfile or with hand-built headers
(tests/bundles.py), and read by the same code the daemon runs.
"""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from pipeline.bundle import BundleError, extract_bundle, inspect_bundle
from pipeline.bundle.archive import Budget, open_zip, read_listing, stream_entry
from pipeline.settings import LimitsSettings
from pipeline.story import StoryError

from bundles import (
    HOSTILE,
    HOSTILE_LIMITS,
    STORY,
    Bomb,
    entry,
    good_bundle,
    picture_bytes,
    write_bundle,
    write_raw_zip,
)
from harness.mounts import mount_tmpfs

LIMITS = LimitsSettings(**HOSTILE_LIMITS)


def tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_bundle_fails_with_one_line_and_writes_nothing(kind: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    zip_path = HOSTILE[kind].build(tmp_path / "in" / "hostile.zip")
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)
    cwd = os.getcwd()
    os.chdir(work)  # a relative name that escaped would land here
    try:
        with pytest.raises(BundleError) as err:
            extract_bundle(zip_path, work / "bundle", LIMITS)
    finally:
        os.chdir(cwd)
    assert len(err.value.problems) == 1, err.value.problems
    (line,) = err.value.problems
    assert HOSTILE[kind].reason in line, line
    assert "\n" not in line and "/tmp/" not in line and str(tmp_path) not in line
    assert isinstance(err.value, StoryError)  # reported like any bad story
    assert tree(tmp_path) == before  # the target is gone again, and nothing appeared anywhere
    assert not Path("/etc/cron.d/x").exists()


def test_every_hostile_kind_is_one_a_good_bundle_is_not(tmp_path: Path) -> None:
    """The limits the hostile kinds are tried under let a good bundle through."""
    bundle = extract_bundle(good_bundle(tmp_path / "good.zip"), tmp_path / "out", LIMITS)
    assert len(bundle.files) == 3


def test_names_are_checked_for_ignored_entries_too(tmp_path: Path) -> None:
    """Finder's junk is never extracted, but a dangerous name under __MACOSX/ is still refused."""
    zip_path = write_raw_zip(
        tmp_path / "b.zip",
        [entry("story.json", STORY), entry("a.png", picture_bytes()), entry("__MACOSX/../../x", b"x")],
    )
    with pytest.raises(BundleError, match=r"'__MACOSX/\.\./\.\./x': '\.\.' in its path"):
        inspect_bundle(zip_path, LIMITS)


def test_every_entry_counts_against_max_bundle_files(tmp_path: Path) -> None:
    """Folders and Finder's junk count: 1 story + 1 picture + 1 folder + 2 junk = 5 entries."""
    entries = [
        entry("story.json", STORY),
        entry("a.png", picture_bytes()),
        entry("notes/", b"", external_attr=0o40755 << 16),
        entry("__MACOSX/._a.png", b"x"),
        entry(".DS_Store", b"x"),
    ]
    zip_path = write_raw_zip(tmp_path / "b.zip", entries)
    inspect_bundle(zip_path, LimitsSettings(max_bundle_files=5))
    with pytest.raises(
        BundleError, match=r"^\(bundle\): 5 entries is over the limit of 4 \(limits.max_bundle_files\)$"
    ):
        inspect_bundle(zip_path, LimitsSettings(max_bundle_files=4))


def test_unnamed_entries_count_against_the_byte_budget(tmp_path: Path) -> None:
    """A file the story never names is still inflated (and counted), though not written."""
    files = {"a.png": picture_bytes(), "unused/big.bin": bytes(300_000)}
    zip_path = write_bundle(tmp_path / "b.zip", STORY, files)
    ok = extract_bundle(zip_path, tmp_path / "ok", LimitsSettings(max_bundle_bytes=400_000))
    assert "unused" not in tree(tmp_path / "ok") and ok.unpacked_bytes >= 300_000
    with pytest.raises(BundleError, match=r"'unused/big.bin': the bundle unpacks to more than 200000 bytes"):
        extract_bundle(zip_path, tmp_path / "no", LimitsSettings(max_bundle_bytes=200_000))


def test_budget_is_taken_before_bytes_reach_the_disk(tmp_path: Path) -> None:
    """Bytes are counted as they come out of the decompressor, and a chunk over the budget is
    refused before it is handed on: the sink (a file) never holds more than the limit."""
    bomb = Bomb(5_000_000)
    zip_path = write_raw_zip(tmp_path / "b.zip", [bomb.entry("x.bin")])
    seen = []
    with open_zip(zip_path, LIMITS) as zf:
        info = zf.infolist()[0]
        budget = Budget(1_000_000)
        with pytest.raises(BundleError, match="more than 1000000 bytes"):
            stream_entry(zf, info, budget, seen.append)
    assert sum(map(len, seen)) <= 1_000_000  # nothing past the budget reached the sink
    assert budget.used <= 1_000_000 + (1 << 20)  # one chunk at most was inflated beyond it


def test_inflating_reads_bounded_chunks(tmp_path: Path) -> None:
    """Memory stays bounded whatever the ratio: no chunk handed on is over 1 MiB."""
    zip_path = write_raw_zip(tmp_path / "b.zip", [Bomb(20_000_000).entry("x.bin")])
    sizes: list[int] = []
    with open_zip(zip_path, LIMITS) as zf:
        stream_entry(zf, zf.infolist()[0], Budget(10**9), lambda c: sizes.append(len(c)))
    assert sum(sizes) == 20_000_000 and max(sizes) <= 1 << 20


def test_finder_zip_with_top_folder_is_a_good_bundle(tmp_path: Path) -> None:
    zip_path = good_bundle(tmp_path / "b.zip", top="My Story", finder=True)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    assert any(n.startswith("__MACOSX/") for n in names) and "My Story/.DS_Store" in names
    bundle = extract_bundle(zip_path, tmp_path / "x", LimitsSettings())
    assert tree(tmp_path / "x") == {
        "story.json", "images", "images/scene0.png", "images/scene1.png", "people", "people/mara.jpg"
    }  # fmt: skip
    assert {f.entry for f in bundle.files.values()} == {
        "My Story/images/scene0.png", "My Story/images/scene1.png", "My Story/people/mara.jpg"
    }  # fmt: skip


def test_story_json_outside_the_top_folder_is_one_too_many(tmp_path: Path) -> None:
    files = {"a.png": picture_bytes(), "old/story.json": STORY}
    with pytest.raises(BundleError, match=r"more than one story.json \('old/story.json', 'story.json'\)"):
        inspect_bundle(write_bundle(tmp_path / "b.zip", STORY, files), LIMITS)


def test_directory_listing_is_checked_before_zipfile_reads_it(tmp_path: Path) -> None:
    """A directory that claims a gigabyte is refused from its end record alone."""
    zip_path = write_raw_zip(tmp_path / "b.zip", [entry("story.json", STORY)], cd_size=2**30)
    with (
        pytest.raises(BundleError, match=r"directory is 1073741824 bytes, more than 30 entries"),
        open_zip(zip_path, LIMITS),
    ):
        pass


def test_zip_still_being_copied_reads_as_truncated(tmp_path: Path) -> None:
    """What a half-uploaded bundle looks like if read too early: truncated, one line. (The
    daemon settles a file before claiming it, so this is for one that stops growing half-way.)"""
    data = good_bundle(tmp_path / "whole.zip").read_bytes()
    for cut in (10, len(data) // 3, len(data) - 30):
        part = tmp_path / f"part{cut}.zip"
        part.write_bytes(data[:cut])
        with pytest.raises(BundleError) as err:
            extract_bundle(part, tmp_path / f"x{cut}", LIMITS)
        assert err.value.problems[0].startswith("(bundle): not a readable ZIP archive"), err.value.problems


def test_listing_ignores_finder_junk_and_keeps_folders(tmp_path: Path) -> None:
    zip_path = good_bundle(tmp_path / "b.zip", finder=True)
    with open_zip(zip_path, LIMITS) as zf:
        listing = read_listing(zf, LIMITS)
    assert not any("__MACOSX" in n or n.endswith(".DS_Store") for n in listing.files)
    assert {"images", "people"} <= listing.folders


# ----------------------------------------------------------------------------------------------
# A bomb against a real small disk


def _umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=60, check=False)


def test_bomb_stops_at_the_limit_before_a_small_disk_fills(tmp_path: Path) -> None:
    """State on a 16 MiB tmpfs, max_bundle_bytes 8 MB, a bomb of 64 MB (its header honest):
    the story fails naming the limit; the disk never fills (that would be an OSError, a
    `waiting` story), and the work folder is gone again."""
    state = tmp_path / "state"
    mount_tmpfs(state, "16m", "the state folder")
    try:
        zip_path = write_raw_zip(
            tmp_path / "bomb.zip", [entry("story.json", STORY), Bomb(64_000_000).entry("a.png")]
        )
        assert zip_path.stat().st_size < 200_000
        free = os.statvfs(state).f_bavail * os.statvfs(state).f_frsize
        limits = LimitsSettings(max_bundle_bytes=8_000_000)
        assert limits.max_bundle_bytes < free < 64_000_000
        with pytest.raises(
            BundleError, match=r"^entry 'a.png': the bundle unpacks to more than 8000000 bytes"
        ):
            extract_bundle(zip_path, state / "work", limits)
        assert list(state.iterdir()) == []
    finally:
        _umount(state)


def test_full_disk_is_the_machines_fault_not_the_storys(tmp_path: Path) -> None:
    """A good bundle on a disk that is already full: OSError (the daemon waits and retries),
    never a BundleError (which would fail the story)."""
    state = tmp_path / "state"
    mount_tmpfs(state, "1m", "the state folder")
    try:
        (state / "filler").write_bytes(bytes(900_000))
        zip_path = write_bundle(tmp_path / "b.zip", STORY, {"a.png": picture_bytes(600, 400, "BMP")})
        with pytest.raises(OSError) as err:
            extract_bundle(zip_path, state / "work", LimitsSettings())
        assert not isinstance(err.value, BundleError) and err.value.errno == 28  # ENOSPC
        assert sorted(p.name for p in state.iterdir()) == ["filler"]
    finally:
        _umount(state)
