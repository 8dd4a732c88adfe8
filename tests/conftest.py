"""Shared helpers: small configs over temp folders and the daemon as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

# Fixtures of real SMB/SFTP servers on loopback (tests/shares.py).
pytest_plugins = ["shares"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Small enough for 2 CPU cores, big enough for a real VAE (latents are 1/8) and H.264 (even sizes).
SMALL = {
    "image": {"width": 64, "height": 48, "steps": 2},
    "video": {
        "fps": 8,
        "seconds_per_scene": 1.0,
        "fade_seconds": 0.25,
        "crossfade_seconds": 0.25,
        "preset": "ultrafast",
    },
    "watch": {"poll_seconds": 0.2, "settle_seconds": 0.3, "rescan_seconds": 1.0},
    "daemon": {"retry_min_seconds": 0.2, "retry_max_seconds": 1.0},
}


def storyreel(
    *args: str, cwd: Path = REPO, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll a condition against a deadline (files on disk have no event to wait on)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    return repr(v)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, built once per test session and loaded from disk by every daemon."""
    from pipeline.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_pipeline(path)
    return path


class Setup:
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

    def run_once(
        self, timeout: float = 300, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "daemon.cli", "run", "--once", "--config", str(self.config)],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, env: dict[str, str] | None = None, launcher: list[str] | None = None) -> Daemon:
        return Daemon(self, env or {}, launcher)


_RUNNING: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    while _RUNNING:
        proc = _RUNNING.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


class Daemon:
    """`storyreel run` as a real process, its output kept in a file for post-mortems."""

    def __init__(self, setup: Setup, env: dict[str, str], launcher: list[str] | None) -> None:
        self.log_path = setup.root / f"daemon-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in wait()
        cmd = launcher or [sys.executable, "-m", "daemon.cli"]
        self.proc = subprocess.Popen(
            [*cmd, "run", "--config", str(setup.config)],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        _RUNNING.append(self.proc)

    def output(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait(120)


@pytest.fixture
def setup(tmp_path: Path, tiny_dir: Path) -> Iterator[Setup]:
    yield Setup(tmp_path, tiny_dir)


def count_frames(path: Path) -> int:
    import imageio_ffmpeg

    return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])


def read_frames(path: Path) -> tuple[tuple[int, int], list[np.ndarray]]:
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return (w, h), [np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]


def check_published(s: Setup, name: str, scenes: int) -> dict[str, Any]:
    """Everything the contract promises for one finished story, decoded and checked."""
    out = s.outbox / name
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert len(manifest["scenes"]) == scenes
    assert json.loads((out / "story.json").read_text("utf-8"))
    fps = s.sections["video"]["fps"]
    for i in range(1, scenes + 1):
        with Image.open(out / "images" / f"scene_{i:03d}.png") as img:
            assert img.size == (s.width, s.height)
            img.load()
        clip = out / "clips" / f"scene_{i:03d}.mp4"
        seconds = manifest["scenes"][i - 1]["seconds"]
        assert count_frames(clip) == round(seconds * fps)
    check_film_and_sheet(s, name, manifest)
    with zipfile.ZipFile(s.outbox / f"{name}.zip") as zf:
        assert zf.testzip() is None
        names = set(zf.namelist())
    on_disk = {f"{name}/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file()}
    assert names == on_disk
    last = s.status(name)[-1]
    assert last["state"] == "done" and last["scene"] == scenes and last["scenes"] == scenes
    return manifest


def check_film_and_sheet(s: Setup, name: str, manifest: dict[str, Any]) -> None:
    """film.mp4: every clip in order, n-1 crossfades; contact_sheet.jpg: a real JPEG."""
    from media import probe_clip

    out = s.outbox / name
    film = probe_clip(out / "film.mp4")
    fps = s.sections["video"]["fps"]
    clip_frames = [round(sc["seconds"] * fps) for sc in manifest["scenes"]]
    xfade = manifest["film_info"]["crossfade_frames"]
    if len(clip_frames) > 1 and not manifest["film_info"]["crossfade_clamped"]:
        assert xfade == round(s.sections["video"]["crossfade_seconds"] * fps)
    assert film.frames == sum(clip_frames) - (len(clip_frames) - 1) * xfade
    assert (film.codec, film.pix_fmt, film.width, film.height) == ("h264", "yuv420p", s.width, s.height)
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width >= 2 * 64
        sheet.load()


def outbox_entries(s: Setup) -> set[str]:
    return {p.name for p in s.outbox.iterdir()}
