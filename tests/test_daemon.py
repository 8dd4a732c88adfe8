"""The daemon as a real subprocess over real temp folders."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import signal
import socket
import struct
import time
import zipfile
from pathlib import Path

import pytest

from conftest import PAGE_ENTRIES, Setup, check_published, outbox_entries, story, storyreel, wait_for


def test_run_once_makes_every_story_in_arrival_order(setup: Setup) -> None:
    now = time.time()
    # Arrival order is mtime order, not name order.
    setup.drop("b.json", story(2, "b"), mtime=now - 30)
    setup.drop("a.json", story(1, "a"), mtime=now - 20)
    setup.drop("c.json", story(3, "c"), mtime=now - 10)
    result = setup.run_once()
    assert result.returncode == 0, result.stderr
    seqs = {name: check_published(setup, name, n)["sequence"] for name, n in (("a", 1), ("b", 2), ("c", 3))}
    assert seqs["b"] < seqs["a"] < seqs["c"]
    done = {name: setup.status(name)[-1]["time"] for name in seqs}
    assert done["b"] < done["a"] < done["c"]
    assert list(setup.inbox.iterdir()) == []
    stories = {f"{n}{ext}" for n in "abc" for ext in ("", ".zip", ".status.jsonl")}
    assert outbox_entries(setup) == stories | PAGE_ENTRIES
    lines = setup.status("c")
    assert [line["state"] for line in lines] == ["queued", "processing", "processing", "processing", "done"]
    assert [line["scene"] for line in lines[1:4]] == [1, 2, 3]
    assert all(line["story"] == "c" and line["scenes"] == 3 for line in lines)


def test_same_story_twice_is_byte_identical(setup: Setup) -> None:
    setup.drop("one.json", story(2, "same"))
    assert setup.run_once().returncode == 0
    setup.drop("one.json", story(2, "same"))
    assert setup.run_once().returncode == 0
    for i in (1, 2):
        first = (setup.outbox / "one" / "images" / f"scene_00{i}.png").read_bytes()
        again = (setup.outbox / "one-2" / "images" / f"scene_00{i}.png").read_bytes()
        assert first == again
    assert (setup.outbox / "one/images/scene_001.png").read_bytes() != (
        setup.outbox / "one/images/scene_002.png"
    ).read_bytes()


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_live_drops_are_processed_in_drop_order(tmp_path: Path, tiny_dir: Path, mode: str) -> None:
    s = Setup(tmp_path, tiny_dir, watch={"mode": mode})
    d = s.start()
    d.wait_for(lambda: (s.state / "current.json").exists(), "daemon start")
    names = ["zeta", "alpha", "mid"]
    for name in names:
        s.drop(f"{name}.json", story(1, name))
        d.wait_for(lambda n=name: s.status(n), f"{name} claimed")  # type: ignore[misc]
    d.wait_for(lambda: all(s.last_state(n) == "done" for n in names), "all done")
    assert d.stop() == 0, d.output()
    seqs = [json.loads((s.outbox / n / "manifest.json").read_text())["sequence"] for n in names]
    assert seqs == sorted(seqs)


def test_slow_in_place_writer_is_waited_for(tmp_path: Path, tiny_dir: Path) -> None:
    """An SMB client writing in place, slower than polling but faster than settling.

    The writer's pace is measured, not assumed: had this process been starved between two
    writes for longer than the settle time, taking the half-written file would be right, so
    the test tries again with a longer settle time instead of blaming the daemon.
    """
    data = json.dumps(story(1, "slow")).encode()
    settle, longest = 1.0, float("inf")
    while longest >= settle:
        assert settle < 100, f"the writer was starved for {longest:.1f}s between two writes at every try"
        s = Setup(
            tmp_path / f"settle-{settle:g}",
            tiny_dir,
            watch={"settle_seconds": settle, "mode": "polling", "poll_seconds": 0.1},
        )
        d = s.start()
        d.wait_for(lambda s=s: (s.state / "current.json").exists(), "daemon start")  # type: ignore[misc]
        # How long each state of the file lasted, at most: from before the call that made it
        # to after the call that ended it.
        longest, before = 0.0, time.monotonic()
        with open(s.inbox / "slow.json", "wb") as fh:
            for i in range(0, len(data), 8):
                fh.write(data[i : i + 8])
                fh.flush()
                now = time.monotonic()
                longest, before = max(longest, now - before), now
                time.sleep(settle / 8)  # the slow SMB client we are simulating, not synchronisation
        d.wait_for(lambda s=s: s.last_state("slow") in ("done", "failed"), "slow story")  # type: ignore[misc]
        assert d.stop() == 0
        if longest >= settle:
            settle *= 4
    assert s.last_state("slow") == "done", (s.status("slow"), f"longest write gap {longest:.2f}s")


def test_sigterm_finishes_the_scene_then_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("long.json", story(6, "long"))
    d = s.start(faults=s.hold(scene="long scene 2 of"))  # the third scene waits for us
    d.logged("FAULT holding")
    d.signal(signal.SIGTERM)
    d.logged("finishing the scene in progress")
    s.release()
    assert d.wait() == 0, d.output()
    last = s.status("long")[-1]
    # Never 'failed' because we stopped, and no 'processing' line with a stale ETA left as the last word.
    assert last["state"] == "queued" and "eta_seconds" not in last
    assert last["reason"] == "interrupted by stop; resumes at scene 4"
    assert "interrupted by stop; resumes at scene 4" in storyreel("status", "--config", str(s.config)).stdout
    assert not (s.outbox / "long").exists()
    records = sorted((s.state / "spool" / "queue").glob("*/work/records/*.json"))
    assert [r.name for r in records] == ["scene_001.json", "scene_002.json", "scene_003.json"]
    kept = {r.name: r.stat().st_mtime_ns for r in records}
    assert s.run_once().returncode == 0
    check_published(s, "long", 6)
    processing = [x["scene"] for x in s.status("long") if x["state"] == "processing"]
    assert processing[-(6 - len(kept)) :] == list(range(len(kept) + 1, 7))  # resumed, not redone


def test_second_signal_exits_at_once(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    s.drop("big.json", story(3, "big"))
    d = s.start(faults=s.hold(scene="big scene 0 of"))  # never released: this scene cannot finish
    d.logged("FAULT holding")
    d.signal(signal.SIGTERM)
    d.logged("finishing the scene in progress")
    d.signal(signal.SIGTERM)
    assert d.wait() == 128 + signal.SIGTERM  # only a cold stop gets out of the held scene
    assert s.run_once().returncode == 0
    check_published(s, "big", 3)


def test_kill_9_at_random_points_then_restart(tmp_path: Path, tiny_dir: Path) -> None:
    """Every story done exactly once, valid ZIPs, nothing stray, however often we are killed."""
    s = Setup(tmp_path, tiny_dir, video={"fps": 12, "seconds_per_scene": 1.0})
    n_stories = int(os.environ.get("KILL_STORIES", "4"))  # a soak: KILL_STORIES=12 KILL_ROUNDS=40
    counts = {f"k{i + 1}": 1 + i % 3 for i in range(n_stories)}
    now = time.time()
    for i, (name, n) in enumerate(counts.items()):
        s.drop(f"{name}.json", story(n, name), mtime=now - 100 + i)
    rng = random.Random(int(os.environ.get("KILL_SEED", "1234")))
    kills, where = 0, []
    rounds = int(os.environ.get("KILL_ROUNDS", "8"))
    for round_ in range(rounds):
        if all(s.last_state(n) == "done" for n in counts):
            break
        d = s.start()
        if round_ == 0:  # the first kill lands inside a story, whatever the machine's pace
            d.wait_event("scene started")
        else:
            wait_for(lambda d=d: d.events("ready") or d.proc.poll() is not None, "ready")  # type: ignore[misc]
            time.sleep(rng.uniform(0.0, 2.0))  # the random kill point itself, not synchronisation
        if d.proc.poll() is None:
            d.proc.kill()
            kills += 1
            where.append([s.last_state(n) for n in counts])
        d.wait()
        assert_no_partial_outputs(s)
    assert s.run_once().returncode == 0
    assert any("processing" in states for states in where), f"no kill landed inside a story: {where}"
    print(f"kill -9: {kills} kills; story states at each kill: {where}")
    for name, n in counts.items():
        check_published(s, name, n)
        assert [x["state"] for x in s.status(name)].count("done") == 1
    stories = {f"{n}{ext}" for n in counts for ext in ("", ".zip", ".status.jsonl")}
    assert outbox_entries(s) == stories | PAGE_ENTRIES
    assert list((s.state / "spool" / "queue").iterdir()) == []
    assert list((s.state / "spool" / "tmp").iterdir()) == []
    seqs = [json.loads((s.outbox / n / "manifest.json").read_text())["sequence"] for n in counts]
    assert seqs == sorted(seqs)


def assert_no_partial_outputs(s: Setup) -> None:
    """What is under a final name in the outbox is complete: the folder has its manifest, the ZIP opens."""
    for entry in s.outbox.iterdir():
        if entry.name.startswith("."):
            continue  # a temporary name: allowed to be partial, never a final one
        if entry.is_dir():
            assert (entry / "manifest.json").is_file(), entry
        elif entry.suffix == ".zip":
            with zipfile.ZipFile(entry) as zf:
                assert zf.testzip() is None
        elif entry.name == "index.html":  # the status page: written whole, by rename
            assert entry.read_text("utf-8").rstrip().endswith("</html>")
        else:
            for line in entry.read_text().splitlines():
                json.loads(line)


def test_kill_9_during_an_overlapped_clip(tmp_path: Path, tiny_dir: Path) -> None:
    """Scene N's clip renders on the CPU while scene N+1 denoises; kill -9 in that window."""
    s = Setup(tmp_path, tiny_dir)
    s.drop("o.json", story(4, "o"))
    d = s.start(faults=s.hold(clip="scene_002.mp4"))  # never released: we kill it mid-clip
    d.logged("FAULT rendering scene_002.mp4")
    d.wait_for(lambda: any(x.get("scene") == 3 for x in s.status("o")), "scene 3 started")
    d.proc.kill()
    d.wait()
    records = sorted(p.name for p in (s.state / "spool" / "queue").glob("*/work/records/*.json"))
    assert "scene_002.json" not in records  # killed mid-clip: scene 2 was not finished
    assert not list((s.state / "spool" / "queue").glob("*/work/out/clips/scene_002.mp4"))
    assert s.run_once().returncode == 0
    manifest = check_published(s, "o", 4)
    assert [sc["scene"] for sc in manifest["scenes"]] == [1, 2, 3, 4]
    clips = sorted(p.name for p in (s.outbox / "o" / "clips").iterdir())
    assert clips == [f"scene_00{i}.mp4" for i in range(1, 5)]


def test_status_command_reports_the_queue(tmp_path: Path, tiny_dir: Path) -> None:
    s = Setup(tmp_path, tiny_dir)
    now = time.time()
    s.drop("first.json", story(4, "first"), mtime=now - 3)
    s.drop("second.json", story(1, "second"), mtime=now - 2)
    d = s.start(faults=s.hold(scene="first scene 0 of"))  # the queue stands still while we look
    d.logged("FAULT holding")
    d.wait_for(lambda: s.last_state("first") == "processing" and s.status("second"), "both claimed")
    out = storyreel("status", "--config", str(s.config))
    assert out.returncode == 0, out.stderr
    assert "daemon: running" in out.stdout and "first" in out.stdout and "second" in out.stdout
    assert "queue: 2 stories" in out.stdout
    s.release()
    assert d.stop() == 0
    assert s.run_once().returncode == 0
    out = storyreel("status", "--config", str(s.config))
    assert "daemon: not running" in out.stdout and "queue: 0 stories" in out.stdout
    assert "done" in out.stdout


# Linux's value; Python's socket module does not export it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def arrival(ancdata: list[tuple[int, int, bytes]]) -> float:
    """The kernel's time stamp on a datagram (the time it was sent), not when we got round to it."""
    ((_, _, stamp),) = ancdata
    sec, nsec = struct.unpack("qq", stamp[:16])
    return sec + nsec / 1e9


def test_notify_protocol(tmp_path: Path, tiny_dir: Path) -> None:
    """Play systemd's side: READY only once warm, WATCHDOG pings all through, STOPPING.

    Each denoising step is made 0.2 s slower, so one image (20 steps, 4 s or more) outlasts the
    whole watchdog period: only pings from inside the denoising loop can keep the gaps short.
    A ping is due period/4 after the last and goes out at the next chance the daemon has (a step
    ends, the loop comes round), so no gap may exceed period/4 plus the time two chances take.
    That time is measured, not assumed: faulty.py says when each step ends, and the kernel
    stamps each datagram as it is sent. A loaded machine widens the bound; it cannot fail it.
    """
    s = Setup(tmp_path, tiny_dir, model={"warmup": True}, image={"steps": 20})
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.settimeout(1)
    s.drop("n.json", story(2, "n"))
    period = 3.0
    env = {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": str(int(period * 1e6))}
    d = s.start(env=env, faults={"slow_step": 0.2})
    messages: list[tuple[float, str]] = []
    signalled = 0.0
    try:
        while True:
            try:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16))
            except TimeoutError:
                assert d.proc.poll() is None, d.output()  # the other event we wait on: its death
                continue
            messages.append((arrival(ancdata), data.decode()))
            if "STOPPING=1" in messages[-1][1]:
                break
            if not signalled and s.last_state("n") == "done":
                signalled = time.time()
                d.signal(signal.SIGTERM)
    finally:
        sock.close()
    assert d.wait() == 0, d.output()
    texts = [m for _, m in messages]
    ready = next(i for i, m in enumerate(texts) if "READY=1" in m)
    assert any("STATUS=warming up" in m for m in texts[:ready])
    assert any(m.startswith("STATUS=") and "scene 2/2" in m for m in texts[ready:])
    ready_at = messages[ready][0]
    steps = [t for t in map(float, re.findall(r"FAULT step ([\d.]+)", d.output())) if t > ready_at]
    assert len(steps) == 2 * 20, "the warm-up's steps come before READY, both images' after it"
    pings = [t for t, m in messages[ready:] if "WATCHDOG=1" in m and t < signalled]
    chances = [ready_at, *steps, signalled]
    bound = period / 4 + max(b - a for a, b in zip(chances, chances[2:], strict=False))
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert max(gaps) <= bound, (gaps, bound)
    for image in (steps[:20], steps[20:]):  # pinged from inside the denoising loop, all through it
        assert sum(image[0] < t < image[-1] for t in pings) >= 3, (image, pings)
