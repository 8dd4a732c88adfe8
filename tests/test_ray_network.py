"""A private Ray instance lives on loopback alone: what the default unit's network sandbox allows.

systemd/storyreel.service keeps PrivateNetwork=yes (a network namespace holding only `lo`)
and RestrictAddressFamilies=. Here a child process is put in the same kind of place: a new
network namespace (`unshare --net`) with `lo` up, as PrivateNetwork= leaves it, and in its
own PID namespace, so every Ray process dies with it and none is left behind. In there it
starts Ray with the arguments the daemon uses for `[workers] address = ""`, runs a trivial
actor, and reports every listening socket of the namespace. One case also denies every
socket family the unit does not list, the way RestrictAddressFamilies= does (a seccomp
filter returning EAFNOSUPPORT, inherited by every Ray process).

Needs root (for the namespaces), unshare and ip; skipped elsewhere with the reason, failed
under CI=true. Skipped where Ray (the optional extra) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_systemd_unit import UNIT, parse_unit

from conftest import HANG_SECONDS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="no ray (storyreel[ray])"),
]

# The daemon's own private instance (pipeline/images/ray_start.py): no dashboard, every server on
# 127.0.0.1. `_node_ip_address="127.0.0.1"` alone is not enough on a box with a routable address:
# Ray 2.60 swaps it for that address and listens on every interface (measured); PRIVATE_ENV is what
# keeps it on loopback. Ray is imported only in the child, so the env var is set before its import.
# (Its workers at nice 0, not Ray's 15: tests/test_ray.py checks that on the daemon's actors.)
PRIVATE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
PRIVATE_RAY: dict[str, object] = {"address": "local", "include_dashboard": False}

# Runs in the namespace: argv[1] = JSON of ray.init kwargs, argv[2] = the socket families
# to allow ("" = no filter). Prints one JSON line: the actor's answer and what listens.
CHILD = r"""
import ctypes, ctypes.util, errno, json, os, socket, sys

def allow_only(families):
    # RestrictAddressFamilies= as systemd does it: socket() of any other family -> EAFNOSUPPORT.
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2")
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64
    class Cmp(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", u64), ("b", u64)]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [u32]
    rule_args = [ctypes.c_void_p, u32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_rule_add_array.argtypes = rule_args
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    nr = lib.seccomp_syscall_resolve_name(b"socket")
    for family in range(64):
        if family not in families:  # SCMP_CMP_EQ on argument 0, SCMP_ACT_ERRNO(EAFNOSUPPORT)
            rule = (Cmp * 1)(Cmp(0, 4, family, 0))
            assert lib.seccomp_rule_add_array(ctx, 0x00050000 | errno.EAFNOSUPPORT, nr, 1, rule) == 0
    assert lib.seccomp_load(ctx) == 0
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    except OSError:
        return
    raise SystemExit("the address-family filter did not take")

def descends_from_us(pid):
    # True for this script and the processes it started (Ray's GCS, raylet, workers)
    while pid != os.getpid():  # in its own PID namespace this script is PID 1
        if pid <= 1:
            return False
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            return False
        pid = int(status.split("PPid:")[1].split()[0])
    return True

def our_sockets():
    # The inodes of the sockets this script's process tree holds: on a host network other
    # programs (another test's Ray cluster, say) listen too, and are not this instance's doing.
    inodes = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and descends_from_us(int(entry)):
            try:
                fds = os.listdir(f"/proc/{entry}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{entry}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    return inodes

def listening():
    found = []
    ours = our_sockets()
    for name, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in open(name).read().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in ours:  # TCP_LISTEN, held by this instance
                addr, port = local.split(":")
                raw = bytes.fromhex(addr)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word byte order
                family = socket.AF_INET if width == 8 else socket.AF_INET6
                found.append(f"{socket.inet_ntop(family, raw)}:{int(port, 16)}")
    return found

if sys.argv[2]:
    allow_only({getattr(socket, name) for name in sys.argv[2].split()})
before = set(listening())  # on a host network: what other programs listen on already
import ray
ray.init(**json.loads(sys.argv[1]))

@ray.remote(num_cpus=0)
class Echo:
    def twice(self, x):
        return 2 * x

answer = ray.get(Echo.remote().twice.remote(21))
print(json.dumps({"answer": answer, "listening": [a for a in listening() if a not in before]}))
ray.shutdown()
"""


def require_namespaces() -> None:
    """Skip (fail under CI=true) unless this process can make network and PID namespaces."""
    lacks = [name for name in ("unshare", "ip") if shutil.which(name) is None]
    if os.geteuid() != 0:
        lacks.append("root (to make network and PID namespaces)")
    if not lacks:
        return
    reason = f"the loopback-only Ray test needs {', '.join(lacks)}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def unit_address_families() -> str:
    """RestrictAddressFamilies= of the default unit, e.g. "AF_UNIX AF_INET AF_INET6"."""
    found = [v for k, v in parse_unit(UNIT.read_text())["Service"] if k == "RestrictAddressFamilies"]
    assert len(found) == 1 and not found[0].startswith("~"), found
    return found[0]


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Ray's temp dir: short, because its socket paths must fit in sun_path (107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_private_instance(
    init: dict[str, object], families: str, home: Path, own_network: bool = True
) -> dict[str, object]:
    """The child, in a fresh network namespace (`lo` up, nothing else) and PID namespace; or,
    not `own_network`, on this machine's own network (where a routable address exists)."""
    namespaces = ["unshare", "--net", "--pid", "--fork", "--mount-proc"]
    lo_up = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    around = [*namespaces, *lo_up] if own_network else []
    result = subprocess.run(
        [*around, sys.executable, "-c", CHILD, json.dumps(init), families],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        env={**os.environ, **PRIVATE_ENV, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"},
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    failure = f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.returncode == 0 and lines, failure
    report: dict[str, object] = json.loads(lines[-1])
    return report


def test_the_daemons_private_instance_is_the_one_tested_here() -> None:
    from pipeline.images import ray_start

    assert ray_start.PRIVATE_ENV == PRIVATE_ENV and ray_start.PRIVATE_INIT == PRIVATE_RAY


@pytest.mark.parametrize(
    "restrict, own_network",
    [(False, True), (True, True), (False, False)],
    ids=["private-network", "and-unit-address-families", "host-network"],
)
def test_private_ray_instance_works_on_loopback_alone(
    restrict: bool, own_network: bool, ray_tmp: Path, tmp_path: Path
) -> None:
    """In the unit's own network namespace it works; on a host network it still listens on loopback
    only (the host-network case is the one that catches Ray binding a routable address)."""
    if own_network:
        require_namespaces()
    families = unit_address_families() if restrict else ""
    report = run_private_instance({**PRIVATE_RAY, "_temp_dir": str(ray_tmp)}, families, tmp_path, own_network)
    assert report["answer"] == 42
    listening = report["listening"]
    assert isinstance(listening, list) and listening, "Ray started, so something must listen"
    loopback = ("127.0.0.1:", "::ffff:127.0.0.1:", "::1:")
    assert [a for a in listening if not a.startswith(loopback)] == [], listening
    # Ray 2.59+ turns token auth on for a new local instance; the token lands in $HOME/.ray.
    assert (tmp_path / ".ray" / "auth_token").stat().st_size > 0
