"""The Ray driver, a child process of the daemon: `python -m pipeline.images.ray_child FD`.

Why a child: a Ray driver ends its own process when it cannot reach the cluster's head for a
minute (Ray's `gcs_rpc_server_reconnect_timeout_s`, ray#44704), `ray.init(address=...)` blocks
for minutes while no head answers, `ray.nodes()` blocks while the head is gone, and `ray.init`
takes SIGTERM from the process that calls it. In a child, all of that costs a new child, never
the daemon's loop, its watchdog pings, its status or its signal handler. The daemon side is
pipeline/images/ray_pool.py; the messages are pipeline/images/ray_wire.py's.

    1. signals: SIGINT ignored (Ctrl-C is the daemon's), SIGTERM = close (a flag)
    2. the daemon's "start": settings, generator factory, torch threads
    3. connect: TCP-probe a cluster's head first (none: exit 3 at once), then ray.init
    4. one actor per worker, placed with SPREAD; wait for each (phases go to the daemon)
    5. loop: commands -> dispatch -> the head probe -> count = 0 growth -> rows -> alive
    6. ray.shutdown(), exit 0; the cluster lost: exit 4 without it (it would wait on the head)

One thread, which never blocks for long except in a Ray call that hangs on a gone head; then the
daemon misses the "alive" beats and kills this process group.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from pipeline.errors import first_line
from pipeline.images.ray_dispatch import Dispatcher, Slot
from pipeline.images.ray_signals import shutdown_keeping_signals
from pipeline.images.ray_start import actor_class, connect, count_workers, creation_error, gpu_workers
from pipeline.images.ray_wire import (
    EXIT_CLOSED,
    EXIT_FATAL,
    EXIT_LOST,
    EXIT_UNREACHABLE,
    dumps_error,
    head_answers,
)
from pipeline.settings import ConfigError, Settings

TURN_SECONDS = 0.1  # the longest a turn waits on Ray: commands are read at least this often
PROBE_SECONDS = 1.0  # the head's TCP probe, this often
# The head silent this long: leave (exit 4) before Ray ends the process itself at its 60 s. A head
# back at the same address is a new cluster (no GCS fault tolerance): leave as soon as it answers.
GIVE_UP_SECONDS = 30.0
GROW_SECONDS = 2.0  # count = 0: how often the cluster's GPUs are counted again


class Lost(Exception):
    """The cluster cannot be used any more: the reason was sent."""


class Driver:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.closing = False
        self.settings: Settings | None = None
        self.address = ""
        self.head_down_since: float | None = None
        self._last_rows: list[dict[str, Any]] | None = None
        self._beat = self._probe_at = self._grow_at = 0.0

    def send(self, *msg: Any) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            self.closing = True  # the daemon is gone: nobody wants our results

    def on_term(self, signum: int, frame: object) -> None:
        self.closing = True

    # -- 2-3. start, connect ------------------------------------------------------------------
    def run(self) -> int:
        msg = self.conn.recv()
        assert msg[0] == "start", msg
        _, settings_bytes, factory, threads = msg
        settings = self.settings = pickle.loads(settings_bytes)
        self.address = address = settings.workers.address
        if address and not head_answers(address, 2.0):
            self.send("down", f"no Ray head answers at {address}")
            return EXIT_UNREACHABLE
        self.send("phase", "starting Ray" if not address else f"joining the Ray cluster at {address}")
        try:
            ray = connect(settings)
        except ConfigError as err:
            self.send("fatal", dumps_error(err))
            return EXIT_FATAL
        except Exception as err:
            self.send("down", f"Ray did not start ({address or 'private instance'}): {first_line(err)}")
            return EXIT_LOST
        try:
            self.serve(ray, settings, settings_bytes, factory, threads)
        except Lost:
            os._exit(EXIT_LOST)  # no ray.shutdown(): it would wait on the gone head
        except ConfigError as err:
            self.send("fatal", dumps_error(err))
            shutdown_keeping_signals(ray)
            return EXIT_FATAL
        except Exception as err:  # Ray's own errors once its raylet or GCS is gone
            where = address or "the private instance"
            self.send("down", f"lost the Ray cluster at {where}: {type(err).__name__}: {first_line(err)}")
            os._exit(EXIT_LOST)
        shutdown_keeping_signals(ray)
        return EXIT_CLOSED

    # -- 4. actors ------------------------------------------------------------------------------
    def serve(
        self, ray: Any, settings: Settings, settings_bytes: bytes, factory: bytes, threads: int
    ) -> None:
        count = count_workers(ray, settings)
        self.send("phase", f"loading model on {count} Ray workers")
        self.cls = actor_class(ray, settings)
        self.args = (settings_bytes, factory, threads)
        self.dispatch = Dispatcher(ray, settings, self.send)
        for i in range(count):
            self._add_worker(i)
        if not self._wait_ready(ray, count):
            return
        model = self.dispatch.slots[0].facts.get("model", {})
        self.send("ready", self.dispatch.rows(), model)
        self._last_rows = self.dispatch.rows()
        self.loop(ray)

    def _add_worker(self, index: int) -> Slot:
        slot = Slot(index, self.cls.remote(*self.args, f"ray-{index}"))
        slot.probe = slot.actor.hello.remote()
        self.dispatch.slots.append(slot)
        return slot

    def _wait_ready(self, ray: Any, count: int) -> bool:
        """Every worker's model loaded (False: asked to close meanwhile). A model that cannot
        load is "fatal"; a worker that dies before it is ready is the cluster's fault."""
        said = time.monotonic()
        while any(not s.up for s in self.dispatch.slots):
            self.read_commands()
            if self.closing:
                return False
            probes = {s.probe: s for s in self.dispatch.slots if s.probe is not None}
            ready, _ = ray.wait(list(probes), num_returns=1, timeout=TURN_SECONDS * 5)
            for ref in ready:
                slot = probes[ref]
                try:
                    facts = ray.get(ref)
                except Exception as err:
                    self.send("fatal", dumps_error(creation_error(err)))
                    raise Lost from err
                if "error" in facts:
                    self.send("fatal", facts["error"])
                    raise Lost
                slot.facts, slot.up, slot.probe = facts, True, None
            if time.monotonic() - said > 5.0:
                said = time.monotonic()
                left = [s.index + 1 for s in self.dispatch.slots if not s.up]
                self.send("phase", f"loading model on Ray worker {left[0]} of {count}")
        return True

    # -- 5. the loop ----------------------------------------------------------------------------
    def read_commands(self) -> None:
        try:
            while self.conn.poll(0):
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "submit":
                    self.dispatch.submit(msg[1], msg[2], msg[3])
                elif kind == "withdraw":
                    self.dispatch.withdraw()
                elif kind == "drop":
                    self.dispatch.drop(msg[1])
                elif kind == "close":
                    self.closing = True
        except (EOFError, OSError):
            self.closing = True

    def loop(self, ray: Any) -> None:
        while not self.closing:
            self.read_commands()
            self.dispatch.turn(TURN_SECONDS)
            self.watch_head()
            self.grow()
            self.report()

    def watch_head(self) -> None:
        """A cluster's head probed once a second. Silent: say so at once (the daemon waits; scenes
        in flight on other nodes may still come back), and leave when it answers again or after
        GIVE_UP_SECONDS: either way this driver's cluster is gone, and a new driver joins anew."""
        now = time.monotonic()
        if not self.address or now < self._probe_at:
            return
        self._probe_at = now + PROBE_SECONDS
        if head_answers(self.address, PROBE_SECONDS):
            if self.head_down_since is not None:
                self.send("log", "info", "ray head answers again: a new driver joins", {})
                raise Lost
            return
        if self.head_down_since is None:
            self.head_down_since = now
            self.send("down", f"the Ray head at {self.address} is not answering")
        elif now - self.head_down_since > GIVE_UP_SECONDS:
            raise Lost

    def grow(self) -> None:
        """count = 0: a worker for every GPU the cluster gained (a node that joined), counted
        every GROW_SECONDS while the head answers (the count is a GCS call: it blocks on a gone one)."""
        assert self.settings is not None
        w, now = self.settings.workers, time.monotonic()
        if w.count or now < self._grow_at or self.head_down_since is not None:
            return
        self._grow_at = now + GROW_SECONDS
        gpus = float(self.dispatch.ray.cluster_resources().get("GPU", 0))
        for index in range(len(self.dispatch.slots), gpu_workers(gpus, w.gpus_per_worker)):
            self._add_worker(index)
            self.send("log", "info", "ray worker added: the cluster grew", {"worker": f"ray-{index}"})

    def report(self) -> None:
        rows = self.dispatch.rows()
        if rows != self._last_rows:
            self.send("workers", rows)
            self._last_rows = rows
        if time.monotonic() >= self._beat:
            self.send("alive")
            self._beat = time.monotonic() + 1.0


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C to the terminal's group is the daemon's
    driver = Driver(Connection(int(argv[1])))
    signal.signal(signal.SIGTERM, driver.on_term)
    try:
        return driver.run()
    except Lost:
        return EXIT_LOST
    except (EOFError, OSError):  # the daemon went away before it said anything
        return EXIT_CLOSED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
