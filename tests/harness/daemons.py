"""One daemon's world (`Setup`) and the daemon itself (`Daemon`), a real process.

A daemon that dies while a test waits on it fails the wait at once, with its log. Its log is
JSON lines (the daemon's own format off a terminal): `Daemon.events()` parses them, so a test
asserts on the events the code emits ("waiting", "story ended" with its state, …), never on a
loose substring of the output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import forked
from harness.world import HANG_SECONDS, REPO, SMALL, command, storyreel, wait_for, write_config

RUNNING: list[subprocess.Popen[bytes] | forked.ForkedProcess] = []  # killed after each test


def stop_leftovers() -> None:
    """Kill what a test left running (a failed test's daemon), so none outlives its test."""
    while RUNNING:
        proc = RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


class Setup:
    """One daemon's world: a config over temp inbox/outbox/state folders, and ways to run it."""

    def __init__(self, root: Path, tiny: Path, **overrides: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.inbox, self.outbox, self.state = root / "inbox", root / "outbox", root / "state"
        sections: dict[str, dict[str, Any]] = {
            "paths": {"inbox": self.inbox, "outbox": self.outbox, "state": self.state},
            "model": {"source": "tiny", "device": "cpu", "tiny_dir": tiny, "warmup": False},
        }
        for key, values in SMALL.items():
            sections[key] = dict(values)
        for key, values in overrides.items():
            sections.setdefault(key, {}).update(values)
        self.sections = sections
        self.config = write_config(root / "config.toml", sections)
        self.inbox.mkdir(parents=True, exist_ok=True)
        self.outbox.mkdir(parents=True, exist_ok=True)  # [paths] create = false: both must exist
        self.release_path = root / "release"

    @property
    def width(self) -> int:
        return int(self.sections["image"]["width"])

    @property
    def height(self) -> int:
        return int(self.sections["image"]["height"])

    def drop(self, name: str, doc: Any, *, in_place: bool = False, mtime: float | None = None) -> Path:
        """Drop a story the way users do: write aside then rename (default), or in place."""
        data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        final = self.inbox / name
        target = final if in_place else self.inbox / f".{name}.part"
        target.write_bytes(data)
        if mtime is not None:
            os.utime(target, (mtime, mtime))
        if not in_place:
            os.rename(target, final)
        return final

    def status(self, name: str) -> list[dict[str, Any]]:
        try:
            text = (self.outbox / f"{name}.status.jsonl").read_text("utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines()]

    def last_state(self, name: str) -> str | None:
        lines = self.status(name)
        return lines[-1]["state"] if lines else None

    def hold(self, *, scene: str | None = None, clip: str | None = None) -> dict[str, Any]:
        """Faults that stop the daemon in the middle of a scene (prompt contains `scene`) or of a
        clip render (file name `clip`) until `release()`: "while scene 3 is in progress" becomes a
        state the test waits for, whatever the machine's pace."""
        faults: dict[str, Any] = {"release": str(self.release_path)}
        if scene is not None:
            faults["hold_scene"] = scene
        if clip is not None:
            faults["hold_clip"] = clip
        return faults

    def release(self) -> None:
        self.release_path.touch()

    def run_once(
        self,
        timeout: float = HANG_SECONDS,
        env: dict[str, str] | None = None,
        faults: dict[str, Any] | None = None,
        cold: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        return storyreel(
            "run", "--once", "--config", str(self.config), env=env, faults=faults, timeout=timeout, cold=cold
        )

    def start(
        self,
        env: dict[str, str] | None = None,
        faults: dict[str, Any] | None = None,
        cold: bool = False,
        own_network: bool = False,
        session: bool = False,
    ) -> Daemon:
        """`own_network`: in a network namespace with only a loopback, as PrivateNetwork=yes gives
        the unit (root only; forked, not cold). `session`: in a session (process group) of its
        own, so that `Daemon.signal_group` reaches what a terminal's Ctrl-C reaches."""
        return Daemon(self, env or {}, faults, cold=cold, own_network=own_network, session=session)


class Daemon:
    """`storyreel run` as a real process, its output kept in a file for post-mortems."""

    def __init__(
        self,
        setup: Setup,
        env: dict[str, str],
        faults: dict[str, Any] | None,
        cold: bool = False,
        own_network: bool = False,
        session: bool = False,
    ) -> None:
        """Forked from the warm server (tests/forked.py), or, `cold`, the command line as shipped."""
        self.log_path = setup.root / f"daemon-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        args = ["run", "--config", str(setup.config)]
        self.proc: subprocess.Popen[bytes] | forked.ForkedProcess
        if cold:
            assert not own_network, "a network namespace of its own is for forked daemons"
            self.proc = subprocess.Popen(
                [*command(faults), *args],
                cwd=REPO,
                env={**os.environ, **env},
                stdout=self.log,
                stderr=subprocess.STDOUT,
                start_new_session=session,
            )
        else:
            self.proc = forked.ForkedProcess(
                args,
                cwd=REPO,
                env={**os.environ, **env},
                stdout=self.log_path,
                faults=faults,
                own_network=own_network,
                session=session,
            )
        RUNNING.append(self.proc)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, predicate: Callable[[], Any], what: str = "condition") -> Any:
        """Wait until `predicate` holds; fails at once if this daemon exits first."""
        return wait_for(predicate, what, daemon=self)

    def logged(self, text: str) -> None:
        """Wait until the daemon's output contains `text` (for what is not a log event: the
        FAULT lines of tests/faulty.py)."""
        self.wait_for(lambda: text in self.output(), f"{text!r} in the daemon's output")

    def events(self, name: str | None = None, since: int = 0, **fields: Any) -> list[dict[str, Any]]:
        """The daemon's log events, parsed (lines that are not JSON log events are skipped), from
        the `since`-th on; only those named `name` with these `fields`, when given."""
        found = []
        for line in self.output().splitlines():
            if not line.startswith("{"):
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue  # a line being written right now
            if isinstance(event, dict) and "event" in event:
                found.append(event)
        return [e for e in found[since:] if _matches(e, name, fields)]

    def wait_event(self, name: str, since: int = 0, **fields: Any) -> dict[str, Any]:
        """Wait until the daemon logs event `name` (with these `fields`) as its `since`-th or later."""
        hits = self.wait_for(lambda: self.events(name, since, **fields), f"event {name!r} {fields or ''}")
        return hits[0]  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """`sig` to the daemon's whole process group (started with `session=True`), as Ctrl-C does."""
        assert os.getpgid(self.proc.pid) == self.proc.pid, "start it with session=True"
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = HANG_SECONDS) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()


def _matches(event: dict[str, Any], name: str | None, fields: dict[str, Any]) -> bool:
    return (name is None or event.get("event") == name) and all(event.get(k) == v for k, v in fields.items())
