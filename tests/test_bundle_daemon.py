"""Story bundles (inbox/NAME.zip) through one real daemon run, checked as people see them.

One daemon (one start, shared by every test here: a module-scoped fixture), over a state folder
that is a small tmpfs where the test may mount one (root). Dropped before it starts, in this
order: a good bundle whose scenes bring their own pictures (and a character's, a narration and
music), every hostile kind of tests/bundles.py (plus a plain story naming a file, and a bomb
the story names as its picture, which would be written to the state disk), a good plain story,
and a second good bundle. Then, while the daemon is held in the middle of the first bundle's
generated scene (tests/faulty.py hold_scene):

- the second bundle is cancelled by `inbox/again.cancel`;
- a third bundle starts being uploaded in place, slowly, the writer holding it open;
- `inbox/PAUSE` is dropped and the hold released: the first bundle pauses after the scene,
  and its extracted folder is damaged as a kill -9 half-way through extracting would leave it;

then PAUSE goes, everything runs to its end, the upload finishes, `inbox/again.retry` brings
the cancelled bundle back (from the spool: the inbox has nothing of it any more) and, on the
tmpfs, a bundle meets a state disk filled by something else (it waits, then is made).

Every scene that brings its own picture says "zanzibar", and the daemon runs with the fault
`crash_on: zanzibar` (SIGSEGV when an image worker is asked for such a scene): a provided
picture that reached the image workers would kill the daemon, and every wait here would fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.bundle.pictures import fit_picture
from pipeline.video.encode import VideoEncoding
from pipeline.video.kenburns import render_frames

from bundles import (
    HOSTILE,
    HOSTILE_LIMITS,
    Bomb,
    entry,
    picture_bytes,
    wav_bytes,
    write_bundle,
    write_raw_zip,
)
from conftest import Daemon, Setup, read_frames
from harness.mounts import tmpfs_refusal

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bundle_daemon")]

VIDEO = (128, 96)  # clips twice the [image] size: a clip made from the PNG would be visibly softer
MAGENTA = (230, 20, 200)  # Mara's picture: found again on the contact sheet
TMPFS = "80m"  # the state folder: more free than max_bundle_bytes (20 MB), less than the bomb
NAMED_BOMB = 100_000_000  # bytes the named bomb inflates to
ASSETS = ["people/mara.jpg", "pictures/quay.png", "sound/voice.wav", "pictures/pier.jpg", "sound/music.wav"]


# ----------------------------------------------------------------------------------------------
# What is dropped


def textured(width: int, height: int, seed: int) -> np.ndarray:
    """Random 8-pixel blocks: detail a 64x48 PNG cannot hold, but a 128x96 clip of the original can."""
    blocks = np.random.default_rng(seed).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), np.uint8))[:height, :width]


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


OWN_STORY = {
    "title": "Own pictures",
    "characters": {"Mara": {"description": "a keeper in a yellow coat", "image": "people/mara.jpg"}},
    "music": "sound/music.wav",
    "scenes": [
        {"description": "the zanzibar quay at dawn", "image": "pictures/quay.png", "motion": "zoom_in"},
        {"description": "holdme a lighthouse in fog", "audio": "sound/voice.wav"},
        {"description": "Mara on the zanzibar pier", "image": "pictures/pier.jpg", "motion": "pan_left"},
    ],
}


def own_files() -> dict[str, bytes]:
    mara = np.zeros((80, 60, 3), np.uint8)
    mara[:] = MAGENTA
    return {
        "people/mara.jpg": encoded(mara, "JPEG"),
        "pictures/quay.png": encoded(textured(400, 300, 1), "PNG"),
        "pictures/pier.jpg": encoded(textured(300, 400, 2), "JPEG"),  # portrait: cropped to cover 64x48
        "sound/voice.wav": wav_bytes(0.5),
        "sound/music.wav": wav_bytes(2.0),
        "notes.txt": b"not named by the story: not published",
    }


def small_bundle(path: Path, tag: str, padding: int = 0) -> Path:
    story = {"title": tag, "scenes": [{"description": f"zanzibar {tag}", "image": "p.png"}]}
    files = {"p.png": picture_bytes(80, 60, seed=len(tag))}
    if padding:  # an unnamed entry, stored: makes the upload long
        files["padding.bin"] = np.random.default_rng(7).bytes(padding)
    return write_bundle(path, story, files, method=zipfile.ZIP_STORED)


def named_bomb(path: Path) -> Path:
    """The story's own picture is a deflate bomb: extracting it writes to the state disk."""
    story = json.dumps({"scenes": [{"description": "zanzibar bomb", "image": "a.png"}]}).encode()
    return write_raw_zip(path, [entry("story.json", story), Bomb(NAMED_BOMB).entry("a.png")])


class SlowUpload(threading.Thread):
    """A client copying a bundle into the inbox in place, a little at a time, holding it open, until
    told to hurry: the file is incomplete (not a readable ZIP) for as long as the test likes."""

    def __init__(self, path: Path, data: bytes) -> None:
        super().__init__(daemon=True)
        self.path, self.data = path, data
        self.hurry = threading.Event()
        self.started_at = self.finished_at = 0.0

    def run(self) -> None:
        self.started_at = time.time()
        with open(self.path, "wb") as fh:
            for i in range(0, len(self.data), 4096):
                fh.write(self.data[i : i + 4096])
                fh.flush()
                self.hurry.wait(0.05)  # the upload's pace (a slow link), until hurried
            os.fsync(fh.fileno())
        self.finished_at = time.time()


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    s: Setup
    dropped: dict[str, bytes]  # story name -> the bytes dropped
    hostile: dict[str, str]  # story name -> what it expects its reason to say
    tmpfs: str | None  # why the state is not a tmpfs (the tests that need one skip), or None
    late: SlowUpload
    bundle_folder_seen: bool  # the paused story's work folder held its extracted bundle
    started: list[dict[str, object]] = field(default_factory=list)  # Own's "scene started" events
    full_waited: list[dict[str, object]] = field(default_factory=list)  # the full-disk story's lines
    log: str = ""


def drop_all(s: Setup, scratch: Path, tmpfs: bool) -> tuple[dict[str, bytes], dict[str, str]]:
    """Everything dropped before the daemon starts, claimed in this order (mtimes ascending)."""
    made: list[tuple[str, str, bytes]] = []  # (file name, story name, bytes)
    raw = json.dumps(OWN_STORY, indent=1).encode()
    own = write_bundle(scratch / "own.zip", raw, own_files(), top="own pictures", finder=True)
    made.append(("Own.ZIP", "Own", own.read_bytes()))
    hostile: dict[str, str] = {}
    for i, h in enumerate(HOSTILE.values()):
        name = f"hostile-{i:02d}"
        made.append((f"{name}.zip", name, h.build(scratch / f"{name}.zip").read_bytes()))
        hostile[name] = h.reason
    plain = {"scenes": [{"description": "a quay", "image": "a.png"}]}
    made.append(("fields.json", "fields", json.dumps(plain).encode()))
    hostile["fields"] = "which only a story bundle (NAME.zip) can bring"
    if tmpfs:
        made.append(("namedbomb.zip", "namedbomb", named_bomb(scratch / "bomb.zip").read_bytes()))
        hostile["namedbomb"] = "limits.max_bundle_bytes"
    story = {"title": "last", "seed": 3, "scenes": ["a harbour at noon", "a harbour at night"]}
    made.append(("goodstory.json", "goodstory", json.dumps(story).encode()))
    made.append(("again.zip", "again", small_bundle(scratch / "again.zip", "again").read_bytes()))
    for i, (file, _, data) in enumerate(made):
        s.drop(file, data, mtime=1_700_000_000 + i)
    return {name: data for _, name, data in made}, hostile


def work_bundle(s: Setup, seq: int) -> Path:
    return s.state / "spool" / "queue" / f"{seq:08d}" / "work" / "bundle"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("bundle-run")
    s = Setup(
        root,
        tiny_dir,
        limits=dict(HOSTILE_LIMITS),
        video={"width": VIDEO[0], "height": VIDEO[1]},
        watch={"mode": "inotify"},
    )
    tmpfs = tmpfs_refusal(s.state, TMPFS, "the state folder")
    try:
        yield from _run(s, root, tmpfs)
    finally:
        if tmpfs is None:
            subprocess.run(["umount", str(s.state)], check=False, timeout=60)


def _run(s: Setup, root: Path, tmpfs: str | None) -> Iterator[Run]:
    scratch = root / "made"
    scratch.mkdir()
    dropped, hostile = drop_all(s, scratch, tmpfs is None)
    late = SlowUpload(
        s.inbox / "late.zip", small_bundle(scratch / "late.zip", "late", 1_500_000).read_bytes()
    )
    dropped["late"] = late.data
    d = s.start(faults={**s.hold(scene="holdme"), "crash_on": "zanzibar"})
    try:
        d.logged("FAULT holding holdme")
        d.wait_for(lambda: s.last_state("again") == "queued", "again queued")
        late.start()
        (s.inbox / "again.cancel").touch()
        d.wait_for(lambda: s.last_state("again") == "cancelled", "again cancelled by inbox/again.cancel")

        (s.inbox / "PAUSE").touch()
        d.wait_for(lambda: s.last_state("goodstory") == "paused", "the pause seen (queued stories say so)")
        s.release()
        d.wait_for(lambda: s.last_state("Own") == "paused", "Own paused after its scene in progress")
        folder = work_bundle(s, 1)
        seen = (folder / "story.json").read_bytes() == own_story_json(dropped["Own"])
        seen = seen and (folder / "pictures" / "pier.jpg").is_file()
        (folder / "pictures" / "pier.jpg").unlink()  # as a try killed half-way through extracting
        (folder / "half-written.part").write_bytes(b"x" * 1000)
        (s.inbox / "PAUSE").unlink()

        d.wait_for(lambda: s.last_state("goodstory") == "done", "the good story after the hostile ones")
        late.hurry.set()
        late.join(60)
        d.wait_for(lambda: s.last_state("late") == "done", "the bundle uploaded slowly")

        assert not (s.inbox / "again.zip").exists()
        (s.inbox / "again.retry").touch()
        d.wait_for(lambda: s.last_state("again") == "done", "again retried from the spool")
        r = Run(s, dropped, hostile, tmpfs, late, seen)
        if tmpfs is None:
            r.full_waited = full_state_disk(s, d, scratch)
    finally:
        code = d.stop()
    assert code == 0, d.output()[-3000:]
    r.log = d.output()
    r.started = d.events("scene started", story="Own")
    yield r


def own_story_json(zip_bytes: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        return zf.read("own pictures/story.json")


def full_state_disk(s: Setup, d: Daemon, scratch: Path) -> list[dict[str, object]]:
    """A good bundle meets a state disk that something else filled: it waits, and is made once
    there is room again."""
    story = {"scenes": [{"description": "zanzibar full", "image": "big.png"}]}
    noise = encoded(np.random.default_rng(3).integers(0, 256, (600, 600, 3), np.uint8), "PNG")
    data = write_bundle(
        scratch / "full.zip", story, {"big.png": noise}, method=zipfile.ZIP_STORED
    ).read_bytes()
    filler = s.state / "filler"
    room = shutil.disk_usage(s.state).free - int(len(data) * 1.5)  # the ZIP fits; it and its copy do not
    with open(filler, "wb") as fh:
        fh.truncate(0)
        for _ in range(room // (1 << 20)):
            fh.write(bytes(1 << 20))
        fh.write(bytes(room % (1 << 20)))
    s.drop("full.zip", data)

    def waiting() -> bool:
        last = (s.status("full") or [{}])[-1]
        return last.get("state") == "waiting" and "No space left" in str(last.get("error"))

    d.wait_for(waiting, "full waiting for room on the state disk")
    filler.unlink()
    d.wait_for(lambda: s.last_state("full") == "done", "full made once there is room")
    return list(s.status("full"))


# ----------------------------------------------------------------------------------------------
# Helpers for the checks


def states(s: Setup, name: str) -> list[str]:
    return [line["state"] for line in s.status(name)]


def decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def original(run: Run, path: str, tmp: Path) -> Path:
    """A provided picture as it was in the bundle (the daemon's copy is gone with its claim)."""
    out = tmp / path.replace("/", "_")
    with zipfile.ZipFile(io.BytesIO(run.dropped["Own"])) as zf:
        out.write_bytes(zf.read(f"own pictures/{path}"))
    return out


def shot(rgb: np.ndarray, box: tuple[float, float, float, float] | None, fps: int) -> list[np.ndarray]:
    """The clip's frames as RGB, rendered here (no encoding), from `rgb` under `box`."""
    enc = VideoEncoding(width=VIDEO[0], height=VIDEO[1], fps=Fraction(fps), crf=18, preset="ultrafast")
    w, h = VIDEO
    return [
        cv2.cvtColor(f.reshape(h * 3 // 2, w), cv2.COLOR_YUV2RGB_I420)
        for f in render_frames(rgb, enc, seconds=1.0, motion="zoom_in", source_box=box)
    ]


def when(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["time"])).timestamp()


# ----------------------------------------------------------------------------------------------
# The good bundle


def test_a_bundle_is_a_story_published_with_what_it_brought(run: Run) -> None:
    s, out = run.s, run.s.outbox / "Own"
    lines = s.status("Own")
    assert lines[0]["state"] == "queued" and lines[0]["scenes"] == 3 and lines[0]["source"] == "Own.ZIP"
    assert states(s, "Own")[-1] == "done" and "failed" not in states(s, "Own")
    assert (out / "story.json").read_bytes() == own_story_json(run.dropped["Own"])  # byte for byte
    with zipfile.ZipFile(io.BytesIO(run.dropped["Own"])) as zf:
        for path in ASSETS:
            assert (out / "assets" / path).read_bytes() == zf.read(f"own pictures/{path}"), path
    on_disk = sorted(
        p.relative_to(out / "assets").as_posix() for p in (out / "assets").rglob("*") if p.is_file()
    )
    assert on_disk == sorted(ASSETS)  # only what the story names: no notes.txt, no Finder junk
    with zipfile.ZipFile(s.outbox / "Own.zip") as zf:
        names = set(zf.namelist())
        assert zf.read("Own/story.json") == (out / "story.json").read_bytes()
    assert {f"Own/assets/{p}" for p in ASSETS} <= names  # the ZIP alone is the whole story
    assert names == {f"Own/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file()}
    manifest = json.loads((out / "manifest.json").read_text("utf-8"))
    assert manifest["assets"] == [f"assets/{p}" for p in ASSETS]
    for i in range(3):
        assert (out / "clips" / f"scene_{i + 1:03d}.mp4").is_file()
    film = read_frames(out / "film.mp4")[0]
    assert film == VIDEO


def test_a_provided_picture_is_recorded_as_provided_with_nothing_invented(run: Run, tmp_path: Path) -> None:
    scenes = json.loads((run.s.outbox / "Own" / "manifest.json").read_text("utf-8"))["scenes"]
    invented = {"seed", "prompt", "negative_prompt", "generation", "finishing", "steps", "guidance"}
    for number, path in ((1, "pictures/quay.png"), (3, "pictures/pier.jpg")):
        record = scenes[number - 1]
        sha = hashlib.sha256(original(run, path, tmp_path).read_bytes()).hexdigest()
        assert record["provided"]["path"] == path and record["provided"]["sha256"] == sha
        assert record["provided"]["asset"] == f"assets/{path}"
        assert not invented & set(record), invented & set(record)
    assert {"seed", "prompt", "generation"} <= set(scenes[1])  # the generated scene says how it was made
    provided = {e["scene"]: e["picture"] for e in run.started if "picture" in e}
    assert provided == {1: "pictures/quay.png", 3: "pictures/pier.jpg"}
    assert all("seed" not in e for e in run.started if "picture" in e)


def test_a_provided_pictures_png_is_its_cover_fit(run: Run, tmp_path: Path) -> None:
    """Decoded PNG == fit_picture(original).image(): scaled to cover, centre-cropped, no finishing.
    Scene 3's picture was taken out of the half-extracted folder while paused: it was extracted again."""
    s = run.s
    for number, path in ((1, "pictures/quay.png"), (3, "pictures/pier.jpg")):
        expected = np.asarray(fit_picture(original(run, path, tmp_path), s.width, s.height).image())
        png = decoded(s.outbox / "Own" / "images" / f"scene_{number:03d}.png")
        assert png.shape == (s.height, s.width, 3)
        assert np.array_equal(png, expected), path


def test_a_provided_pictures_clip_and_film_are_made_from_the_original(run: Run, tmp_path: Path) -> None:
    """The middle of scene 1, in its clip and in the film, against two renderings made here: from
    the original picture (what the daemon must do) and from the 64x48 PNG (what it must not)."""
    s = run.s
    fitted = fit_picture(original(run, "pictures/quay.png", tmp_path), s.width, s.height)
    fps = int(s.sections["video"]["fps"])
    right = shot(fitted.rgb, fitted.clip_box(*VIDEO), fps)
    wrong = shot(decoded(s.outbox / "Own" / "images" / "scene_001.png"), None, fps)
    clip = read_frames(s.outbox / "Own" / "clips" / "scene_001.mp4")[1]
    film = read_frames(s.outbox / "Own" / "film.mp4")[1]
    for frames in (clip, film):
        for k in (3, 4):  # past the fade in, before the fade out or the crossfade
            seen = frames[k].astype(float)
            near, far = np.abs(seen - right[k]).mean(), np.abs(seen - wrong[k]).mean()
            assert near < 0.5 * far, (k, near, far)


def test_the_contact_sheet_shows_the_cast(run: Run) -> None:
    sheet = decoded(run.s.outbox / "Own" / "contact_sheet.jpg").astype(int)
    magenta = (np.abs(sheet - np.array(MAGENTA)).max(axis=2) < 40).sum()
    # The cast shows the published portrait: Mara's picture fitted to the [image] size, as
    # characters/Mara.png is; one thumbnail's worth of it (320 wide, the image's aspect).
    portrait = decoded(run.s.outbox / "Own" / "characters" / "Mara.png")
    assert portrait.shape == (run.s.height, run.s.width, 3)
    assert magenta > 0.9 * 320 * round(320 * run.s.height / run.s.width)


def test_pause_and_a_half_extracted_folder(run: Run) -> None:
    """Paused after the held scene with its bundle extracted in the claim's work folder; resumed
    over a folder damaged as a kill -9 leaves it: removed, extracted again, made."""
    assert run.bundle_folder_seen
    lines = states(run.s, "Own")
    assert "paused" in lines and lines.index("paused") < len(lines) - 1 and lines[-1] == "done"
    assert not list(run.s.outbox.rglob("half-written.part"))


# ----------------------------------------------------------------------------------------------
# Bad bundles


def test_every_hostile_kind_fails_with_its_reason_and_keeps_its_bytes(run: Run) -> None:
    s = run.s
    for name, reason in run.hostile.items():
        last = s.status(name)[-1]
        assert last["state"] == "failed", (name, last)
        error = str(last["error"])
        assert reason in error and "\n" not in error and "Traceback" not in error, (name, error)
        kept = Path(str(last["input_kept"]))
        assert (
            kept.parent == s.state / "failed" and kept.suffix == Path(str(s.status(name)[0]["source"])).suffix
        )
        assert kept.read_bytes() == run.dropped[name], name
    print("\n".join(f"{n}: {s.status(n)[-1]['error']}" for n in run.hostile))


def test_nothing_of_a_bad_bundle_is_written_outside(run: Run) -> None:
    root = run.s.root
    assert not [p for p in root.rglob("*") if p.name in ("evil.sh", "evil.dll", "x", "bomb.bin")]
    assert not Path("/etc/cron.d/x").exists()
    assert not list((run.s.state / "spool" / "queue").iterdir())  # every claim ended and went
    assert not [p for p in run.s.state.rglob("*") if p.name == "bundle"]


def test_the_daemon_went_on_to_the_last_story(run: Run) -> None:
    assert states(run.s, "goodstory")[-1] == "done"
    assert len(json.loads((run.s.outbox / "goodstory" / "manifest.json").read_text())["scenes"]) == 2


# ----------------------------------------------------------------------------------------------
# Settling and steering


def test_a_bundle_still_being_uploaded_settles_and_is_not_failed(run: Run) -> None:
    lines = run.s.status("late")
    assert [line["state"] for line in lines if line["state"] in ("failed", "done")] == ["done"]
    assert when(lines[0]) >= run.late.finished_at - 1.0  # claimed once the upload had ended
    assert run.late.finished_at - run.late.started_at > 1.0  # and it was incomplete for a while


def test_a_cancelled_bundle_is_retried_from_the_spool(run: Run) -> None:
    s = run.s
    lines = states(s, "again")
    assert lines[:2] == ["queued", "cancelled"] and lines[-1] == "done"
    cancelled = next(line for line in s.status("again") if line["state"] == "cancelled")
    kept = Path(str(cancelled["input_kept"]))
    assert kept.parent == s.state / "cancelled" and kept.name.endswith("-again.zip")
    assert kept.read_bytes() == run.dropped["again"]
    assert not (s.inbox / "again.retry").exists() and not (s.inbox / "again.cancel").exists()  # consumed
    assert (s.outbox / "again" / "assets" / "p.png").is_file()


# ----------------------------------------------------------------------------------------------
# The state disk


def test_a_bomb_named_by_the_story_stops_at_the_limit_before_the_disk_fills(run: Run) -> None:
    if run.tmpfs:
        pytest.skip(run.tmpfs)
    assert NAMED_BOMB > 80_000_000 > HOSTILE_LIMITS["max_bundle_bytes"]  # bigger than the disk and the limit
    error = str(run.s.status("namedbomb")[-1]["error"])
    assert "'a.png'" in error and "limits.max_bundle_bytes" in error


def test_a_state_disk_full_of_something_else_waits(run: Run) -> None:
    if run.tmpfs:
        pytest.skip(run.tmpfs)
    got = [line["state"] for line in run.full_waited]
    assert "waiting" in got and got[-1] == "done" and "failed" not in got
