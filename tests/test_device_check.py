"""The GPU visit (bench/device_check.sh), tested here in its reduced CPU form before device time is spent.

The reduced run goes through the same script, children, daemon processes and table as the real visit;
only the model (tiny), the sizes and the OOM (simulated) differ. The isolation test makes one child hang
and another crash, and checks that both are reported and the rest still runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_for

BENCH = REPO / "bench"
ALL_PARTS = {"sdxl", "compile", "daemon", "oom", "overlap", "repeat"}


def table_lines(text: str) -> dict[str, list[str]]:
    """Table rows by their part column (the second cell)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[cells[1]] = cells
    return rows


@pytest.mark.slow
def test_reduced_visit_reports_every_part(tmp_path: Path) -> None:
    out, work, site = tmp_path / "out", tmp_path / "work", tmp_path / "site"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "DEVICE_CHECK_WHEELS": str(tmp_path / "no-wheels"),  # use this interpreter's packages
        "DEVICE_CHECK_SITE": str(site),
        "DEVICE_CHECK_SECONDS": "500",
    }
    env.pop("DEVICE_CHECK_FAULT", None)
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh"), "--mode", "reduced", "--work", str(work)],
        cwd=tmp_path,  # the script finds the repository by itself
        env=env,
        capture_output=True,
        text=True,
        timeout=580,  # under pytest-timeout's 600 s; the script keeps itself to DEVICE_CHECK_SECONDS
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    table = (out / "device_check.md").read_text("utf-8")
    assert table.strip() in proc.stdout  # the one table printed is the one written
    doc = json.loads((out / "device_check.json").read_text("utf-8"))
    parts = doc["parts"]
    assert set(parts) == ALL_PARTS
    statuses = {name: p["status"] for name, p in parts.items()}
    assert statuses == {**dict.fromkeys(ALL_PARTS, "ok"), "compile": "skipped"}, {
        n: p.get("message") for n, p in parts.items()
    }
    assert doc["full"] is False and "REDUCED" in table

    rows = table_lines(table)
    speed = parts["sdxl"]["rows"]
    assert [r["row"] for r in speed] == [
        "eager SDPA, fp32-upcast VAE",
        "+ channels_last",
        "+ channels_last, fp16 VAE (no upcast)",
    ]
    for r in speed:
        assert r["s/image"] > 0 and r["it/s"] > 0 and r["decode s"] > 0 and r["image_std"] > 2
        assert rows[r["row"]][2] == "ok"
    for title in ("storyreel defaults (compile)", "daemon: storyreel run --once, 4 scenes"):
        assert title in rows
    assert rows["storyreel defaults (compile)"][2] == "skipped"

    daemon = parts["daemon"]["figures"]
    assert daemon["device"] == "cpu" and daemon["dtype"] == "float32" and daemon["compile"] is False
    assert len(daemon["gen_s_each"]) == 4 and daemon["watchdog_pings"] > 0 and daemon["ready_after_s"] > 0
    assert str(site / "bin" / "storyreel") in parts["daemon"]["message"]  # the script's console script ran
    oom = parts["oom"]["figures"]
    assert oom["rung"] == 2 and "vae_tiling" in oom["savers"] and len(oom["oom_errors"]) == 2
    overlap = parts["overlap"]["figures"]
    assert overlap["generation_s"] > 0 and 0 < overlap["busy"] <= 1.05 and overlap["sampler"] == "none"
    repeat = parts["repeat"]["figures"]
    assert repeat["pngs"] == 4 and repeat["pngs_differing"] == []
    assert "===== daemon_run1.log" in (out / "device_check.log").read_text("utf-8")
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files


def test_a_hung_and_a_crashed_part_are_reported_and_the_rest_runs(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DEVICE_CHECK_FAULT": "sdxl:hang,oom:crash"}
    cmd = [sys.executable, str(BENCH / "device_check.py"), "--mode", "reduced", "--out", str(out)]
    cmd += ["--work", str(work), "--parts", "sdxl,oom,compile", "--caps", "sdxl=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = json.loads((out / "device_check.json").read_text("utf-8"))["parts"]
    assert parts["sdxl"]["status"] == "failed" and "timed out" in parts["sdxl"]["message"]
    assert "injected hang" in parts["sdxl"]["message"]
    assert parts["oom"]["status"] == "failed" and "exited 3 during: injected crash" in parts["oom"]["message"]
    assert parts["compile"]["status"] == "skipped"  # ran after both, in its own process
    rows = table_lines((out / "device_check.md").read_text("utf-8"))
    assert rows["SDXL rows"][2] == "failed" and rows["OOM ladder under a memory cap"][2] == "failed"


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml would be used instead")
def test_gpu_sampler_reads_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo 97; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.syspath_prepend(str(BENCH))
    from device_tools import UtilSampler

    t0 = time.time()
    sampler = UtilSampler()
    try:
        assert sampler.backend == "nvidia-smi"
        wait_for(lambda: len(sampler.samples) >= 3, what="three samples")
    finally:
        sampler.stop()
    assert {u for _, u in sampler.samples} == {97.0}
    assert all(t >= t0 for t, _ in sampler.samples)
    assert sampler.proc is not None and sampler.proc.poll() is not None  # stopped with it


def _hide_storyreel_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on the device: storyreel's code on PYTHONPATH, no dist-info for it anywhere."""
    from importlib import metadata

    real = metadata.Distribution.from_name.__func__  # type: ignore[attr-defined]

    def from_name(cls: type[metadata.Distribution], name: str) -> metadata.Distribution:
        if metadata.Prepared.normalize(name) == "storyreel":
            raise metadata.PackageNotFoundError(name)
        return real(cls, name)  # type: ignore[no-any-return]

    monkeypatch.setattr(metadata.Distribution, "from_name", classmethod(from_name))
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("storyreel")


def test_an_uninstalled_tree_writes_its_manifest_and_says_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from daemon.cli import main
    from pipeline.render import StoryJob, write_manifest
    from pipeline.settings import Settings
    from pipeline.story import Story

    _hide_storyreel_metadata(monkeypatch)
    source = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]["version"] + "+source"
    story = Story.model_validate({"scenes": ["a harbour at dawn"]})
    job = StoryJob("harbour", story, b"", tmp_path)
    job.out.mkdir(parents=True)
    manifest = write_manifest(job, {}, {}, Settings(), {"device": "cpu"})
    assert manifest["storyreel_version"] == source
    assert json.loads((job.out / "manifest.json").read_text("utf-8"))["storyreel_version"] == source
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"storyreel {source}\n"
