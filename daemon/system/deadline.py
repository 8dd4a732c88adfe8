"""Run a call that may hang in the kernel (a share that stopped answering) on a throw-away thread.

Why not inline: a hard-mounted NFS share that stops answering blocks readdir or stat in the
kernel, maybe for good. On a daemon thread that only costs the thread; the main loop keeps
pinging systemd and can say what is wrong. Why not a ThreadPoolExecutor: its workers are
joined at interpreter exit, so a stuck one would also hang shutdown. The caller waits on the
future with its own deadline (`Future.result(timeout=...)`) and may look again later.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def on_thread(fn: Callable[[], T], name: str) -> Future[T]:
    """`fn()` on a daemon thread of its own; its result or exception comes back in the future."""
    fut: Future[T] = Future()

    def work() -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as err:  # handed to the waiting caller, never lost
            fut.set_exception(err)

    threading.Thread(target=work, name=name, daemon=True).start()
    return fut
