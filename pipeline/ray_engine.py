"""Image workers on Ray (2.60): one actor per worker, each holding a warm generator.

Imported only with `[workers] engine = "ray"` (pipeline/workers.py). The daemon stays the one
process that watches, claims, orders, writes status and publishes; the actors only turn a
`SceneRequest` into a `GeneratedImage`, which comes back through Ray (the PIL image pickled),
so a worker box needs the package and the weights, never the share.

    RayWorkers.__init__   1. connect: a private instance (address "") or a cluster
                          2. how many workers: count, or one per GPU Ray reports
                          3. one actor each: open_generator + warm_up in its __init__;
                             wait until every one is ready (before READY=1)
                          4. start the dispatcher thread

The dispatcher is a thread, not something driven from the daemon's waits: a worker that
finishes must get its next scene at once, also while the daemon's loop is busy elsewhere
(the story's film, ZIP and publish take seconds, in which every GPU would otherwise idle).
What may run is decided on the daemon's thread only (submit, the lookahead, withdraw,
retain); the thread only decides when: an idle worker takes the first pending ticket in
queue order (claim order, then scene). One scene per actor at a time, so what `describe()`
says a worker is doing is what it is doing.

Faults (see the module's tests, tests/test_ray.py):
- an actor that dies (killed, OOM, segfault, node lost) is restarted by Ray
  (max_restarts=-1) and its scene goes back to the front of the queue, for any idle worker;
- a scene that has killed `daemon.max_attempts` workers fails with SceneKillsWorkers;
- a scene past its deadline gets its actor killed (and restarted): that counts as a death;
- a GpuFatalError in an actor (its CUDA context poisoned) kills the actor the same way;
- losing the cluster (or failing to reach it) is EngineUnavailable: the daemon waits.

Untested here (no GPU, one machine): actors with `gpus_per_worker > 0` on CUDA, the deadline
kill, a GpuFatalError in an actor, the loss of a cluster's head, and joining a real cluster.
tests/test_ray.py covers CPU actors on a private instance: spread, order, a killed worker, the
poison rule, byte-identical PNGs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from pipeline.errors import EngineUnavailable, GpuFatalError, ModelNotFound, SceneKillsWorkers
from pipeline.generate import GeneratedImage, ImageGenerator, SceneRequest
from pipeline.settings import ConfigError, Settings
from pipeline.workers import ImageWorkers, Lookahead, SceneKey, StepCallback, Ticket

# Before `import ray`: Ray reads it once, at import. On Linux, Ray takes this machine's
# routable address as the node address even when told 127.0.0.1 (services.resolve_ip_for_localhost),
# and its gRPC servers then listen on every interface. With this switch off, the node address
# is the loopback one and every listener of a private instance binds 127.0.0.1 (checked with
# `ss -ltnp`; see bench/README.md). Set for private instances only: a cluster needs its real address.
_LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray starts its worker processes at nice 15 (its config `worker_niceness`, read from the
# environment by the raylet it starts), and our actors are those workers: the image makers, the
# box's main work. At 15 they get the CPU only when the daemon's own clip encoding leaves it
# free: under load on 2 cores an actor took over 5 minutes to import torch. Nice 0, as the
# daemon. (The cluster units set the same for `ray start`: systemd/storyreel-ray-*.service.)
_NICENESS = "RAY_worker_niceness"
# A private instance: the environment it needs before `import ray`, and its ray.init arguments
# ("local": never one named by RAY_ADDRESS; this one dies with the daemon). tests/test_ray_network.py
# starts exactly this on the host and in a loopback-only network namespace (PrivateNetwork=yes).
PRIVATE_ENV = {_LOOPBACK_SWITCH: "0", _NICENESS: "0"}
PRIVATE_INIT: dict[str, Any] = {"address": "local", "include_dashboard": False}

log = structlog.get_logger("storyreel")

# A derived scene deadline is never shorter than this: the first scene on a (re)started actor
# has no pace to go by, and a restart reloads the model before it can start.
DEADLINE_FLOOR_SECONDS = 600.0
DEADLINE_MARGIN = 4.0
# Unconsumed tickets of stories behind the one in progress, per worker (bounds memory).
LOOKAHEAD_PER_WORKER = 2
# Ray session folders need short paths: their Unix sockets must fit in 107 bytes.
_MAX_TEMP_DIR_CHARS = 44
_OBJECT_STORE_BYTES = 512 << 20  # images are a few MB each; a few dozen are ever in flight


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            'workers.engine = "ray" needs Ray: pip install "storyreel[ray]" (or set engine = "local")'
        ) from None
    return ray


class ImageWorkerActor:
    """The body of one Ray actor: a warm generator. Made into an actor class by `ray.remote`."""

    def __init__(
        self,
        settings: Settings,
        make_generator: Callable[[Settings], ImageGenerator],
        torch_threads: int,
    ) -> None:
        import torch

        # Ray sets OMP_NUM_THREADS=1 in actors, and CPU results depend on the thread count:
        # the same count as the daemon's own process keeps PNGs byte-identical to engine=local.
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.generator = make_generator(settings)
        if settings.model.warmup:
            self.generator.warm_up()

    def hello(self) -> dict[str, Any]:
        """Who this worker is: asked once it is ready, and again after every restart."""
        import ray

        model = self.generator.describe()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        device = str(model.get("device"))
        return {
            "pid": os.getpid(),
            "node": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(),
            "device": f"{device} [GPU {','.join(gpus)}]" if gpus else device,
            "model": model,
        }

    def generate(self, req: SceneRequest) -> GeneratedImage:
        return self.generator.generate(req)


@dataclass
class _Slot:
    """One worker as the daemon sees it."""

    index: int
    actor: Any
    facts: dict[str, Any] = field(default_factory=dict)  # from hello(): pid, node, device
    up: bool = False  # ready for a scene (False while starting or restarting)
    probe: Any = None  # a hello() under way after a restart
    ticket: Ticket | None = None
    ref: Any = None
    started: float = 0.0
    killed: str | None = None  # why the daemon killed it (deadline, GPU failure)
    images: int = 0
    deaths: int = 0
    last_error: str | None = None

    @property
    def id(self) -> str:
        return f"ray-{self.index}"

    def identity(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.facts.get("node"), "device": self.facts.get("device")}


class RayWorkers(ImageWorkers):
    def __init__(
        self,
        settings: Settings,
        make_generator: Callable[[Settings], ImageGenerator],
        phase: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.settings = settings
        self.make_generator = make_generator
        self.phase = phase
        self._lock = threading.Condition()
        self._tickets: dict[SceneKey, Ticket] = {}
        self._pending: list[Ticket] = []
        self._slots: list[_Slot] = []
        self._lookahead: Lookahead | None = None
        self._seconds_per_step: float | None = None
        self._broken: str | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._start()

    # -- start-up ----------------------------------------------------------------------------------
    def _start(self) -> None:
        w = self.settings.workers
        private = not w.address
        if private:
            os.environ.update(PRIVATE_ENV)
        ray = self.ray = _import_ray()

        # 1. Connect
        self.phase("starting Ray" if private else f"joining the Ray cluster at {w.address}")
        try:
            if private:
                ray.init(**self._private_options())
            else:
                ray.init(address=w.address, log_to_driver=True, configure_logging=False)
        except ConfigError:
            raise
        except Exception as err:
            raise EngineUnavailable(f"Ray did not start ({w.address or 'private instance'}): {err}") from err
        try:
            self._start_workers(ray)
        except BaseException:
            # Let go of the instance (or the connection), so that the next try can ray.init again.
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise

    def _start_workers(self, ray: Any) -> None:
        import torch

        w = self.settings.workers

        # 2. How many workers
        count = self._count()
        self.size = count

        # 3. One actor each, warm before the daemon says READY
        self.phase(f"loading model on {count} Ray workers")
        remote = ray.remote(ImageWorkerActor).options(
            num_gpus=w.gpus_per_worker, num_cpus=1, max_restarts=-1, max_task_retries=0
        )
        threads = torch.get_num_threads()
        self._slots = [
            _Slot(i, remote.remote(self.settings, self.make_generator, threads)) for i in range(count)
        ]
        for slot in self._slots:
            slot.facts = self._ready(slot)
            slot.up = True
        self._model = self._slots[0].facts.get("model", {})
        log.info(
            "ray workers ready",
            workers=[{**s.identity(), "pid": s.facts.get("pid")} for s in self._slots],
            address=w.address or "private",
        )

        # 4. The dispatcher
        self._thread = threading.Thread(target=self._dispatch, name="ray-dispatch", daemon=True)
        self._thread.start()

    def _private_options(self) -> dict[str, Any]:
        """A Ray instance of our own: loopback only, no dashboard, its files under the state folder."""
        w, state = self.settings.workers, self.settings.paths.state
        temp = state / "ray"
        options: dict[str, Any] = {
            **PRIVATE_INIT,
            "num_cpus": max(os.cpu_count() or 1, w.count),  # CPU workers each take one
            "object_store_memory": _OBJECT_STORE_BYTES,
            "log_to_driver": True,  # the actors' output goes to the daemon's log (journald)
            "configure_logging": False,
        }
        if len(str(temp)) <= _MAX_TEMP_DIR_CHARS:
            temp.mkdir(parents=True, exist_ok=True)
            _prune_sessions(temp)
            options["_temp_dir"] = str(temp)
        else:
            log.info("ray session files under /tmp/ray: the state folder's path is too long for its sockets")
        return options

    def _count(self) -> int:
        w = self.settings.workers
        gpus = float(self.ray.cluster_resources().get("GPU", 0))
        if w.count == 0:
            count = int(gpus // w.gpus_per_worker) if w.gpus_per_worker else 0
            if count == 0:
                raise ConfigError(
                    f"workers.count = 0 means one worker per GPU, and Ray reports {gpus:g} GPUs "
                    f"for {w.gpus_per_worker:g} per worker; set workers.count"
                )
            return count
        if w.gpus_per_worker and w.count * w.gpus_per_worker > gpus and not w.address:
            raise ConfigError(
                f"workers.count = {w.count} with gpus_per_worker = {w.gpus_per_worker:g} needs "
                f"{w.count * w.gpus_per_worker:g} GPUs; Ray reports {gpus:g} on this machine"
            )
        return w.count

    def _ready(self, slot: _Slot) -> dict[str, Any]:
        """Wait for one actor's model to load and warm up; a failure there stops start-up."""
        ray = self.ray
        ref = slot.actor.hello.remote()
        while True:
            done, _ = ray.wait([ref], timeout=5.0)
            if done:
                break
            self.phase(f"loading model on Ray worker {slot.index + 1} of {self.size}")
        try:
            facts: dict[str, Any] = ray.get(ref)
        except Exception as err:
            cause = _creation_error(err)
            if isinstance(cause, ModelNotFound | ConfigError):
                raise cause from None
            raise EngineUnavailable(f"Ray worker {slot.index} did not start: {cause}") from err
        return facts

    # -- the seam ----------------------------------------------------------------------------------
    def submit(self, key: SceneKey, request: SceneRequest) -> Ticket:
        if self._broken:
            self._restart()
        with self._lock:
            return self._offer(key, request)

    def _offer(self, key: SceneKey, request: SceneRequest) -> Ticket:
        """A new ticket, or the one already there (withdrawn ones become pending again). Under the lock."""
        ticket = self._tickets.get(key)
        if ticket is None:
            ticket = self._tickets[key] = Ticket(key, request, {"done": threading.Event(), "deaths": 0})
        elif not ticket.extra.pop("withdrawn", False):
            return ticket
        self._pending.append(ticket)
        self._lock.notify_all()
        return ticket

    def _restart(self) -> None:
        """After the cluster was lost: connect and start the workers again, or raise EngineUnavailable."""
        log.info("ray engine: starting again", was=self._broken)
        with contextlib.suppress(Exception):
            self.ray.shutdown()
        self._tickets.clear()
        self._pending.clear()
        self._slots = []
        self._broken = None
        try:
            self._start()
        except EngineUnavailable as err:
            self._broken = str(err)
            raise

    def wait(
        self, ticket: Ticket, timeout: float, on_step: StepCallback | None = None
    ) -> GeneratedImage | None:
        self._top_up()
        done: threading.Event = ticket.extra["done"]
        if not done.wait(timeout):
            self._raise_if_broken()
            return None
        with self._lock:
            self._tickets.pop(ticket.key, None)
        error = ticket.extra.get("error")
        if error is not None:
            raise error
        image: GeneratedImage = ticket.extra.pop("image")
        return image

    def set_lookahead(self, lookahead: Lookahead | None) -> None:
        self._lookahead = lookahead

    def _top_up(self) -> None:
        """Fill idle capacity with the scenes of the stories queued behind (daemon's thread only)."""
        if self._lookahead is None or self._broken:
            return
        limit = LOOKAHEAD_PER_WORKER * self.size
        for key, request in self._lookahead():
            with self._lock:
                if len(self._tickets) >= limit + len(self._pending_of_head()):
                    return
                self._offer(key, request)

    def _pending_of_head(self) -> list[Ticket]:
        """Tickets of the story in progress (the lowest claim order): they do not count against
        the lookahead's bound, which is about stories behind it."""
        if not self._tickets:
            return []
        head = min(k.order for k in self._tickets)
        return [t for k, t in self._tickets.items() if k.order == head]

    def withdraw(self) -> None:
        with self._lock:
            for ticket in self._pending:
                ticket.extra["withdrawn"] = True
            self._pending.clear()

    def retain(self, alive: Callable[[SceneKey], bool]) -> None:
        with self._lock:
            gone = [k for k in self._tickets if not alive(k)]
            for key in gone:
                ticket = self._tickets.pop(key)
                ticket.extra["dropped"] = True
            self._pending = [t for t in self._pending if not t.extra.get("dropped")]

    def describe(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = []
            for s in self._slots:
                key = s.ticket.key if s.ticket is not None else None
                state = "busy" if key else ("idle" if s.up else "restarting" if s.deaths else "starting")
                rows.append(
                    {
                        **s.identity(),
                        "pid": s.facts.get("pid"),
                        "state": "lost" if self._broken else state,
                        "claim": key.claim if key else None,
                        "scene": key.scene if key else None,
                        "images": s.images,
                        "last_error": s.last_error,
                    }
                )
            return rows

    def model(self) -> dict[str, Any]:
        return dict(self._model)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.ray.shutdown()

    def _raise_if_broken(self) -> None:
        if self._broken:
            raise EngineUnavailable(self._broken)

    # -- the dispatcher thread -----------------------------------------------------------------------
    def _dispatch(self) -> None:
        ray = self.ray
        while True:
            with self._lock:
                if self._closed or self._broken:
                    return
                self._hand_out()
                waiting = {s.ref: s for s in self._slots if s.ref is not None}
                probes = {s.probe: s for s in self._slots if s.probe is not None}
                idle = any(s.up and s.ticket is None for s in self._slots)
                if not waiting and not probes:
                    self._lock.wait(0.5)
                    continue
            try:
                # Short while a worker is idle: a new submission is handed out within this.
                ready, _ = ray.wait([*waiting, *probes], num_returns=1, timeout=0.02 if idle else 0.5)
                for ref in ready:
                    if ref in waiting:
                        self._collect(waiting[ref], ref)
                    else:
                        self._welcome_back(probes[ref], ref)
                self._enforce_deadlines()
            except Exception as err:  # the cluster or its head is gone: nothing more comes back
                self._break(f"lost the Ray cluster ({self.settings.workers.address or 'private'}): {err}")
                return

    def _hand_out(self) -> None:
        """Idle workers take the first pending tickets in queue order (under the lock)."""
        for slot in self._slots:
            if not self._pending:
                return
            if slot.up and slot.ticket is None:
                ticket = min(self._pending, key=lambda t: t.key)
                self._pending.remove(ticket)
                slot.ticket, slot.started, slot.killed = ticket, time.monotonic(), None
                slot.ref = slot.actor.generate.remote(ticket.request)

    def _collect(self, slot: _Slot, ref: Any) -> None:
        ray = self.ray
        ticket = slot.ticket
        assert ticket is not None
        try:
            image: GeneratedImage = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
            if isinstance(cause, GpuFatalError):  # the actor's CUDA context is gone: a new process
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor, no_restart=False)
                self._died(slot, f"GPU failure: {cause}")
                return
            with self._lock:
                slot.last_error = f"{type(cause).__name__}: {cause}"
                self._finish(slot, error=cause)
            return
        except ray.exceptions.RayError as err:  # the actor died (killed, OOM, node lost) or its result
            self._died(slot, slot.killed or _first_line(err))
            return
        elapsed = time.monotonic() - slot.started
        image.info["worker"] = slot.identity()
        with self._lock:
            slot.images += 1
            per_step = elapsed / max(1, ticket.request.steps)
            old = self._seconds_per_step
            self._seconds_per_step = per_step if old is None else 0.8 * old + 0.2 * per_step
            self._finish(slot, image=image)

    def _finish(self, slot: _Slot, **outcome: Any) -> None:
        ticket = slot.ticket
        assert ticket is not None
        slot.ticket = slot.ref = None
        ticket.extra.update(outcome)
        ticket.extra["done"].set()

    def _died(self, slot: _Slot, reason: str) -> None:
        """The worker process died with this scene in hand: Ray restarts it; the scene goes back
        to the front of the queue for any idle worker, unless it has killed too many already."""
        ticket = slot.ticket
        assert ticket is not None
        limit = self.settings.daemon.max_attempts
        with self._lock:
            ticket.extra["deaths"] += 1
            deaths = ticket.extra["deaths"]
            slot.deaths += 1
            slot.last_error = reason
            slot.up = False
            slot.probe = slot.actor.hello.remote()  # answered once Ray has restarted it
            log.warning(
                "ray worker died",
                worker=slot.id,
                pid=slot.facts.get("pid"),
                claim=ticket.key.claim,
                scene=ticket.key.scene,
                deaths=deaths,
                reason=reason,
            )
            if deaths >= limit:
                self._finish(
                    slot,
                    error=SceneKillsWorkers(
                        f"scene {ticket.key.scene} took down its worker {deaths} times "
                        f"(last: {reason}); giving up on it"
                    ),
                )
                return
            slot.ticket = slot.ref = None
            if not ticket.extra.get("dropped"):
                self._pending.append(ticket)  # first in queue order again: the earliest scene
            self._lock.notify_all()

    def _welcome_back(self, slot: _Slot, ref: Any) -> None:
        try:
            facts = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            with self._lock:
                slot.probe = slot.actor.hello.remote()  # died again while restarting: ask again
            return
        with self._lock:
            slot.facts.update(facts)
            slot.probe, slot.up = None, True
            log.info("ray worker back", worker=slot.id, pid=facts.get("pid"))

    def deadline(self) -> float:
        """How long one scene may take before its worker is taken for lost."""
        w = self.settings.workers
        if w.scene_timeout_seconds:
            return w.scene_timeout_seconds
        pace = self._seconds_per_step
        if pace is None:
            return DEADLINE_FLOOR_SECONDS
        return max(DEADLINE_FLOOR_SECONDS, DEADLINE_MARGIN * self.settings.image.steps * pace)

    def _enforce_deadlines(self) -> None:
        now, limit = time.monotonic(), self.deadline()
        for slot in self._slots:
            if slot.ticket is not None and slot.killed is None and now - slot.started > limit:
                slot.killed = f"scene {slot.ticket.key.scene} ran past its deadline of {limit:.0f} s"
                log.warning("ray worker past its deadline, killing it", worker=slot.id, reason=slot.killed)
                self.ray.kill(slot.actor, no_restart=False)

    def _break(self, reason: str) -> None:
        log.error("ray engine lost", reason=reason)
        with self._lock:
            self._broken = reason
            for ticket in self._tickets.values():
                ticket.extra["error"] = EngineUnavailable(reason)
                ticket.extra["done"].set()
            self._lock.notify_all()


def _prune_sessions(temp: Path, keep: int = 3) -> None:
    """Ray leaves one session folder (logs, sockets) per start; the spool lock makes this daemon
    the only user of this state folder, so older sessions are dead ones: keep the last few."""
    sessions = sorted(p for p in temp.glob("session_2*") if p.is_dir())
    for old in sessions[:-keep] if len(sessions) > keep else []:
        shutil.rmtree(old, ignore_errors=True)


def _creation_error(err: BaseException) -> BaseException:
    """The exception an actor's __init__ raised, from the error Ray reports for it."""
    for attr in ("cause", "creation_task_error", "error_msg"):
        value = getattr(err, attr, None)
        if isinstance(value, BaseException):
            return _creation_error(value) if value is not err else value
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
