"""The systemd unit: the settings the daemon's design relies on, and the sandbox score.

The unit is parsed as text (keys may repeat, so configparser does not fit). Where
systemd-analyze is installed, the offline security analysis must keep the exposure
at 2.0 or less, and `verify` must find nothing but the absent ExecStart binary.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "storyreel.service"
MAX_EXPOSURE = 2.0

pytestmark = pytest.mark.timeout(60)


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_security_exposure() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
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


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_finds_only_the_missing_binary() -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(UNIT)],
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
