"""Keep the caller's SIGTERM and SIGINT handlers through `ray.init` and `ray.shutdown` (Ray 2.60).

The Ray driver is a child process of the daemon (pipeline/images/ray_child.py), in a session of
its own, so the daemon's one handler (daemon/loop.py) is never touched; the driver's own SIGTERM
handler is a flag that asks it to close. In the process that is the Ray driver, three things
take SIGTERM away from its handler (read in Ray 2.60's source, measured in /work/wt/raylab: a
SIGTERM to a daemon that was the driver itself exited 15, 1 or -6, never 0):

1. `ray.init()` first sets a Python handler `sys.exit(signum)` (ray/_private/worker.py, `init`,
   through `ray._private.utils.set_sigterm_handler`): exit 15, or 1 when the SystemExit surfaces
   inside `ray.wait`/`ray.get`.
2. The core worker installs absl's failure-signal handler at the C level (SIGTERM among the
   crash signals): it logs "*** SIGTERM received at time=...", calls the previous handler and
   arms alarm(3), whose SIGALRM raises SIGABRT: a warm stop longer than 3 s ends in -6 and a
   core. `RAY_DISABLE_FAILURE_SIGNAL_HANDLER=1` before `import ray` keeps it out (DRIVER_ENV).
3. With absl in, `ray.shutdown()` resets SIGTERM to SIG_DFL at the C level, while Python's
   `signal.getsignal` still names the old handler: the next SIGTERM kills the process.

So `ray.init` runs with `set_sigterm_handler` made a no-op for the call, and both calls put the
caller's handlers back afterwards (`signal.signal` also takes the C-level slot back). SIGINT is
never Ray's: its own processes block it, its actors run in process groups of their own.
Adapted from Ray 2.60.0 (ray/_private/worker.py `init`, ray/_private/utils.py
`set_sigterm_handler`): a private API, checked by tests/test_ray_stops.py.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

# Into os.environ before `import ray` (ray/_private/ray_constants.py reads it at import).
DRIVER_ENV = {"RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1"}
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _keeping_signals() -> Iterator[None]:
    """The handlers in force before the block are in force after it (main thread only: elsewhere
    Ray installs nothing and Python cannot set one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in _SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def init_keeping_signals(ray: Any, **options: Any) -> Any:
    """`ray.init(**options)` without Ray's SIGTERM handler, before, during or after it."""
    import ray._private.utils as ray_utils  # init() looks the function up at call time

    with _keeping_signals():
        original = ray_utils.set_sigterm_handler
        ray_utils.set_sigterm_handler = lambda handler: None
        try:
            return ray.init(**options)
        finally:
            ray_utils.set_sigterm_handler = original


def shutdown_keeping_signals(ray: Any) -> None:
    """`ray.shutdown()`, the caller's handlers still in force after it."""
    with _keeping_signals():
        ray.shutdown()
