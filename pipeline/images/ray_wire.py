"""The wire between the daemon and its Ray driver, a child process: one Unix socketpair.

Framed and pickled by the standard library's `multiprocessing.connection.Connection` (a length
prefix, then a pickle). Both ends are the same installed package and nothing else can reach a
socketpair, so pickle is safe here. Requests, settings, errors and images travel as pickled
bytes (the generator factory by value, with cloudpickle, as Ray itself would send it): the
driver keeps them as bytes and hands them on, so it never imports what they are made of
(torch, diffusers), and the daemon never imports Ray.

Every message is a tuple whose first item names it; a key is a `SceneKey`.

daemon -> driver
    ("start", settings, factory, threads)  once, first (pickled settings and generator factory;
                                           the daemon's torch thread count, for the actors)
    ("submit", key, request, steps)  a scene (request: pickled; steps: its denoising steps, for
                                the workers' rows); a key it has already is ignored
    ("withdraw",)               start none of the scenes handed in so far (a pause, a stop)
    ("drop", key)               forget it (its story ended); one under way finishes unseen
    ("close",)                  ray.shutdown() and exit 0 (EOF on the socket means the same)

driver -> daemon
    ("phase", text)             start-up progress: systemd's STATUS= and start-up allowance
    ("ready", rows, model)      every worker is up: rows as ImageWorkers.describe(), the model
    ("workers", rows)           a worker changed (busy, idle, restarting, a new one)
    ("done", key, image)        image: a pickled GeneratedImage
    ("error", key, error)       error: the pickled exception that making it raised
    ("down", reason)            the cluster cannot be used (its head does not answer): why
    ("fatal", error)            start-up cannot work (no weights, a bad count): pickled error
    ("log", level, event, fields)  a line for the daemon's log (the daemon is the one logger)
    ("alive",)                  once a second: the driver's loop is turning
"""

from __future__ import annotations

import pickle
import socket
from multiprocessing.connection import Connection
from typing import Any

# How the driver ends: the daemon tells its users why from this.
EXIT_CLOSED = 0  # asked to (or the daemon went away)
EXIT_UNREACHABLE = 3  # no Ray head answered before ray.init
EXIT_LOST = 4  # the cluster went away while running
EXIT_FATAL = 5  # start-up cannot work: said in a "fatal" message first

MODULE = "pipeline.images.ray_child"  # python -m MODULE FD


def pair() -> tuple[Connection, socket.socket]:
    """The daemon's end as a Connection, and the driver's as a socket whose fd it inherits."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(ours.detach()), theirs


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def dumps_error(err: BaseException) -> bytes:
    """An exception as bytes; one that does not pickle becomes a RuntimeError with its text."""
    try:
        data = dumps(err)
        pickle.loads(data)
        return data
    except Exception:  # an exception class with arguments pickle cannot rebuild
        return dumps(RuntimeError(f"{type(err).__name__}: {err}"))


def host_port(address: str) -> tuple[str, int] | None:
    """The head's HOST and PORT in "HOST:PORT" or "ray://HOST:PORT"; None for "auto" or ""."""
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def head_answers(address: str, timeout: float) -> bool:
    """Whether something accepts a TCP connection at the head's address (True for "auto").

    A connect, not a Ray call: Ray's own calls block for minutes on a head that is gone."""
    target = host_port(address)
    if target is None:
        return True
    try:
        with socket.create_connection(target, timeout=timeout):
            return True
    except OSError:
        return False
