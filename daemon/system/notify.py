"""The systemd notify protocol (sd_notify(3)) without a dependency.

Datagrams of newline-separated KEY=VALUE lines to the AF_UNIX socket named in
NOTIFY_SOCKET. The environment is read once, by the command line, through
`Notifier.from_environ(os.environ)`; nothing deeper looks at it.

Sending never raises: systemd restarting, a full socket buffer or a vanished
socket must not take the daemon down, and a dropped watchdog ping is retried at
the next call. The first failure of a run of failures is handed to `on_error`
so it can be logged once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping

Clock = Callable[[], float]

_ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str | None) -> str | None:
    """NOTIFY_SOCKET as an AF_UNIX address: "@name" is the abstract socket "\\0name".

    Anything but an absolute path or "@..." (e.g. systemd 253's "vsock:" form)
    is not supported here and disables notification rather than guessing.
    """
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def _positive_int(value: str | None) -> int | None:
    try:
        number = int(value) if value is not None else 0
    except ValueError:
        return None
    return number if number > 0 else None


def _one_line(text: str) -> str:
    """A newline would start a new KEY=VALUE assignment: keep STATUS= one line."""
    return " ".join(text.splitlines())


class Notifier:
    """Talks to the service manager; every method is a cheap no-op when not under systemd.

    Use from the CLI:

        notifier = Notifier.from_environ(os.environ, on_error=lambda e: log.warning("sd_notify", err=e))
        notifier.extend_timeout(10 * 60 * 1_000_000)   # while loading / compiling the model
        notifier.ready("idle, watching /srv/storyreel/inbox")
        loop: notifier.watchdog(); notifier.status("story 3/10: scene 4/12")
              (and notifier.watchdog() from the denoising step callback)
        notifier.stopping("finishing scene in progress")
    """

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        clock: Clock = time.monotonic,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address is not None else None
        self._clock = clock
        self._on_error = on_error
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False
        self._last_ping: float | None = None
        # Ping at least four times per watchdog period, so one lost datagram or a
        # slow step never comes close to the deadline.
        self._ping_every = self._watchdog_usec / 4_000_000 if self._watchdog_usec else None

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str],
        *,
        pid: int | None = None,
        clock: Clock = time.monotonic,
        on_error: Callable[[OSError], None] | None = None,
        unset: bool = False,
    ) -> Notifier:
        """Build from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.

        WATCHDOG_PID names the process systemd expects pings from; any other
        process (e.g. a child that inherited the environment) must stay silent.
        `unset=True` removes the three variables from a mutable `environ`, as
        sd_notify's unset_environment does, so ffmpeg and other children do not
        inherit them.
        """
        address = socket_address(environ.get("NOTIFY_SOCKET"))
        watchdog_usec = _positive_int(environ.get("WATCHDOG_USEC"))
        watchdog_pid = _positive_int(environ.get("WATCHDOG_PID"))
        if watchdog_pid is not None and watchdog_pid != (os.getpid() if pid is None else pid):
            watchdog_usec = None
        if unset and isinstance(environ, MutableMapping):
            for key in _ENV_KEYS:
                environ.pop(key, None)
        return cls(address, watchdog_usec=watchdog_usec, clock=clock, on_error=on_error)

    # ------------------------------------------------------------------ state

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self._ping_every is not None

    @property
    def watchdog_interval_seconds(self) -> float:
        """WatchdogSec= as seen by this process; 0.0 (as sd_watchdog_enabled) when none applies."""
        return self._watchdog_usec / 1_000_000 if self._watchdog_usec else 0.0

    # --------------------------------------------------------------- messages

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"] + ([f"STATUS={_one_line(status)}"] if status is not None else [])
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"] + ([f"STATUS={_one_line(status)}"] if status is not None else [])
        return self.send(*lines)

    def extend_timeout(self, usec: int) -> bool:
        """Ask for `usec` more from now before the start (or stop) timeout fires."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    @property
    def last_ping(self) -> float | None:
        """When the last watchdog ping went out (this notifier's clock); None before the first."""
        return self._last_ping

    def watchdog(self, force: bool = False) -> bool:
        """Ping the watchdog, at most every WATCHDOG_USEC/4 unless `force`.

        Cheap enough for every denoising step: when nothing is due it is a clock
        read and a comparison. Returns whether a ping was sent.
        """
        every = self._ping_every
        if every is None:
            return False
        now = self._clock()
        last = self._last_ping
        if not force and last is not None and now - last < every:
            return False
        if self.send("WATCHDOG=1"):
            self._last_ping = now
            return True
        return False

    def send(self, *assignments: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False when disabled or the send failed."""
        if self._address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        with self._lock:
            try:
                sock = self._socket()
                sock.sendto(data, self._address)
            except OSError as err:
                self._report(err)
                return False
            self._failing = False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    # ---------------------------------------------------------------- helpers

    def _socket(self) -> socket.socket:
        """One unconnected socket: sendto() reaches a socket systemd re-created after a re-exec."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)  # a full receive queue drops the message, it never stalls us
            self._sock = sock
        return self._sock

    def _report(self, err: OSError) -> None:
        if self._failing:
            return
        self._failing = True
        if self._on_error is not None:
            with contextlib.suppress(Exception):  # a broken logger must not turn a lost ping into a crash
                self._on_error(err)


class WatchdogThread:
    """A thread that acts every `fraction` of the watchdog period, from `start` until `stop`;
    none at all when no watchdog applies."""

    name = "storyreel-watchdog"
    fraction = 0.25

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        every = self.notifier.watchdog_interval_seconds * self.fraction
        if not every or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(every,), name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self, every: float) -> None:
        while not self._done.is_set():
            self.tick()
            self._done.wait(every)


class Heartbeat(WatchdogThread):
    """Pings the watchdog from a thread of its own while the daemon closes down.

    Once the loop has returned it is no longer the sign of life: closing (the workers, the CPU
    pool's last encode, status lines owed to a slow share, the hooks' grace) takes what it
    takes, and TimeoutStopSec= bounds it. A watchdog kill then would turn a clean stop into an
    abort and a core dump. Started once the loop is done; stopped as the last thing before exit.
    """

    name = "storyreel-stopping"

    def tick(self) -> None:
        self.notifier.watchdog(force=True)
