"""The Ray driver's dispatcher: hands scenes to idle actors and collects their images (one thread).

Runs in the driver child (pipeline/images/ray_child.py), driven by its loop: `turn` waits at
most a fraction of a second, so the loop also reads the daemon's commands and probes the head.
What may run is the daemon's to say (submit, withdraw, drop); this only decides when: an idle
worker takes the first pending scene in queue order (claim order, then scene). One scene per
actor at a time, so what a worker's row says it is doing is what it is doing.

Faults (tests/test_ray.py, tests/test_ray_cluster.py):
- an actor that dies (killed, OOM, segfault, node lost) is restarted by Ray (max_restarts=-1)
  and its scene goes back to the front of the queue, for any idle worker;
- a scene that has killed `daemon.max_attempts` workers fails with SceneKillsWorkers;
- a scene past its deadline gets its actor killed (and restarted): that counts as a death;
- a GpuFatalError in an actor (its CUDA context poisoned) kills the actor the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import SceneKillsWorkers, first_line
from pipeline.images.ray_wire import dumps_error
from pipeline.images.seam import SceneKey
from pipeline.settings import Settings

# A derived scene deadline is never shorter than this: the first scene on a (re)started actor
# has no pace to go by, and a restart reloads the model before it can start.
DEADLINE_FLOOR_SECONDS = 600.0
DEADLINE_MARGIN = 4.0
FINISHED_KEPT = 10_000

Send = Callable[..., None]  # send(kind, *fields): one message to the daemon


@dataclass
class Job:
    """A scene the driver holds: its pickled request, and the workers it took down."""

    key: SceneKey
    request: bytes
    steps: int
    deaths: int = 0


@dataclass
class Slot:
    """One worker."""

    index: int
    actor: Any
    facts: dict[str, Any] = field(default_factory=dict)  # from hello(): pid, node, ip, device
    up: bool = False  # ready for a scene (False while starting or restarting)
    probe: Any = None  # a hello() under way (start-up, or after a restart)
    job: Job | None = None
    ref: Any = None
    started: float = 0.0
    killed: str | None = None  # why the driver killed it (deadline, GPU failure)
    images: int = 0
    deaths: int = 0
    last_error: str | None = None

    @property
    def id(self) -> str:
        return f"ray-{self.index}"

    def row(self) -> dict[str, Any]:
        key = self.job.key if self.job is not None else None
        state = "busy" if key else ("idle" if self.up else "restarting" if self.deaths else "starting")
        facts = self.facts
        return {
            "id": self.id,
            "node": facts.get("node"),
            "ip": facts.get("ip"),
            "device": facts.get("device"),
            "pid": facts.get("pid"),
            "state": state,
            "claim": key.claim if key else None,
            "scene": key.scene if key else None,
            "images": self.images,
            "last_error": self.last_error,
        }


class Dispatcher:
    def __init__(self, ray: Any, settings: Settings, send: Send) -> None:
        self.ray, self.settings, self.send = ray, settings, send
        self.slots: list[Slot] = []
        self.pending: dict[SceneKey, Job] = {}
        # Made (or failed) lately: a submit of one is the daemon's echo of a scene it has, or will
        # have, once the answer in flight arrives. Bounded: the oldest are forgotten.
        self.finished: dict[SceneKey, None] = {}
        self.dropped: set[SceneKey] = set()
        self.seconds_per_step: float | None = None  # the recent pace, for derived deadlines

    # -- what the daemon says ----------------------------------------------------------------
    def submit(self, key: SceneKey, request: bytes, steps: int) -> None:
        busy = any(s.job is not None and s.job.key == key for s in self.slots)
        if key in self.pending or key in self.finished or busy:
            return
        self.dropped.discard(key)
        self.pending[key] = Job(key, request, steps)

    def withdraw(self) -> None:
        self.pending.clear()

    def drop(self, key: SceneKey) -> None:
        self.pending.pop(key, None)
        self.dropped.add(key)

    # -- one turn ------------------------------------------------------------------------------
    def turn(self, timeout: float) -> None:
        """Hand out, wait at most `timeout` for an image or a worker back, enforce deadlines.
        Ray's own errors (its raylet or GCS gone) propagate: the driver ends on them."""
        self._hand_out()
        waiting = {s.ref: s for s in self.slots if s.ref is not None}
        probes = {s.probe: s for s in self.slots if s.probe is not None}
        if not waiting and not probes:
            time.sleep(timeout)
            return
        idle = any(s.up and s.job is None for s in self.slots)
        ready, _ = self.ray.wait([*waiting, *probes], num_returns=1, timeout=0.02 if idle else timeout)
        for ref in ready:
            if ref in waiting:
                self._collect(waiting[ref], ref)
            else:
                self._welcome_back(probes[ref], ref)
        self._enforce_deadlines()

    def _hand_out(self) -> None:
        for slot in self.slots:
            if not self.pending:
                return
            if slot.up and slot.job is None:
                job = self.pending.pop(min(self.pending))
                slot.job, slot.started, slot.killed = job, time.monotonic(), None
                slot.ref = slot.actor.generate.remote(job.request)

    def _collect(self, slot: Slot, ref: Any) -> None:
        ray, job = self.ray, slot.job
        assert job is not None
        try:
            kind, data, line = ray.get(ref)
        except ray.exceptions.RayError as err:  # the actor died (killed, OOM, node lost)
            self._died(slot, slot.killed or first_line(err))
            return
        if kind == "gpu_fatal":  # the actor's CUDA context is gone: a new process
            with contextlib.suppress(Exception):
                ray.kill(slot.actor, no_restart=False)
            self._died(slot, f"GPU failure: {line}")
            return
        slot.job = slot.ref = None
        self._finished(job.key)
        if kind == "error":
            slot.last_error = line
            self._answer("error", job.key, data)
            return
        slot.images += 1
        per_step = (time.monotonic() - slot.started) / max(1, job.steps)
        old = self.seconds_per_step
        self.seconds_per_step = per_step if old is None else 0.8 * old + 0.2 * per_step
        self._answer("done", job.key, data)

    def _finished(self, key: SceneKey) -> None:
        self.finished[key] = None
        if len(self.finished) > FINISHED_KEPT:
            del self.finished[next(iter(self.finished))]

    def _answer(self, kind: str, key: SceneKey, data: bytes) -> None:
        if key not in self.dropped:
            self.send(kind, key, data)

    def _died(self, slot: Slot, reason: str) -> None:
        """The worker process died with this scene in hand: Ray restarts it; the scene goes back
        to the front of the queue for any idle worker, unless it has killed too many already."""
        job = slot.job
        assert job is not None
        slot.job = slot.ref = None
        job.deaths += 1
        slot.deaths += 1
        slot.last_error = reason
        slot.up = False
        slot.probe = slot.actor.hello.remote()  # answered once Ray has restarted it
        fields = {"worker": slot.id, "pid": slot.facts.get("pid"), "claim": job.key.claim}
        fields |= {"scene": job.key.scene, "deaths": job.deaths, "reason": reason}
        self.send("log", "warning", "ray worker died", fields)
        if job.deaths >= self.settings.daemon.max_attempts:
            message = (
                f"scene {job.key.scene} took down its worker {job.deaths} times "
                f"(last: {reason}); giving up on it"
            )
            self._finished(job.key)
            self._answer("error", job.key, dumps_error(SceneKillsWorkers(message)))
        elif job.key not in self.dropped:
            self.pending[job.key] = job  # first in queue order again: the earliest scene

    def _welcome_back(self, slot: Slot, ref: Any) -> None:
        try:
            facts = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            slot.probe = slot.actor.hello.remote()  # died again while restarting: ask again
            return
        slot.facts.update(facts)
        slot.probe, slot.up = None, True
        self.send("log", "info", "ray worker back", {"worker": slot.id, "pid": facts.get("pid")})

    def deadline(self) -> float:
        """How long one scene may take before its worker is taken for lost."""
        w = self.settings.workers
        if w.scene_timeout_seconds:
            return w.scene_timeout_seconds
        pace = self.seconds_per_step
        if pace is None:
            return DEADLINE_FLOOR_SECONDS
        return max(DEADLINE_FLOOR_SECONDS, DEADLINE_MARGIN * self.settings.image.steps * pace)

    def _enforce_deadlines(self) -> None:
        now, limit = time.monotonic(), self.deadline()
        for slot in self.slots:
            if slot.job is not None and slot.killed is None and now - slot.started > limit:
                slot.killed = f"scene {slot.job.key.scene} ran past its deadline of {limit:.0f} s"
                fields = {"worker": slot.id, "reason": slot.killed}
                self.send("log", "warning", "ray worker past its deadline, killing it", fields)
                self.ray.kill(slot.actor, no_restart=False)

    def rows(self) -> list[dict[str, Any]]:
        return [s.row() for s in self.slots]
