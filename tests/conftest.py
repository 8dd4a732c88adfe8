"""Shared test helpers: the one tiny model, the one story builder, the one way to run storyreel.

storyreel runs as a real process (a command, or a daemon over temp folders), either as shipped
or through tests/faulty.py with faults armed. Waiting is on events: a file appears, a line is
logged, a process exits. Timeouts here only bound a hung test; none decides an outcome, so a
heavily loaded machine makes a test slower, never red. A daemon that dies while a test waits
on it fails the wait at once, with its log.
"""

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

import forked

# Fixtures of real SMB/SFTP servers on loopback (tests/shares.py).
pytest_plugins = ["shares"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FAULTY = REPO / "tests" / "faulty.py"

# How long one wait may take before the test is called hung. Generous on purpose: it must
# never be what fails a test on a slow machine (pytest-timeout, 600 s, is the last guard).
HANG_SECONDS = 300.0

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


# Where the last run's test durations are kept (pytest's cache, .pytest_cache/): see `_longest_first`.
DURATIONS = "storyreel/durations"


def pytest_configure(config: pytest.Config) -> None:
    """`make test` runs four test processes on two cores, each running torch (in the test, in its
    daemons): one OpenMP thread each, or idle threads spin on the cores the others need (quiet,
    2 cores: 336 s with torch's default of a thread per core, 278 s with one). Set before any
    test process or daemon loads torch; nothing tested depends on the thread count, and the
    Ray actors follow the daemon's (pipeline/images/ray_start.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not hasattr(config, "workerinput"):  # the run's one controller (or a run without xdist)
        config.pluginmanager.register(Durations(config), "storyreel-durations")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker, and before xdist renames items
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`slow` means "runs the real tiny model or a full daemon", and every such test needs
    `tiny_dir` (a daemon is configured with it): the fixture is the one place that says so.
    The few tests that build a tiny model of their own carry the mark themselves."""
    for item in items:
        if "tiny_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    last = getattr(config, "workerinput", {}).get(DURATIONS)  # an xdist worker's; see Durations
    if last is not None:  # a run without xdist keeps the files' order
        _longest_first(items, last)


def _longest_first(items: list[pytest.Item], last: dict[str, float]) -> None:
    """Order the tests longest first, by the last run's durations, so that the short ones fill
    the gaps at the end (longest-processing-time scheduling: `make test` passes `--dist
    loadgroup --no-loadscope-reorder`, which hands tests out in this order as workers free up).
    Unknown tests (a fresh clone has no cache) count as long when they run a daemon (`slow`).
    A module marked `xdist_group` (its tests share a module-scoped fixture) stays whole, weighed
    as a whole. Every worker must collect the same order, so all sort the controller's copy."""

    def group(item: pytest.Item) -> str:
        mark = item.get_closest_marker("xdist_group")
        return f"@{mark.args[0]}" if mark else item.nodeid

    weight: dict[str, float] = {}
    for item in items:
        guess = 30.0 if item.get_closest_marker("slow") else 1.0
        weight[group(item)] = weight.get(group(item), 0.0) + last.get(item.nodeid, guess)
    items.sort(key=lambda item: -weight[group(item)])  # stable: a group keeps its files' order


class Durations:
    """In the controller: hands every xdist worker the same copy of the last run's durations, read
    once (a cache another run rewrites meanwhile must not make two workers sort differently),
    and records this run's (setup, call and teardown, from every worker's reports) at the end."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.seen: dict[str, float] = {}
        self.last: dict[str, float] | None = None

    def _cache(self) -> Any:
        return getattr(self.config, "cache", None)  # None under `-p no:cacheprovider`

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without xdist
    def pytest_configure_node(self, node: Any) -> None:
        if self.last is None:
            cache = self._cache()
            self.last = cache.get(DURATIONS, {}) if cache is not None else {}
        node.workerinput[DURATIONS] = self.last

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        nodeid = report.nodeid  # loadgroup names a grouped test "ID@GROUP" (xdist 3.8, loadgroup.py)
        if nodeid.rfind("@") > nodeid.rfind("]"):
            nodeid = nodeid.rsplit("@", 1)[0]
        self.seen[nodeid] = self.seen.get(nodeid, 0.0) + report.duration

    def pytest_sessionfinish(self) -> None:
        cache = self._cache()
        if cache is not None and self.seen:
            cache.set(DURATIONS, {**cache.get(DURATIONS, {}), **self.seen})


def story(n: int, tag: str = "", seed: int = 3) -> dict[str, object]:
    """A valid story of `n` scenes; `tag` names it and starts every scene description."""
    return {"title": tag, "seed": seed, "scenes": [f"{tag} scene {i} of a quiet harbour" for i in range(n)]}


def command(faults: dict[str, Any] | None = None) -> list[str]:
    """The storyreel command line: as shipped, or through tests/faulty.py with `faults` armed."""
    if faults:
        return [sys.executable, str(FAULTY), json.dumps(faults)]
    return [sys.executable, "-m", "daemon.cli"]


def storyreel(
    *args: str,
    cwd: Path = REPO,
    env: dict[str, str] | None = None,
    faults: dict[str, Any] | None = None,
    timeout: float = HANG_SECONDS,
    cold: bool = False,
) -> subprocess.CompletedProcess[str]:
    """One storyreel command to its end, output captured. `storyreel run` is forked from the warm
    server (tests/forked.py) unless `cold`; the other commands import little and start cold."""
    if args[0] == "run" and not cold:
        return forked.run(
            list(args), cwd=cwd, env={**os.environ, **(env or {})}, faults=faults, timeout=timeout
        )
    return subprocess.run(
        [*command(faults), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_for(
    predicate: Callable[[], Any],
    what: str = "condition",
    *,
    timeout: float = HANG_SECONDS,
    daemon: Daemon | None = None,
) -> Any:
    """Poll a condition (files on disk have no event to wait on) until it holds.

    With `daemon`, its exit is the other event: waiting on a dead daemon fails at once.
    Polling backs off (20 ms up to 250 ms), so a long wait leaves the CPU to the daemon.
    """
    deadline, pause = time.monotonic() + timeout, 0.02
    while True:
        value = predicate()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            value = predicate()  # it may have exited right after making the condition true
            if value:
                return value
            code, log = daemon.proc.returncode, daemon.output()[-3000:]
            raise AssertionError(f"daemon exited ({code}) while waiting for {what}:\n{log}")
        if time.monotonic() > deadline:
            raise AssertionError(f"hung: no {what} after {timeout}s")
        time.sleep(pause)
        pause = min(0.25, pause * 1.5)


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
    """The tiny model, built once per test session: every test and every daemon loads this one."""
    from pipeline.tiny import build_tiny_pipeline

    path = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_pipeline(path)
    return path


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
    ) -> Daemon:
        """`own_network`: in a network namespace with only a loopback, as PrivateNetwork=yes gives
        the unit (root only; forked, not cold)."""
        return Daemon(self, env or {}, faults, cold=cold, own_network=own_network)


_RUNNING: list[subprocess.Popen[bytes] | forked.ForkedProcess] = []


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

    def __init__(
        self,
        setup: Setup,
        env: dict[str, str],
        faults: dict[str, Any] | None,
        cold: bool = False,
        own_network: bool = False,
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
            )
        else:
            self.proc = forked.ForkedProcess(
                args,
                cwd=REPO,
                env={**os.environ, **env},
                stdout=self.log_path,
                faults=faults,
                own_network=own_network,
            )
        _RUNNING.append(self.proc)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, predicate: Callable[[], Any], what: str = "condition") -> Any:
        """Wait until `predicate` holds; fails at once if this daemon exits first."""
        return wait_for(predicate, what, daemon=self)

    def logged(self, text: str) -> None:
        """Wait until the daemon's output contains `text`."""
        self.wait_for(lambda: text in self.output(), f"{text!r} in the daemon's output")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = HANG_SECONDS) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()


@pytest.fixture
def setup(tmp_path: Path, tiny_dir: Path) -> Iterator[Setup]:
    yield Setup(tmp_path, tiny_dir)


def count_frames(path: Path) -> int:
    """Frames in a clip. A clip that is missing or unreadable raises OSError, which a waiting test
    retries on (through a caching share client, files land on the server one by one, and a
    large one may be seen half uploaded), not ffmpeg's CalledProcessError."""
    import imageio_ffmpeg

    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    except subprocess.CalledProcessError as e:
        raise OSError(f"ffmpeg could not read {path}") from e


def read_frames(path: Path) -> tuple[tuple[int, int], list[np.ndarray]]:
    import imageio_ffmpeg

    if not path.is_file():  # as count_frames
        raise FileNotFoundError(path)
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
    lines = s.status(name)
    assert lines, f"{name}: no status line (yet: a share client may be uploading the sidecar anew)"
    last = lines[-1]
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


# What the daemon keeps in the outbox besides stories: the status page and its files.
PAGE_ENTRIES = {"index.html", ".storyreel"}


def outbox_entries(s: Setup) -> set[str]:
    return {p.name for p in s.outbox.iterdir()}
