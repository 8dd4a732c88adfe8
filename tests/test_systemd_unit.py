"""The systemd units: the settings the daemon's design relies on, and the sandbox scores.

storyreel.service, its cluster drop-in storyreel-cluster.conf, and the Ray head and worker
units. They are parsed as text (keys may repeat, so configparser does not fit). Where
systemd-analyze is installed, the offline security analysis must keep each exposure at 2.0
or less, and `verify` must find nothing but the absent ExecStart binary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "storyreel.service"
CLUSTER = SYSTEMD / "storyreel-cluster.conf"
RAY_HEAD = SYSTEMD / "storyreel-ray-head.service"
RAY_WORKER = SYSTEMD / "storyreel-ray-worker.service"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.timeout(60)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in re.sub(r"\\\n[ \t]*", " ", text).splitlines():  # join "\"-continued lines
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, list[tuple[str, str]]]:
    return parse_unit(UNIT.read_text())


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"{key}= should be set exactly once in [{section}], found {found}"
    return found[0]


def test_notify_service_with_watchdog(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "ExecStart") == (
        "/opt/storyreel/.venv/bin/storyreel run --config /etc/storyreel/config.toml"
    )
    assert re.fullmatch(r"\d+(s|min)?", one(unit, "Service", "WatchdogSec"))
    assert one(unit, "Service", "TimeoutStartSec")
    assert one(unit, "Service", "TimeoutStopSec")
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "User") == "storyreel"


def test_gpu_reachable_and_nothing_else(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "DevicePolicy") == "closed"
    allowed = " ".join(values(unit, "Service", "DeviceAllow"))
    for node in ("nvidiactl", "nvidia-uvm"):
        assert re.search(rf"(/dev/|char-){re.escape(node)}\s+rw", allowed), node
    assert "char-nvidia-frontend" in allowed and "char-nvidia " in allowed + " "


def test_options_that_break_cuda_are_absent(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert values(unit, "Service", "PrivateDevices") in ([], ["no"])  # would hide /dev/nvidia*
    assert values(unit, "Service", "MemoryDenyWriteExecute") in ([], ["no"])  # CUDA JIT, torch.compile
    assert values(unit, "Service", "ProcSubset") != ["pid"]  # /proc/driver/nvidia


def test_paths_and_offline_environment(unit: dict[str, list[tuple[str, str]]]) -> None:
    assert one(unit, "Service", "StateDirectory") == "storyreel"
    rw = " ".join(values(unit, "Service", "ReadWritePaths")).split()
    assert {"/srv/storyreel/inbox", "/srv/storyreel/outbox"} <= set(rw)
    mounts = " ".join(values(unit, "Unit", "RequiresMountsFor")).split()
    assert {"/srv/storyreel/inbox", "/srv/storyreel/outbox"} <= set(mounts)
    env = " ".join(values(unit, "Service", "Environment"))
    for assignment in ("HF_HOME=/var/lib/storyreel/hf", "HF_HUB_OFFLINE=1", "PYTHONUNBUFFERED=1"):
        assert assignment in env


def test_default_unit_keeps_ray_on_its_own_loopback(unit: dict[str, list[tuple[str, str]]]) -> None:
    """engine = "ray" with address = "": Ray's gRPC on 127.0.0.1 of the unit's own namespace."""
    assert one(unit, "Service", "PrivateNetwork") == "yes"
    assert one(unit, "Service", "IPAddressDeny") == "any"
    assert one(unit, "Service", "IPAddressAllow") == "localhost"  # else IPAddressDeny= blocks 127.0.0.1 too
    families = one(unit, "Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # run for real: tests/test_ray_network.py


def test_cluster_drop_in_opens_the_cluster_subnet_only() -> None:
    drop_in = parse_unit(CLUSTER.read_text())
    assert one(drop_in, "Service", "PrivateNetwork") == "no"
    allowed = " ".join(values(drop_in, "Service", "IPAddressAllow")).split()
    assert allowed and not {"any", "0.0.0.0/0", "::/0", ""} & set(allowed), allowed
    assert values(drop_in, "Service", "IPAddressDeny") == []  # the unit's "any" stays
    assert values(drop_in, "Service", "RestrictAddressFamilies") == []  # the unit's list stays
    env = " ".join(values(drop_in, "Service", "Environment"))
    assert "RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN_PATH=/etc/storyreel/ray-token" in env
    assert "storyreel-ray-head.service" in one(drop_in, "Unit", "After")
    assert (
        values(drop_in, "Unit", "Requires") == values(drop_in, "Unit", "BindsTo") == []
    )  # lost head = waiting


@pytest.mark.parametrize("path", [RAY_HEAD, RAY_WORKER], ids=lambda p: p.name)
def test_ray_node_units(path: Path) -> None:
    node = parse_unit(path.read_text())
    command = one(node, "Service", "ExecStart").split()
    assert command[:2] == ["/opt/storyreel/.venv/bin/ray", "start"] and "--block" in command
    if path == RAY_HEAD:
        assert {"--head", "--port=6379", "--include-dashboard=false"} <= set(command)
    else:
        assert "--address=${RAY_HEAD}" in command and "--head" not in command
    fixed = {"--node-manager-port=6700", "--object-manager-port=6701", "--min-worker-port=6710"}
    assert fixed | {"--max-worker-port=6799", "--node-ip-address=${RAY_NODE_IP}"} <= set(command)
    env = " ".join(values(node, "Service", "Environment"))
    for assignment in (
        "RAY_AUTH_MODE=token",
        "RAY_AUTH_TOKEN_PATH=",
        "HF_HOME=/var/lib/storyreel/hf",
        "HF_HUB_OFFLINE=1",
        "RAY_worker_niceness=0",  # not Ray's 15: the image makers are the box's main work
    ):
        assert assignment in env
    assert one(node, "Service", "User") == "storyreel"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes")]:
        assert one(node, "Service", key) == value
    assert one(node, "Service", "PrivateTmp") == one(node, "Service", "RestrictNamespaces") == "yes"
    assert "@system-service" in values(node, "Service", "SystemCallFilter")
    assert one(node, "Service", "IPAddressDeny") == "any"
    assert one(node, "Service", "DevicePolicy") == "closed"
    assert re.search(r"(/dev/|char-)nvidia-uvm\s+rw", " ".join(values(node, "Service", "DeviceAllow")))
    assert values(node, "Service", "MemoryDenyWriteExecute") in ([], ["no"])  # CUDA JIT, torch.compile
    assert values(node, "Service", "PrivateDevices") in ([], ["no"])


def offline_root(tmp_path: Path, name: str) -> tuple[Path, str]:
    """A root for --root= holding the unit to analyse (storyreel+cluster: the unit and its drop-in)."""
    system = tmp_path / "etc" / "systemd" / "system"
    system.mkdir(parents=True)
    if name == "storyreel+cluster":
        (system / "storyreel.service.d").mkdir()
        (system / "storyreel.service.d" / "cluster.conf").write_text(CLUSTER.read_text())
        name = "storyreel"
    (system / f"{name}.service").write_text((SYSTEMD / f"{name}.service").read_text())
    return system, f"{name}.service"


ANALYSED = ["storyreel", "storyreel+cluster", "storyreel-ray-head", "storyreel-ray-worker"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ANALYSED)
def test_security_exposure(name: str, tmp_path: Path) -> None:
    offline_root(tmp_path, name)
    target = "storyreel.service" if name == "storyreel+cluster" else f"{name}.service"
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={tmp_path}", "--no-pager", target],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    if "Unknown command verb" in output or "unrecognized option" in output:
        pytest.skip("this systemd-analyze cannot analyse a unit offline (needs systemd 250 or later)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, output
    assert float(match.group(1)) <= MAX_EXPOSURE, output
    if name == "storyreel+cluster":  # the drop-in was read: the host's network is open
        assert re.search(r"✗ PrivateNetwork=", output), output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("name", ANALYSED)
def test_verify_finds_only_the_missing_binary(name: str, tmp_path: Path) -> None:
    if name == "storyreel+cluster":  # verify reads no drop-ins offline: the drop-in's lines appended
        path = tmp_path / "storyreel.service"
        path.write_text(UNIT.read_text() + "\n" + CLUSTER.read_text())
    else:
        path = SYSTEMD / f"{name}.service"
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert problems == []
