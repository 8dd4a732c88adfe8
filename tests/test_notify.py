"""Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from daemon.system.notify import Heartbeat, Notifier, socket_address
from daemon.system.stall import StallWatch

from conftest import Setup, check_published

pytestmark = pytest.mark.timeout(30)


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket, as systemd's /run/systemd/notify is."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def nothing_waiting(sock: socket.socket) -> bool:
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def test_ready_status_stopping_extend(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled and not n.watchdog_enabled and n.watchdog_interval_seconds == 0.0
    assert n.ready()
    assert received(sock) == ["READY=1"]
    assert n.ready("idle, watching /srv/inbox")
    assert received(sock) == ["READY=1", "STATUS=idle, watching /srv/inbox"]
    assert n.status("scene 2/5\nREADY=1")  # a newline must not smuggle in an assignment
    assert received(sock) == ["STATUS=scene 2/5 READY=1"]
    assert n.extend_timeout(90_000_000)
    assert received(sock) == ["EXTEND_TIMEOUT_USEC=90000000"]
    assert n.stopping("finishing scene")
    assert received(sock) == ["STOPPING=1", "STATUS=finishing scene"]
    assert not n.watchdog()  # no WATCHDOG_USEC: nothing expected, nothing sent
    assert nothing_waiting(sock)
    n.close()


def test_watchdog_rate_limit(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    clock = FakeClock()
    n = Notifier.from_environ(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid())},
        clock=clock,
    )
    assert n.watchdog_enabled and n.watchdog_interval_seconds == 8.0
    assert n.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    for _ in range(1000):  # every denoising step
        assert not n.watchdog()
    clock.now += 1.9
    assert not n.watchdog()
    clock.now += 0.1  # WATCHDOG_USEC / 4 since the last ping
    assert n.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert n.watchdog(force=True)
    assert received(sock) == ["WATCHDOG=1"]
    assert nothing_waiting(sock)


def test_the_heartbeat_pings_while_the_daemon_closes_down_and_stops_with_it(
    manager: tuple[socket.socket, str],
) -> None:
    """The main thread is busy closing (nothing of it pings): the heartbeat's own thread does,
    every quarter period; once stopped, no ping comes."""
    sock, path = manager
    n = Notifier.from_environ(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    )
    beat = Heartbeat(n)
    beat.start()
    beat.start()  # once only: a second start is a no-op
    assert [received(sock) for _ in range(5)] == [["WATCHDOG=1"]] * 5  # each within the socket's 2 s
    beat.stop()
    while not nothing_waiting(sock):  # what was sent before the stop
        pass
    sock.settimeout(0.2)  # four periods of the heartbeat: it would have sent some
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_no_heartbeat_without_a_watchdog(manager: tuple[socket.socket, str]) -> None:
    _, path = manager
    beat = Heartbeat(Notifier.from_environ({"NOTIFY_SOCKET": path}))
    beat.start()
    assert beat._thread is None
    beat.stop()


def test_late_pings_are_said_once_per_silence_with_where_the_loop_was(
    manager: tuple[socket.socket, str],
) -> None:
    _, path = manager
    clock = FakeClock()
    n = Notifier.from_environ(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}, clock=clock
    )
    watch = StallWatch(n, clock=clock)  # made on this thread: the loop's, here
    with structlog.testing.capture_logs() as logs:
        n.watchdog()
        clock.now += 2.0  # half the period: not late yet
        watch.tick()
        clock.now += 0.5
        watch.tick()
        watch.tick()  # the same silence: said once
        n.watchdog()
        clock.now += 3.0
        watch.tick()
    late = [e for e in logs if e["event"] == "watchdog pings late"]
    assert [e["seconds"] for e in late] == [2.5, 3.0]
    assert all("test_late_pings_are_said_once_per_silence" in e["where"] for e in late), late[0]["where"]


def test_watchdog_pid_of_another_process_disables_pings(manager: tuple[socket.socket, str]) -> None:
    sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    n = Notifier.from_environ(env, pid=4242)
    assert not n.watchdog_enabled and not n.watchdog(force=True)
    assert n.ready()  # other messages still go out
    assert received(sock) == ["READY=1"]
    assert Notifier.from_environ(env, pid=1).watchdog_enabled


def test_abstract_socket() -> None:
    name = f"storyreel-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    try:
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_disabled_without_socket() -> None:
    n = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not n.enabled and not n.watchdog_enabled
    assert not n.ready() and not n.status("x") and not n.watchdog(force=True) and not n.stopping()
    assert not n.extend_timeout(1)


@pytest.mark.parametrize(
    ("value", "address"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@x", "\0x"),
        ("vsock:2:99", None),
    ],
)
def test_socket_address(value: str | None, address: str | None) -> None:
    assert socket_address(value) == address


def test_send_errors_are_swallowed_and_reported_once(tmp_path: Path) -> None:
    errors: list[OSError] = []
    n = Notifier.from_environ(
        {"NOTIFY_SOCKET": str(tmp_path / "gone"), "WATCHDOG_USEC": "4000000"},
        on_error=errors.append,
    )
    assert not n.ready()
    assert not n.watchdog()
    assert not n.status("still going")
    assert len(errors) == 1 and isinstance(errors[0], OSError)

    # systemd comes back: sends succeed again, and a later failure is reported again.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "gone"))
    try:
        assert n.watchdog()
        assert n.status("ok")
    finally:
        sock.close()
    os.unlink(tmp_path / "gone")
    assert not n.status("gone again")
    assert len(errors) == 2


def test_broken_error_callback_does_not_raise(tmp_path: Path) -> None:
    def explode(_err: OSError) -> None:
        raise RuntimeError("logger broken")

    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nothing")}, on_error=explode)
    assert not n.ready()


def test_full_receive_queue_does_not_block(manager: tuple[socket.socket, str]) -> None:
    _sock, path = manager
    n = Notifier.from_environ({"NOTIFY_SOCKET": path})
    results = [n.status("x" * 1000) for _ in range(5000)]  # nobody reads: the queue fills up
    assert results[0] and not results[-1]


def test_unset_removes_variables(manager: tuple[socket.socket, str]) -> None:
    _sock, path = manager
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid()), "HOME": "/x"}
    n = Notifier.from_environ(env, unset=True)
    assert n.enabled and n.watchdog_enabled
    assert env == {"HOME": "/x"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_daemon_logs_notify_failures_once_and_carries_on(setup: Setup, tmp_path: Path) -> None:
    """No socket behind NOTIFY_SOCKET: every message is lost, one log line says so, the story is made."""
    setup.drop("n.json", {"title": "n", "seed": 1, "scenes": ["a lighthouse at dusk"]})
    result = setup.run_once(env={"NOTIFY_SOCKET": str(tmp_path / "no-such-socket")})
    assert result.returncode == 0, result.stderr
    failures = [line for line in result.stderr.splitlines() if "sd_notify failed" in line]
    assert len(failures) == 1, result.stderr
    assert "No such file or directory" in failures[0]
    check_published(setup, "n", 1)
