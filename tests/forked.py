"""`storyreel run` for tests, forked from a warm interpreter instead of started cold.

A cold start of the daemon spends about 7 CPU-seconds importing torch, diffusers and
transformers before it reads its config; the suite starts the daemon about a hundred times, on
a 2-core machine. So each test process keeps one fork server (multiprocessing's "forkserver"
start method, Python 3.11) that has imported all of that once, and every daemon is a fresh
child forked from it: a real process of its own, with its own pid, folders, environment, cwd,
stdout and stderr, signals and exit status, running exactly `daemon.cli.main` (through
tests/faulty.py when faults are armed, as the cold command line does).

What a fork cannot give is a fresh interpreter, so what a module reads from the environment
at import time comes from the test process, not from the test's `env`. The daemon reads its
environment when it runs (NOTIFY_SOCKET, HF_HOME through `huggingface_hub`'s constants is the
exception, read at import): tests that set such variables, or that are about the installed
entry point itself, use `cold=True` (test_cli, test_notify's socket tests use it as needed).

The fork server never runs torch code, so no thread pool exists to be copied into a child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

# What a daemon imports before it reads its config: imported once, in the fork server.
PRELOAD = [
    "daemon.cli",
    "daemon.loop",
    "pipeline.images.sdxl",
    "pipeline.images.model",
    "pipeline.render",
    "faulty",
]

CLONE_NEWNET = 0x40000000  # <sched.h>

_CONTEXT: Any = None


def _context() -> Any:
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def _private_network() -> None:
    """What systemd's PrivateNetwork=yes gives a unit: a network namespace of its own with only a
    loopback, up. Needs root (CAP_SYS_ADMIN); Python 3.11 has no os.unshare, so through libc."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def _child(
    args: list[str],
    cwd: str,
    env: dict[str, str],
    out: str,
    err: str,
    faults: str,
    own_network: bool,
    session: bool = False,
) -> None:
    """Runs in the forked child: become `storyreel ARGS` with this environment and output
    (`session`: in a session and process group of its own, as a terminal or systemd starts it)."""
    if session:
        os.setsid()
    os.environ.clear()
    os.environ.update(env)
    if faults:  # Ray actors unpickle the armed factory, which names tests/faulty.py's module
        here = str(Path(__file__).parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        target = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(target, fd)
        os.close(target)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the fork server ignores SIGINT
    if own_network:
        _private_network()
    sys.argv = ["storyreel", *args]
    if faults:
        import faulty

        faulty.arm(json.loads(faults))
    from daemon.cli import main

    try:
        code = main(args)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    sys.exit(code)


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a daemon forked from the warm server."""

    def __init__(
        self,
        args: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        stdout: Path,
        stderr: Path | None = None,
        faults: dict[str, Any] | None = None,
        own_network: bool = False,
        session: bool = False,
    ) -> None:
        self.args = args
        dumped = json.dumps(faults) if faults else ""
        self._proc = _context().Process(
            target=_child,
            args=(args, str(cwd), env, str(stdout), str(stderr or stdout), dumped, own_network, session),
            daemon=False,
        )
        self._proc.start()
        self.pid: int = self._proc.pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not self._proc.is_alive():
            self.returncode = self._proc.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def run(
    args: list[str], *, cwd: Path, env: dict[str, str], faults: dict[str, Any] | None, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(..., capture_output=True, text=True)` for a forked `storyreel ARGS`."""
    with tempfile.TemporaryDirectory(prefix="storyreel-forked-") as scratch:
        out, err = Path(scratch) / "stdout", Path(scratch) / "stderr"
        proc = ForkedProcess(args, cwd=cwd, env=env, stdout=out, stderr=err, faults=faults)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
        return subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())
