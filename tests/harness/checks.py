"""What the contract promises of a published story, decoded and checked."""

from __future__ import annotations

import json
import subprocess
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.daemons import Setup


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


def has_audio(path: Path) -> bool:
    """Whether the file holds an audio stream (ffmpeg's own listing of its streams)."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    listing = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False).stderr
    return " Audio: " in listing


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
    fps = Fraction(s.sections["video"]["fps"])
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
    video = s.sections["video"]
    fps = Fraction(video["fps"])
    clip_frames = [round(sc["seconds"] * fps) for sc in manifest["scenes"]]
    assert clip_frames == [sc["frames"] for sc in manifest["scenes"]]
    xfade = manifest["film_info"]["crossfade_frames"]
    if len(clip_frames) > 1 and not manifest["film_info"]["crossfade_clamped"]:
        assert xfade == round(video["crossfade_seconds"] * fps)
    assert film.frames == sum(clip_frames) - (len(clip_frames) - 1) * xfade
    size = (video["width"], video["height"]) if video.get("width") else (s.width, s.height)
    assert (film.codec, film.pix_fmt, film.width, film.height) == ("h264", "yuv420p", *size)
    if manifest["sound"]["mix"] is None:  # nothing spoken, recorded or played: silent, as it was
        assert not has_audio(out / "film.mp4") and not (out / "audio").exists()
    with Image.open(out / "contact_sheet.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width >= 2 * 64
        sheet.load()


# What the daemon keeps in the outbox besides stories: the status page and its files.
PAGE_ENTRIES = {"index.html", ".storyreel"}


def outbox_entries(s: Setup) -> set[str]:
    return {p.name for p in s.outbox.iterdir()}
