"""The loop's components, each built without a daemon: over temp folders, a real spool and ledger,
and a stand-in for the inbox watcher and the image workers.

    Gate         what holds the queue: back-off, an ending pending, the outbox gone
    Claimer      settled drops into the spool, in arrival order; a bad one fails at once
    Steering     pause lines, a cancel, a retry
    StoryRunner  one story -> an outcome value; the Recorder turns it into status lines
    Maintenance  an ending left pending by a full outbox, finished once it takes the line
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import daemon.queue.sidecar
from daemon.inbox.folders import FolderGuard
from daemon.inbox.scan import Candidate, scan_inbox
from daemon.queue.claim import Claim
from daemon.queue.claiming import Claimer
from daemon.queue.controls import pause_from_box, resume_from_box, submit
from daemon.queue.gate import Gate
from daemon.queue.ledger import Ledger
from daemon.queue.maintenance import Maintenance
from daemon.queue.sidecar import read_status
from daemon.queue.spool import Spool
from daemon.queue.steering import Steering
from daemon.run.outcome import Done, Failed, Halted
from daemon.run.poison import PoisonRule
from daemon.run.recorder import Recorder
from daemon.run.runner import StoryRunner
from daemon.system.hooks import Hooks
from daemon.system.notify import Notifier
from daemon.system.wake import StopRequest
from pipeline.images.local import LocalWorkers
from pipeline.images.seam import GeneratedImage, SceneRequest
from pipeline.render import CpuPool, SoundSetup
from pipeline.settings import Settings, settings_from_dict


@dataclass
class Inbox:
    """The part of InboxWatcher the queue uses: each settled file offered once, controls, entries."""

    path: Path
    offered: set[str] = field(default_factory=set)
    held: dict[str, str] = field(default_factory=dict)
    controls: dict[str, Candidate] = field(default_factory=dict)
    entries: dict[str, Candidate] = field(default_factory=dict)

    def poll_ready(self) -> list[Candidate]:
        scan = scan_inbox(self.path)
        self.controls, self.entries = scan.controls, scan.entries
        ready = sorted((c for c in scan.entries.values() if c.name not in self.offered), key=lambda c: c.name)
        self.offered |= {c.name for c in ready}
        return ready

    def hold(self, name: str, reason: str) -> float:
        self.held[name] = reason
        return 1.0

    def forget(self, name: str) -> None:
        self.offered.discard(name)


class Flat:
    """A stand-in generator: one flat colour per seed, at once."""

    def describe(self) -> dict[str, Any]:
        return {"model": "flat", "device": "cpu"}

    def warm_up(self, phase: Any = None) -> None:
        pass

    def close(self) -> None:
        pass

    def generate(self, req: SceneRequest, on_step: Any = None) -> GeneratedImage:
        colour = (req.seed % 200, 80, 160)
        return GeneratedImage(Image.new("RGB", (req.width, req.height), colour), {"total": 0.0}, {})


@dataclass
class World:
    settings: Settings
    spool: Spool
    ledger: Ledger
    inbox: Inbox
    now: list[float]
    gate: Gate
    claimer: Claimer
    steering: Steering

    def drop(self, name: str, doc: Any) -> None:
        (self.settings.paths.inbox / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))

    def claim_all(self) -> list[Claim]:
        self.claimer.claim_ready(self.inbox, 1.0, lambda: False)  # type: ignore[arg-type]
        return self.spool.claims()

    def states(self, name: str) -> list[str]:
        return [line["state"] for line in read_status(self.settings.paths.outbox, name)]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    paths = {"inbox": "inbox", "outbox": "outbox", "state": "state"}
    for folder in paths.values():
        (tmp_path / folder).mkdir()
    settings = settings_from_dict(
        {
            "paths": paths,
            "image": {"width": 64, "height": 48, "steps": 1},
            "video": {"fps": 8, "seconds_per_scene": 1.0, "preset": "ultrafast"},
            "daemon": {"retry_min_seconds": 2.0, "retry_max_seconds": 8.0, "cpu_workers": 1},
        },
        tmp_path,
    )
    spool = Spool(settings.paths.state, settings.paths.inbox)
    spool.open()
    ledger = Ledger(settings.paths, spool, Notifier(None), Hooks(settings.hooks, {}))
    now = [1000.0]
    gate = Gate(ledger, settings.daemon, clock=lambda: now[0])
    claimer = Claimer(settings, spool, ledger)
    steering = Steering(settings, spool, ledger, claimer.validate)
    yield World(settings, spool, ledger, Inbox(settings.paths.inbox), now, gate, claimer, steering)
    spool.close()


def test_claiming_keeps_arrival_order_fails_a_bad_story_at_once_and_never_reuses_a_name(world: World) -> None:
    (world.settings.paths.outbox / "b.zip").write_bytes(b"someone else's")
    world.drop("a.json", {"scenes": ["one", "two"]})
    world.drop("b.json", {"scenes": ["three"]})
    world.drop("c.json", '{"scenes": "not a list"}')
    os.symlink("/etc/passwd", world.settings.paths.inbox / "d.json")
    claims = world.claim_all()
    assert [(c.name, c.scenes) for c in claims] == [("a", 2), ("b-2", 1)]
    assert world.states("a") == ["queued"] and world.states("b-2") == ["queued"]
    assert world.states("c") == ["queued", "failed"]
    assert world.states("d") == ["failed"]
    assert "symbolic link" in read_status(world.settings.paths.outbox, "d")[-1]["error"]
    assert sorted(p.name for p in world.settings.paths.inbox.iterdir()) == []


def test_the_gate_holds_the_queue_through_a_back_off(world: World) -> None:
    world.drop("a.json", {"scenes": ["one"]})
    (claim,) = world.claim_all()
    assert world.gate.next_claim(world.spool, stopping=False, paused=False) is claim
    delay = world.gate.wait(claim, "No space left on device (outbox)", 0, 1)
    assert delay == 2.0 and world.gate.next_claim(world.spool, stopping=False, paused=False) is None
    last = read_status(world.settings.paths.outbox, "a")[-1]
    assert (last["state"], last["error"], last["retry_in_seconds"]) == (
        "waiting",
        "No space left on device (outbox)",
        2.0,
    )
    assert world.gate.wait(None, "still full") == 4.0  # doubling
    world.now[0] += 4.0
    assert world.gate.next_claim(world.spool, stopping=False, paused=False) is claim
    assert world.gate.next_claim(world.spool, stopping=True, paused=False) is None
    assert world.gate.next_claim(world.spool, stopping=False, paused=True) is None
    world.gate.recovered()
    assert world.gate.backoff.failures == 0


def test_the_gate_holds_the_queue_while_the_outbox_is_gone(world: World, tmp_path: Path) -> None:
    outbox = world.settings.paths.outbox
    world.drop("a.json", {"scenes": ["one"]})
    (claim,) = world.claim_all()
    world.gate.folders = FolderGuard({"outbox": outbox})
    os.rename(outbox, tmp_path / "away")  # the share goes
    world.gate.check_folders()
    assert not world.gate.outbox_ok and "outbox" in world.gate.problems
    assert world.gate.next_claim(world.spool, stopping=False, paused=False) is None
    world.gate.wait(claim, "outbox gone")
    assert not outbox.exists(), "nothing may be written where the share was"
    os.rename(tmp_path / "away", outbox)
    world.gate.check_folders()
    assert world.gate.outbox_ok and world.gate.next_claim(world.spool, stopping=False, paused=False) is claim


def test_an_ending_pending_holds_the_queue_until_the_maintenance_finishes_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.drop("a.json", {"scenes": ["one"]})
    world.drop("b.json", {"scenes": ["two"]})
    a, b = world.claim_all()
    real = daemon.queue.sidecar.append_line

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "outbox/a.status.jsonl")

    monkeypatch.setattr(daemon.queue.sidecar, "append_line", full)
    with pytest.raises(OSError):
        world.ledger.fail(a, 0, 1, "a problem")
    maintenance = Maintenance(
        world.settings, world.spool, world.ledger, world.gate, clock=lambda: world.now[0]
    )
    maintenance.finish_endings(quiet=False)  # still full: the loop waits, with back-off
    assert (
        world.spool.endings() == [a]
        and world.gate.next_claim(world.spool, stopping=False, paused=False) is None
    )
    monkeypatch.setattr(daemon.queue.sidecar, "append_line", real)
    world.now[0] += 2.0
    maintenance.finish_endings(quiet=False)
    assert world.states("a") == ["queued", "failed"] and world.spool.endings() == []
    assert world.gate.next_claim(world.spool, stopping=False, paused=False) is b


def test_steering_pauses_each_queued_story_once_cancels_and_retries(world: World) -> None:
    state = world.settings.paths.state
    for name in ("a", "b"):
        world.drop(f"{name}.json", {"scenes": ["one"]})
    world.claim_all()
    pause_from_box(state, "ana@box")
    assert world.steering.read(world.inbox, 1.0) is False  # type: ignore[arg-type]
    world.steering.read(world.inbox, 1.0)  # type: ignore[arg-type]
    assert world.steering.paused and world.states("a") == world.states("b") == ["queued", "paused"]
    resume_from_box(state)
    world.steering.read(world.inbox, 1.0)  # type: ignore[arg-type]
    assert not world.steering.paused and world.states("a") == ["queued", "paused", "queued"]
    request = submit(state, "cancel", "a", "ana@box")
    world.steering.read(world.inbox, 1.0)  # type: ignore[arg-type]
    assert world.states("a")[-1] == "cancelled" and not request.exists()
    submit(state, "retry", "a", "ana@box")
    world.steering.read(world.inbox, 1.0)  # type: ignore[arg-type]
    assert [c.name for c in world.spool.claims()] == ["b", "a"]  # at the end of the queue
    assert world.states("a")[-2:] == ["cancelled", "queued"]


def runner(world: World, pool: CpuPool, stop: StopRequest) -> StoryRunner:
    paths = world.settings.paths
    return StoryRunner(
        world.settings,
        world.ledger,
        Notifier(None),
        stop,
        world.steering,
        PoisonRule(paths.state / "fault.log", world.settings.daemon.max_attempts),
        FolderGuard({"inbox": paths.inbox, "outbox": paths.outbox}),
        workers=LocalWorkers(Flat()),
        pool=pool,
        housekeeping=lambda: None,
        sound=SoundSetup(None),
    )


def test_one_story_runs_to_an_outcome_and_the_recorder_records_it(world: World) -> None:
    world.drop("a.json", {"title": "A", "scenes": ["one", "two"]})
    world.drop("b.json", {"scenes": ["three"]})
    a, b = world.claim_all()
    (a.folder / "input.json").write_text('{"scenes": ["one", "two", "three"')  # broken since its claim
    stop = StopRequest(Notifier(None))
    recorder = Recorder(world.ledger, world.gate, world.steering, stop)
    with CpuPool(world.settings) as pool:
        run = runner(world, pool, stop)
        failed = run.run(a)
        assert isinstance(failed, Failed) and (failed.scene, failed.scenes) == (0, 0) and not failed.internal
        recorder.record(a, failed)
        stop.requested = True
        halted = run.run(b)
        assert halted == Halted(1)
        recorder.record(b, halted)
        assert (
            read_status(world.settings.paths.outbox, "b")[-1]["reason"]
            == "interrupted by stop; resumes at scene 1"
        )
        stop.requested = False
        done = run.run(b)
    assert isinstance(done, Done) and done.outputs["zip"] == "b.zip" and done.pace is not None
    recorder.record(b, done)
    assert world.states("a")[-1] == "failed" and world.states("b")[-1] == "done"
    assert (world.settings.paths.outbox / "b.zip").is_file() and world.spool.claims() == []
    assert world.steering.running is None  # the recorder ends the story's turn
