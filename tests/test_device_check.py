"""The GPU visit (bench/device_check.sh), tested here in its reduced CPU form before device time is spent.

The reduced run goes through the same script, children, daemon processes and table as the real visit;
only the model (tiny), the sizes and the OOM (simulated) differ, and it leaves out the compile rows
(minutes of CPU; `make device-rehearsal` runs them, under the device's Python and versions). The
isolation test makes one child hang and another crash, and checks that both are reported and the rest
still runs; others break the install, hide the GPU from torch, hide storyreel's metadata, and check
the verdict by card, the fallback wheels' choice, a new part in the list and the log cap.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, wait_for

BENCH = REPO / "bench"
ALL_PARTS = {"preflight", "compile", "recompile", "sdxl", "daemon", "oom", "overlap", "repeat", "refs"}
CHEAP = "compile,recompile,tiny-compile"  # minutes of CPU compiling: `make device-rehearsal` runs them


def table_lines(text: str) -> dict[str, list[str]]:
    """Table rows by their part column (the second cell)."""
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].isdigit():
            rows[cells[1]] = cells
    return rows


def visit_env(tmp_path: Path, wheels: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path / "out"),
        "DEVICE_CHECK_WHEELS": str(wheels),
        "DEVICE_CHECK_SITE": str(tmp_path / "site"),
        "DEVICE_CHECK_SECONDS": "500",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    env.pop("DEVICE_CHECK_FAULT", None)
    return env


@pytest.mark.slow
def test_reduced_visit_reports_every_part(tmp_path: Path) -> None:
    out, work, site = tmp_path / "out", tmp_path / "work", tmp_path / "site"
    env = visit_env(tmp_path, tmp_path / "no-wheels")  # use this interpreter's packages
    proc = subprocess.run(
        ["bash", str(BENCH / "device_check.sh"), "--mode", "reduced", "--work", str(work), "--skip", CHEAP],
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
    expected = {**dict.fromkeys(ALL_PARTS, "ok"), "compile": "skipped", "recompile": "skipped"}
    wrong = [
        f"{n}: {p['status']}: {p.get('message')}" for n, p in parts.items() if p["status"] != expected[n]
    ]
    assert not wrong, "\n".join(wrong)  # each part's own words, whole
    assert doc["full"] is False and "REDUCED" in table

    rows = table_lines(table)
    assert rows["toolchain and packages"][2] == "ok"
    assert doc["env"]["python"] == sys.version.split()[0] and doc["env"]["packages"]["diffusers"]
    assert doc["env"]["allocator"] == "expandable_segments:True"  # as `storyreel run` sets it
    speed = parts["sdxl"]["rows"]
    assert [r["row"] for r in speed] == [
        "eager SDPA, fp32-upcast VAE",
        "+ channels_last",
        "+ channels_last, fp16 VAE (no upcast)",
    ]
    for r in speed:
        assert r["s/image"] > 0 and r["it/s"] > 0 and r["decode s"] > 0 and r["image_std"] > 2
        assert rows[r["row"]][2] == "ok"
        # timed as the daemon pays: wall time around generate(), its gc + empty_cache inside
        assert r["s/image"] == statistics.median(r["each_s"]) and r["cleanup_s"] >= 0
    assert "speed only" in rows["+ channels_last, fp16 VAE (no upcast)"][-1]
    assert rows["storyreel defaults (compile)"][2] == "skipped"

    daemon = parts["daemon"]["figures"]
    assert daemon["device"] == "cpu" and daemon["dtype"] == "float32" and daemon["compile"] is False
    assert len(daemon["gen_s_each"]) == 4 and daemon["watchdog_pings"] > 0 and daemon["ready_after_s"] > 0
    assert str(site / "bin" / "storyreel") in parts["daemon"]["message"]  # the script's console script ran
    assert "compile = off" in parts["daemon"]["message"] and "compile = off" in parts["repeat"]["message"]
    oom = parts["oom"]["figures"]
    assert oom["rung"] == 2 and "vae_tiling" in oom["savers"] and len(oom["oom_errors"]) == 2
    overlap = parts["overlap"]["figures"]
    assert overlap["generation_s"] > 0 and 0 < overlap["busy"] <= 1.05 and overlap["sampler"] == "none"
    repeat = parts["repeat"]["figures"]
    assert repeat["pngs"] == 5 and repeat["pngs_differing"] == []  # 4 scenes and Mara's portrait
    refs = parts["refs"]  # consistent characters: 0, 1, 2 references (tiny model: measures nothing)
    assert [r["row"] for r in refs["rows"]] == ["plain scene (0 references)", "1 reference", "2 references"]
    assert refs["rows"][0]["ratio"] == 1.0 and all(r["s/image"] > 0 for r in refs["rows"])
    assert refs["message"].startswith("reduced run, not judged: 1 reference ")
    assert rows["2 references"][2] == "ok" and "x the plain scene's denoising" in rows["2 references"][-1]
    log = (out / "device_check.log").read_text("utf-8")
    assert "===== daemon_run1.log" in log and "===== device_setup.log" in log
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files


def test_a_hung_and_a_crashed_part_are_reported_and_the_rest_runs(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DEVICE_CHECK_FAULT": "sdxl:hang,daemon:crash"}
    cmd = [sys.executable, str(BENCH / "device_check.py"), "--mode", "reduced", "--out", str(out)]
    cmd += ["--work", str(work), "--parts", "sdxl,daemon,oom", "--caps", "sdxl=2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parts = json.loads((out / "device_check.json").read_text("utf-8"))["parts"]
    for entry in ("compile", "recompile", "sdxl"):
        assert parts[entry]["status"] == "failed" and "timed out" in parts[entry]["message"]
        assert "injected hang" in parts[entry]["message"]
    for entry in ("daemon", "overlap"):
        assert parts[entry]["status"] == "failed"
        assert "exited 3 during: injected crash" in parts[entry]["message"]
    assert parts["oom"]["status"] == "ok"  # ran after both, in its own process
    rows = table_lines((out / "device_check.md").read_text("utf-8"))
    assert rows["SDXL eager rows"][2] == "failed"
    assert rows["daemon: storyreel run --once, 4 scenes"][2] == "failed"


def test_a_packaging_hiccup_still_ends_in_a_table(tmp_path: Path) -> None:
    """A wheel that does not install, no ffmpeg: named in the results, and the visit goes on."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    out = tmp_path / "out"
    cmd = ["bash", str(BENCH / "device_check.sh"), "--mode", "reduced", "--parts", "preflight"]
    cmd += ["--work", str(tmp_path / "work"), "--skip", CHEAP]
    proc = subprocess.run(cmd, env=visit_env(tmp_path, wheels), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    setup = (out / "device_setup.log").read_text("utf-8")
    assert "PROBLEM: broken-1.0-py3-none-any.whl did not install" in setup
    assert "PROBLEM: no ffmpeg" in setup
    doc = json.loads((out / "device_check.json").read_text("utf-8"))
    assert doc["parts"]["preflight"]["status"] == "ok"  # this interpreter has it all
    assert "===== device_setup.log" in (out / "device_check.log").read_text("utf-8")


def test_a_gpu_torch_cannot_see_is_refused_not_run_on_the_cpu(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 580.159.04, 81559 MiB'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("DEVICE_CHECK_FAULT", None)
    out = tmp_path / "out"
    cmd = [sys.executable, str(BENCH / "device_check.py"), "--out", str(out), "--work", str(tmp_path / "w")]
    cmd += ["--parts", "preflight,oom", "--skip", CHEAP]  # --mode auto, as on the device
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    doc = json.loads((out / "device_check.json").read_text("utf-8"))
    assert "sees no CUDA device" in doc["refused"] and "NVIDIA H100" in doc["refused"]
    assert doc["parts"]["preflight"]["status"] == "failed"
    assert doc["parts"]["oom"]["status"] == "skipped" and "refused" in doc["parts"]["oom"]["message"]
    assert "REFUSED: nvidia-smi sees NVIDIA H100" in (out / "device_check.md").read_text("utf-8")


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
    from pipeline.render import StoryJob
    from pipeline.render.manifest import write_manifest
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


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


@pytest.mark.usefixtures("bench")
def test_the_target_is_judged_on_an_h100_only() -> None:
    from device_sdxl import judge

    assert judge(1.2, "cuda:0 (NVIDIA H100 80GB HBM3)", True) == ("ok", judge(1.2, "H100", True)[1])
    assert judge(1.4, "cuda:0 (NVIDIA H100 80GB HBM3)", True)[0] == "missed"
    status, text = judge(0.9, "cuda:0 (NVIDIA H200)", True)
    assert status == "not judged" and "NVIDIA H200" in text and "H100" in text
    assert judge(9.0, "cpu", False)[0] == "ok"  # reduced: the path ran, nothing is judged


@pytest.mark.usefixtures("bench")
def test_a_fallback_wheel_is_installed_only_where_the_device_needs_it() -> None:
    from device_wheels import fallback_needed

    assert fallback_needed("typing-extensions", [">=4.16.0", ">=4.15.0"], None) == "not on the device"
    assert fallback_needed("typing-extensions", [">=4.16.0"], "4.17.1") is None  # the device's newer copy
    why = fallback_needed("typing-extensions", [">=4.16.0", ">=4.0"], "4.15.0")
    assert why == "the device has 4.15.0, the carried wheels need >=4.16.0"


@pytest.mark.usefixtures("bench")
def test_a_new_part_needs_one_line_in_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a later part (reference images, fp16 runs) adds: its function and one Part; the table follows."""
    import device_check
    import device_parts as dp

    later = dp.Part("later", lambda ctx: None, (dp.Entry("later", "99", "a later part"),), 60, 120)
    monkeypatch.setattr(dp, "PARTS", (*dp.PARTS, later))
    row = {"row": "2 reference images", "s/image": 1.5, "peak VRAM GiB": 14.2, "note": "random weights"}
    parts = {"later": {"status": "ok", "message": "0, 1, 2 references", "rows": [row], "figures": {}}}
    (line,) = device_check.table_rows(parts)
    assert line == [
        "99",
        "2 reference images",
        "ok",
        "1.50",
        "-",
        "-",
        "14.20",
        "-",
        "0, 1, 2 references; random weights",
    ]
    assert len({e.key for p in dp.PARTS for e in p.entries}) == sum(len(p.entries) for p in dp.PARTS)


@pytest.mark.usefixtures("bench")
def test_a_long_log_keeps_its_start_and_end_under_the_cap(tmp_path: Path) -> None:
    from device_tools import capped_text

    log = tmp_path / "big.log"
    log.write_text("first line\n" + "x" * 100_000 + "\nlast line\n")
    text = capped_text(log, 8_000)
    assert text.startswith("first line") and text.endswith("last line\n") and "bytes cut" in text
    assert len(text.encode()) < 8_100
    assert capped_text(log, 1 << 20) == log.read_text()


@pytest.mark.usefixtures("bench")
def test_a_compile_killed_after_its_warm_up_keeps_what_it_measured(tmp_path: Path) -> None:
    """The child writes the compile row when the warm-up ends and after each image; a kill keeps it."""
    import argparse

    import device_check
    import device_parts as dp
    from device_tools import Report

    report = Report(tmp_path / "sdxl.json")
    report.part("compile", "running", "compiling the UNet during warm-up")
    report.row("compile", {"row": "storyreel defaults", "warm-up s": 212.0, "images": 0, "note": "no image"})
    report.row("compile", {"row": "storyreel defaults", "warm-up s": 212.0, "s/image": 1.21, "images": 1})
    report.phase("compile row: image 2 of 3")
    args = argparse.Namespace(work=tmp_path)
    data = device_check.collect(dp.BY_NAME["sdxl"], args, None, 290.0)  # None: killed at its cap
    entry = data["parts"]["compile"]
    assert entry["status"] == "failed" and len(entry["rows"]) == 1  # the row replaced, not doubled
    assert (
        "timed out after 290 s" in entry["message"] and "into: compile row: image 2 of 3" in entry["message"]
    )
    assert "1 row(s) kept" in entry["message"]
    line = device_check.table_rows({"compile": entry})[0]
    assert line[:4] == ["1", "storyreel defaults", "failed", "1.21"] and line[7] == "212.00"
