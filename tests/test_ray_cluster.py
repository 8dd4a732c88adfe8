"""A real Ray cluster on this machine: a head and worker nodes (`ray start`, token auth), the daemon
joining by address with two CPU workers, one on each node (each node has one CPU).

One module-scoped cluster carries three daemon runs, in order (each daemon start costs an actor
start per worker, each a torch import; CI has 2 cores). The first carries four cases:
1. scenes of "alpha" land on both nodes;
2. the worker node is killed (kill -9 of its `ray start`, raylet and actors) while its worker
   makes a scene: its worker is restarting (no node has room for it), alpha goes on with the
   head's worker and ends done, every scene recorded and published once;
3. a node that joins while the daemon runs takes the lost worker's place (a fixed count: Ray
   places the restarting actor there), and "bravo" is made on the head and the new node;
4. the scene deadline (`scene_timeout_seconds`): a worker stuck in a scene of "charlie" (held by
   tests/faulty.py, never let go by itself) is killed at the deadline and the scene is made
   again; charlie ends done.
Then alpha's PNGs are byte-identical to the local engine's. The second: `count = 0` with nodes
that declare one GPU each; a node that joins gets a worker of its own, without a restart. The
last (it replaces the head): the head killed mid-story; the story `waiting`, naming the cluster,
the daemon answering meanwhile; the head back at the same address, the story goes on by itself.
Run with `-s` for the measured times (node loss, a node joining, the head back).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from raytools import MARK, Cluster, NotifySocket, marked

from conftest import Setup, check_published, story, storyreel, wait_for

# One worker of make test carries the module (its cluster is module-scoped), beside the rest of
# the suite, private Ray instances included (checked: -n 4 with test_ray*.py, test_daemon.py and
# test_controls.py).
pytestmark = pytest.mark.xdist_group("ray_cluster")

if not os.environ.get("CI"):  # make test and CI install the [ray] extra: there, a missing Ray fails
    pytest.importorskip("ray")

HEAD, W1, W2, G1, G2 = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"
# The head notices a lost node in 1-3 s instead of 15-65 s (Ray's defaults: 3 s period, 10 s
# timeout, 5 failures), so the restarting worker is placed on a new node soon.
TUNED = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}
DEADLINE = 25.0  # a scene here takes a few seconds; a stuck one is killed at this
STUCK = "stuck scene"
ALPHA = 8
ECHO = 6
WATCHDOG = 5.0  # WATCHDOG_USEC in seconds: the daemon pings every quarter of it


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tag = f"cluster-{uuid.uuid4().hex[:8]}"
    c = Cluster(tag, tmp_path_factory.mktemp("cluster"), head_env=TUNED)
    try:
        c.start("head", HEAD)
        c.start("w1", W1)
        yield c
    finally:
        c.close()
    assert not marked(tag), marked(tag)


def _rows(s: Setup) -> list[dict[str, Any]]:
    try:
        return json.loads((s.state / "current.json").read_text("utf-8")).get("workers") or []
    except (OSError, ValueError):
        return []


def _ips(s: Setup, name: str) -> set[str]:
    manifest = json.loads((s.outbox / name / "manifest.json").read_text("utf-8"))
    return {sc["generation"]["worker"]["ip"] for sc in manifest["scenes"]}


def _once(s: Setup, name: str, n: int) -> None:
    """Done once, every scene started once and published once."""
    lines = s.status(name)
    assert [line["state"] for line in lines].count("done") == 1, lines
    manifest = check_published(s, name, n)
    assert [sc["scene"] for sc in manifest["scenes"]] == list(range(1, n + 1))


def test_a_real_cluster_loses_a_node_gains_one_and_kills_a_stuck_scene(
    cluster: Cluster, tmp_path: Path, tiny_dir: Path
) -> None:
    workers = {"engine": "ray", "count": 2, "gpus_per_worker": 0, "address": cluster.address}
    workers["scene_timeout_seconds"] = DEADLINE
    s = Setup(tmp_path / "daemon", tiny_dir, workers=workers)
    env = {MARK: cluster.tag, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token)}
    faults = {**s.hold(scene=STUCK), "slow_step": 0.4}
    daemon = s.start(env=env, faults=faults)
    s.drop("alpha.json", story(ALPHA, "alpha"))

    # 1-2. Both nodes busy; the worker node lost while its worker makes a scene of alpha.
    def busy_again_on_w1() -> list[dict[str, Any]]:
        rows = _rows(s)
        return [w for w in rows if w.get("state") == "busy" and w.get("ip") == W1 and w.get("images")]

    daemon.wait_for(busy_again_on_w1, "a second scene on the worker node")
    since = len(daemon.events())
    cluster.kill9("w1")
    lost = time.monotonic()
    died = daemon.wait_event("ray worker died", since)
    back_in_queue = time.monotonic() - lost
    lines = len(s.status("alpha"))
    daemon.wait_for(
        lambda: [
            ln
            for ln in s.status("alpha")[lines:]
            if (ln.get("scene") or 0) > died["scene"] or ln["state"] == "done"
        ],
        "the lost scene made again",
    )
    print(
        f"node loss: scene {died['scene']} back in the queue {back_in_queue:.1f} s after the kill, "
        f"made again {time.monotonic() - lost:.1f} s after it"
    )
    daemon.wait_for(lambda: s.last_state("alpha") == "done", "alpha done")
    _once(s, "alpha", ALPHA)
    assert _ips(s, "alpha") == {HEAD, W1}
    started = [line["scene"] for line in s.status("alpha") if line["state"] == "processing"]
    assert started == list(range(1, ALPHA + 1)), started

    # 3. A new node takes the lost worker's place, without a restart of the daemon.
    cluster.start("w2", W2)
    daemon.wait_for(
        lambda: any(w.get("ip") == W2 and w.get("state") == "idle" for w in _rows(s)), "a worker on w2"
    )
    s.drop("bravo.json", story(4, "bravo"))
    daemon.wait_for(lambda: s.last_state("bravo") == "done", "bravo done")
    _once(s, "bravo", 4)
    assert W2 in _ips(s, "bravo"), _ips(s, "bravo")

    # 4. A stuck scene: its worker killed at the deadline, the scene made again.
    doc = story(3, "charlie")
    doc["scenes"][1] = f"charlie {STUCK} of a quiet harbour"  # type: ignore[index]
    since = len(daemon.events())
    s.drop("charlie.json", doc)
    daemon.logged(f"FAULT holding {STUCK}")
    died = daemon.wait_event("ray worker died", since)
    s.release()  # the scene made again is not held
    daemon.wait_for(lambda: s.last_state("charlie") == "done", "charlie done")
    _once(s, "charlie", 3)
    assert "deadline" in json.dumps(died), died
    assert daemon.stop() == 0

    # alpha on the local engine: the same PNGs, byte for byte.
    local = Setup(tmp_path / "local", tiny_dir)
    local.drop("alpha.json", story(ALPHA, "alpha"))
    done = local.run_once()
    assert done.returncode == 0, done.stdout + done.stderr
    for i in range(1, ALPHA + 1):
        png = f"alpha/images/scene_{i:03d}.png"
        assert (local.outbox / png).read_bytes() == (s.outbox / png).read_bytes(), png

    # The daemon's actors end with its job (the nodes' own agents stay until the cluster closes).
    def actors() -> list[tuple[int, str]]:
        return [p for p in marked(cluster.tag) if "ImageWorkerActor" in p[1]]

    wait_for(lambda: not actors(), "the daemon's actors gone", timeout=60)


def test_count_0_counts_the_gpus_again_while_running(
    cluster: Cluster, tmp_path: Path, tiny_dir: Path
) -> None:
    """`count = 0`: one worker per GPU, counted again every few seconds while the daemon runs.
    A node with one (declared) GPU, then a second one joins: the daemon adds a worker there,
    without a restart, and a story is made on both."""
    cluster.start("g1", G1, gpus=1)
    workers = {"engine": "ray", "count": 0, "gpus_per_worker": 1, "address": cluster.address}
    s = Setup(tmp_path / "daemon", tiny_dir, workers=workers)
    env = {MARK: cluster.tag, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token)}
    daemon = s.start(env=env)
    daemon.wait_for(lambda: [w.get("ip") for w in _rows(s)] == [G1], "one worker, on g1")
    cluster.start("g2", G2, gpus=1)
    joined = time.monotonic()
    daemon.wait_for(
        lambda: any(w.get("ip") == G2 and w.get("state") == "idle" for w in _rows(s)), "a worker on g2"
    )
    print(f"count = 0: a node joined -> its worker idle {time.monotonic() - joined:.1f} s")
    s.drop("golf.json", story(4, "golf"))
    daemon.wait_for(lambda: s.last_state("golf") == "done", "golf done")
    _once(s, "golf", 4)
    assert _ips(s, "golf") == {G1, G2}, _ips(s, "golf")
    assert daemon.stop() == 0
    cluster.stop("g1")
    cluster.stop("g2")


def _ctl(s: Setup, *args: str) -> subprocess.CompletedProcess[str]:
    return storyreel(*args, "--config", str(s.config))


def _gaps(pings: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(pings)), default=0.0)


def test_the_head_lost_mid_story_waits_answering_and_goes_on_once_it_is_back(
    cluster: Cluster, tmp_path: Path, tiny_dir: Path
) -> None:
    """Last: it replaces the head. The head killed (kill -9: `ray start`, GCS, raylet, its actor)
    while echo is made: echo is `waiting` with a reason naming the cluster, the daemon answers
    status, pause, resume and cancel and pings its watchdog; a head started again at the same
    address (and the worker node rejoining it, as its unit's Restart= would have it) and echo
    goes on by itself and ends done, every scene published once."""
    workers = {"engine": "ray", "count": 2, "gpus_per_worker": 0, "address": cluster.address}
    s = Setup(tmp_path / "daemon", tiny_dir, workers=workers)
    notify = NotifySocket()
    env = {MARK: cluster.tag, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(cluster.token)}
    env |= {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(int(WATCHDOG * 1e6))}
    others = [n for n, node in cluster.nodes.items() if n != "head" and node.proc.poll() is None]
    try:
        daemon = s.start(env=env, faults={"slow_step": 0.4})
        s.drop("echo.json", story(ECHO, "echo"))
        daemon.wait_for(
            lambda: [ln for ln in s.status("echo") if ln["state"] == "processing" and ln["scene"] >= 3],
            "echo at scene 3",
        )
        cluster.kill9("head")
        lost = time.monotonic()
        waiting = daemon.wait_for(
            lambda: [ln for ln in s.status("echo") if ln["state"] == "waiting"], "echo waiting"
        )[-1]
        said = time.monotonic() - lost
        assert cluster.address in waiting["error"], waiting

        # The daemon answers while the cluster is gone: status, pause/resume, cancel, the watchdog.
        shown = _ctl(s, "status")
        assert shown.returncode == 0 and "waiting" in shown.stdout, shown.stdout + shown.stderr
        assert _ctl(s, "pause").returncode == 0 and _ctl(s, "resume").returncode == 0
        s.drop("foxtrot.json", story(2, "foxtrot"))
        daemon.wait_for(lambda: s.status("foxtrot"), "foxtrot claimed")
        assert _ctl(s, "cancel", "foxtrot").returncode == 0
        daemon.wait_for(lambda: s.last_state("foxtrot") == "cancelled", "foxtrot cancelled")
        down = time.monotonic()
        wait_for(lambda: time.monotonic() - down > 2 * WATCHDOG, "two watchdog periods", timeout=60)
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1" and t >= lost]
        assert len(pings) >= 4 and _gaps(pings) < WATCHDOG, pings

        # The head back at the same address; the worker node, bound to the old cluster, rejoins.
        # (Its raylet would end by itself at Ray's 60 s; until then `ray start --head` refuses an
        # address that a local raylet still names.)
        for name in others:
            cluster.kill9(name)
        cluster.start("head", HEAD)
        back = time.monotonic()
        for name in others:
            cluster.start(name, cluster.nodes[name].ip)
        rejoined = time.monotonic() - back
        lines = len(s.status("echo"))
        daemon.wait_for(
            lambda: [ln for ln in s.status("echo")[lines:] if ln["state"] == "processing"], "echo going on"
        )
        going = time.monotonic() - back
        daemon.wait_for(lambda: s.last_state("echo") == "done", "echo done")
        print(
            f"head loss: waiting said {said:.1f} s after the kill; head back -> worker node up "
            f"{rejoined:.1f} s, -> echo going on {going:.1f} s"
        )
        _once(s, "echo", ECHO)
        assert daemon.stop() == 0
    finally:
        notify.close()
