"""What the parts of the GPU visit share: modes, the report file, the model folder, the daemon as a process.

`Report` is rewritten atomically after every change, so a part killed at its time limit still leaves
what it had measured. `run_daemon` runs `storyreel run --once` over fresh folders with a stand-in for
systemd's notify socket; `UtilSampler` samples GPU utilisation while it runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

WATCHDOG_USEC = 2_000_000  # strict on purpose: pings every 0.5 s show where the daemon stops pinging


@dataclass
class Mode:
    full: bool
    width: int
    height: int
    steps: int
    repeats: int
    video: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.full:
            return f"full: {self.width}×{self.height}, {self.steps} steps, fp16, median of {self.repeats}"
        size = f"{self.width}×{self.height}, {self.steps} steps"
        return f"REDUCED (no CUDA): tiny model, {size} — checks the visit runs, measures nothing"


FULL = Mode(True, 1024, 768, 30, 3)
REDUCED = Mode(
    False,
    64,
    48,
    2,
    1,
    {
        "fps": 8,
        "seconds_per_scene": 1.0,
        "fade_seconds": 0.25,
        "crossfade_seconds": 0.25,
        "preset": "ultrafast",
    },
)


class Report:
    """One child's findings as JSON, rewritten atomically after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"env": {}, "phase": "starting", "phase_since": time.time(), "parts": {}}
        self.save()

    def phase(self, text: str) -> None:
        self.data["phase"], self.data["phase_since"] = text, time.time()
        print(f"-- {text}", flush=True)
        self.save()

    def env(self, **values: Any) -> None:
        self.data["env"].update(values)
        self.save()

    def _entry(self, part: str) -> dict[str, Any]:
        entry: dict[str, Any] = self.data["parts"].setdefault(part, {"status": "running", "rows": []})
        return entry

    def row(self, part: str, row: dict[str, Any]) -> None:
        """Add a measured row, or replace the one of the same name (a row that grows image by image)."""
        rows = self._entry(part)["rows"]
        same = [i for i, r in enumerate(rows) if r.get("row") == row.get("row")]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
        self.save()

    def part(self, part: str, status: str, message: str, **figures: Any) -> None:
        entry = self._entry(part)
        entry.update(status=status, message=message, figures={**entry.get("figures", {}), **figures})
        print(f"-- {part}: {status}: {message}", flush=True)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str), "utf-8")
        os.replace(tmp, self.path)


@dataclass
class Ctx:
    mode: Mode
    work: Path
    report: Report
    deadline: float  # time.time() by which the part must be done
    daemon_compile: str = "off"
    skip: frozenset[str] = frozenset()  # entries not to run (--skip), e.g. {"compile", "recompile"}

    def left(self) -> float:
        return self.deadline - time.time()

    def wants(self, entry: str) -> bool:
        """False for an entry named in --skip; it is then reported as skipped, saying why."""
        if entry in self.skip:
            self.report.part(entry, "skipped", "--skip " + entry)
            return False
        return True


# -- shared helpers ---------------------------------------------------------------------------------
def torch_env(report: Report) -> Any:
    """Import torch, record versions and the device; returns a DeviceOps."""
    import diffusers
    import torch
    import transformers

    from pipeline.images.device import DeviceOps

    device = DeviceOps("auto")
    report.env(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        device=device.name,
        dtype=str(device.dtype).removeprefix("torch."),
        total_memory_gib=(device.total_memory_bytes() or 0) / 2**30 or None,
    )
    return device


def build_pipe(mode: Mode, device: Any) -> Any:
    """SDXL base 1.0's architecture with random weights on the device (full), else the tiny model."""
    if mode.full:
        sys.path.insert(0, str(Path(__file__).parent))
        from sdxl import random_sdxl

        return random_sdxl(device.device, device.dtype)
    from pipeline.images.tiny import tiny_pipeline

    return tiny_pipeline()


def image_check(path: Path, width: int, height: int) -> str | None:
    """None if the PNG is the right size, finite and not uniform; else what is wrong."""
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    if size != (width, height):
        return f"{path.name}: {size[0]}×{size[1]}, expected {width}×{height}"
    if not np.isfinite(a).all():
        return f"{path.name}: non-finite pixels"
    levels = len(np.unique(a[..., 1]))
    if a.std() < 2.0 or levels < 16:
        return f"{path.name}: nearly uniform (std {a.std():.2f}, {levels} levels): NaN or black frame?"
    return None


def model_folder(ctx: Ctx) -> Path:
    return ctx.work / ("model-sdxl-random" if ctx.mode.full else "model-tiny")


def save_model(folder: Path, mode: Mode, report: Report, pipe: Any = None, device: Any = None) -> str:
    """The model folder the daemon loads with from_pretrained, exactly as it loads real weights.

    Full: SDXL base 1.0's architecture, random weights in fp16 (about 7 GB); reduced: the tiny
    model. Both are saved as the hub's fp16 variant files (`*.fp16.safetensors`), so the loader's
    variant choice is exercised too. Part 1 saves the pipeline it measured; a later part builds one
    only when that did not happen. Reused when a complete folder is already there.
    """
    if (folder / "model_index.json").is_file():
        return "reused"
    report.phase("saving the model with save_pretrained")
    if pipe is None:
        device = torch_env(report)
        pipe = build_pipe(mode, device)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    pipe.save_pretrained(tmp, safe_serialization=True, variant="fp16")
    os.rename(tmp, folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return f"saved {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s"


def free_device_memory() -> None:
    """Give back what building a model took (only if this process imported torch at all)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def storyreel_cmd() -> tuple[list[str], str]:
    exe = shutil.which("storyreel")
    if exe:
        return [exe], exe
    return [sys.executable, "-m", "daemon.cli"], "python -m daemon.cli (no storyreel on PATH)"


class NotifyListener:
    """A stand-in for systemd's notify socket: what the daemon says, and when."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            self.messages += [(now, line) for line in data.decode(errors="replace").splitlines()]

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)
        self.sock.close()

    def summary(self, started: float) -> dict[str, Any]:
        ready = next((t for t, m in self.messages if m == "READY=1"), None)
        pings = [t for t, m in self.messages if m == "WATCHDOG=1" and ready is not None and t >= ready]
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        return {
            "ready_after_s": None if ready is None else round(ready - started, 2),
            "watchdog_pings": len(pings),
            "watchdog_max_gap_s": None if worst is None else round(gaps[worst], 2),
            "watchdog_max_gap_at_s": None
            if worst is None or ready is None
            else round(pings[worst] - ready, 1),
        }


class UtilSampler:
    """GPU utilisation every 0.1 s through pynvml (nvidia-ml-py) if it imports, else nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent)
        self.backend = "none"
        self.done = threading.Event()
        self.proc: subprocess.Popen[str] | None = None
        read = self._nvml() or self._smi()
        self.thread = threading.Thread(target=read, daemon=True) if read else None
        if self.thread:
            self.thread.start()

    def _nvml(self) -> Any:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            return None
        self.backend = "pynvml"

        def read() -> None:
            while not self.done.wait(0.1):
                with contextlib.suppress(Exception):
                    self.samples.append(
                        (time.time(), float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))
                    )

        return read

    def _smi(self) -> Any:
        if not shutil.which("nvidia-smi"):
            return None
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"]
        self.proc = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.backend = "nvidia-smi"

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError):
                    self.samples.append((time.time(), float(line.split(",")[0])))

        return read

    def stop(self) -> None:
        self.done.set()
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
        if self.thread is not None:
            self.thread.join(2)


@dataclass
class DaemonRun:
    root: Path
    code: int | None
    seconds: float
    log: Path
    notify: dict[str, Any]
    how: str

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    def events(self, event: str, story: str | None = None) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text("utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("event") == event and story in (None, rec.get("story")):
                    found.append(rec)
        return found

    def manifest(self, story: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.outbox / story / "manifest.json").read_text("utf-8"))
        return data

    def _last_line(self, story: str) -> dict[str, Any]:
        try:
            lines = (self.outbox / f"{story}.status.jsonl").read_text("utf-8").splitlines()
            last: dict[str, Any] = json.loads(lines[-1])
            return last
        except (OSError, ValueError, IndexError):
            return {}

    def last_state(self, story: str) -> str | None:
        state = self._last_line(story).get("state")
        return None if state is None else str(state)

    def error(self, story: str) -> str | None:
        """The sidecar's own words when a story failed (the daemon's one line for it)."""
        error = self._last_line(story).get("error")
        return None if error is None else str(error)[:300]


def run_daemon(
    ctx: Ctx, root: Path, model: Path, stories: dict[str, dict[str, Any]], log_name: str
) -> DaemonRun:
    """`storyreel run --once` as a real process over fresh folders, with a notify socket to listen on."""
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("inbox", "outbox", "state"):
        (root / sub).mkdir(parents=True)
    image = {"width": ctx.mode.width, "height": ctx.mode.height, "steps": ctx.mode.steps}
    sections: dict[str, dict[str, Any]] = {
        "paths": {"inbox": root / "inbox", "outbox": root / "outbox", "state": root / "state"},
        "model": {"source": str(model), "device": "auto", "warmup": True},
        "image": {**image, "compile": ctx.daemon_compile},
        "finish": {"grain": 0.0},  # a NaN/black frame must stay uniform to be caught
        "video": ctx.mode.video,
        "watch": {"poll_seconds": 0.2, "settle_seconds": 0.2, "rescan_seconds": 1.0},
    }
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in values.items()]
    config = root / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    for i, (name, story) in enumerate(stories.items()):  # arrival order = the order given
        path = root / "inbox" / f"{name}.json"
        path.write_text(json.dumps(story))
        os.utime(path, (time.time() - 60 + i, time.time() - 60 + i))
    cmd, how = storyreel_cmd()
    log = ctx.work / log_name
    listener = NotifyListener(root / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*cmd, "run", "--once", "--config", str(config)],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            code: int | None = proc.wait(max(5.0, ctx.left() - 5))
        except subprocess.TimeoutExpired:
            proc.terminate()  # a warm stop first: the scene in progress finishes
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = None
    listener.close()
    return DaemonRun(root, code, time.monotonic() - t0, log, listener.summary(t0), how)


def capped_text(path: Path, limit: int) -> str:
    """A log as text, at most about `limit` bytes: its start and its end, the cut said in between.

    What comes back from the device is at most 16 MiB a file: a chatty log must not lose the table's
    neighbours, nor its own last lines, which say how it ended."""
    data = path.read_bytes()
    if len(data) <= limit:
        return data.decode("utf-8", errors="replace")
    head, tail = data[: limit // 8], data[-(limit - limit // 8) :]
    cut = f"\n[... {len(data) - len(head) - len(tail)} bytes cut ...]\n"
    return head.decode("utf-8", errors="replace") + cut + tail.decode("utf-8", errors="replace")


def last_log_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        for line in reversed(path.read_text("utf-8", errors="replace").splitlines()):
            if line.strip():
                return line.strip()[:300]
    return ""
