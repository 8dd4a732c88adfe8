"""What the Ray tests share: processes found by a mark, the daemon's notify socket, a real cluster.

    marked(tag)             the live processes whose environment carries RAY_TEST_MARK=tag
    NotifySocket()          a systemd notify socket of our own: what the daemon said, and when
    Cluster(tag)            `ray start --head` and `ray start --address` nodes on this machine

Processes are found by the mark every process of a test inherits (the daemon, its Ray driver
child, every Ray process that child starts, every `ray start` node), never by name, so a test
run beside another one sees only its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

MARK = "RAY_TEST_MARK"
RAY = str(Path(sys.executable).with_name("ray"))
TESTS = str(Path(__file__).resolve().parent)


def marked(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries MARK=tag."""
    needle = f"{MARK}={tag}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            env = Path(entry.path, "environ").read_bytes()
            if needle not in env.split(b"\0"):
                continue
            stat = Path(entry.path, "stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie is gone, only not reaped yet
                continue
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found.append((int(entry.name), cmd.strip()))
    return found


class NotifySocket:
    """A datagram socket in the place of systemd's: every message the daemon sends, timestamped."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sr-notify-", dir="/tmp")  # sun_path is 107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.messages.extend((now, line) for line in data.decode().splitlines())

    def since(self, start: int) -> list[str]:
        return [m for _, m in self.messages[start:]]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_block(size: int, low: int = 20000, high: int = 40000) -> int:
    """The first port of `size` consecutive ports that nothing on this machine listens on now."""
    rng = secrets.SystemRandom()
    for _ in range(200):
        base = rng.randrange(low, high - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {size} free consecutive ports")


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)

    def up(self) -> bool:
        return self.proc.poll() is None and "Ray runtime started" in self.log.read_text(errors="replace")


class Cluster:
    """A real Ray cluster on this machine: each node `ray start --block` in a session of its own,
    with token authentication, its own ports and its own loopback address (127.0.0.2, .3, …:
    Linux routes all of 127/8 over `lo`; Ray swaps only 127.0.0.1 for the box's routable address).

    Worker nodes see tests/ on their PYTHONPATH, as the daemon's private instance does, so that
    a daemon armed with tests/faulty.py arms its faults in the actors there too.
    """

    PORTS_PER_NODE = 40

    def __init__(self, tag: str, root: Path, head_env: dict[str, str] | None = None) -> None:
        self.tag, self.root = tag, root
        root.mkdir(parents=True, exist_ok=True)
        self.token = root / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            {
                MARK: tag,
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(self.token),
                "RAY_worker_niceness": "0",
                "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a stopped test node: no 30 s drain
                "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p),
            }
        )
        self.head_env = dict(head_env or {})
        self.nodes: dict[str, Node] = {}
        self.gcs_port = free_block(1)
        # Ray's session sockets must fit in 107 bytes: pytest's temp paths (popen-gwN/…) may not.
        self.temp = Path(tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp"))
        self._bases: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.gcs_port}"

    def _ports(self, name: str) -> list[str]:
        base = self._bases.setdefault(name, free_block(self.PORTS_PER_NODE))
        return [
            f"--node-manager-port={base}",
            f"--object-manager-port={base + 1}",
            f"--runtime-env-agent-port={base + 2}",
            f"--dashboard-agent-listen-port={base + 3}",
            f"--metrics-export-port={base + 4}",
            f"--dashboard-agent-grpc-port={base + 5}",
            f"--min-worker-port={base + 10}",
            f"--max-worker-port={base + self.PORTS_PER_NODE - 1}",
        ]

    def start(self, name: str, ip: str, cpus: int = 1, gpus: int = 0, wait: bool = True) -> Node:
        """Start (or start again, at the same address and ports) one node; the head is "head"."""
        head = name == "head"
        log = self.root / f"{name}.log"
        cmd = [
            RAY,
            "start",
            "--block",
            f"--node-ip-address={ip}",
            f"--num-cpus={cpus}",
            f"--num-gpus={gpus}",
            f"--resources={json.dumps({f'node:{name}': 1})}",
            "--disable-usage-stats",
            *self._ports(name),
        ]
        if head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=false"]
            cmd += [f"--temp-dir={self.temp}"]
        else:
            cmd += [f"--address={self.address}"]
        env = {**self.env, **(self.head_env if head else {})}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = self.nodes[name] = Node(name, ip, proc, log)
        if wait:
            self.wait_up(name)
        return node

    def wait_up(self, name: str, timeout: float = 180) -> None:
        node, end = self.nodes[name], time.monotonic() + timeout
        while not node.up():
            if node.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"ray node {name} did not start:\n{node.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def _descendants(self, root: int) -> list[int]:
        """The processes under `root` (its raylet, its workers, its agents), by parent pid."""
        children: dict[int, list[int]] = {}
        for pid, _ in marked(self.tag):
            try:
                parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(parent, []).append(pid)
        found, todo = [], [root]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def kill9(self, name: str) -> list[int]:
        """SIGKILL a node's `ray start`, raylet and every Ray worker of it at once: a box lost."""
        node = self.nodes[name]
        victims = [node.proc.pid, *self._descendants(node.proc.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.proc.wait()
        return victims

    def stop(self, name: str, timeout: float = 60) -> None:
        node = self.nodes.pop(name)
        if node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGTERM)
            try:
                node.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.nodes[name] = node
                self.kill9(name)
                self.nodes.pop(name)

    def close(self) -> None:
        for name in sorted(self.nodes, key=lambda n: n == "head"):  # the head last
            self.stop(name)
        end = time.monotonic() + 30
        while marked(self.tag) and time.monotonic() < end:
            time.sleep(0.2)
        for pid, _ in marked(self.tag):  # a node's leftovers (dashboard agents outlive a kill -9)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)
