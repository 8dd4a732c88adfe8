"""The status page as a person sees it: real files, opened in headless Chromium.

The daemon's own page from a real run is opened in tests/test_page_daemon.py (one daemon start,
shared with the metrics and retention checks); here the page is written from snapshots made in
the test, for what one run cannot show cheaply: a phone's width, the share moved elsewhere.
"""

from __future__ import annotations

import zipfile
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from browser import inspect, screenshot
from PIL import Image

from daemon.report.page import InProgress, PageSnapshot, Queued, Result, SceneThumb, write_page
from pipeline.contactsheet import make_contact_sheet
from pipeline.video.encode import VideoEncoding
from pipeline.video.kenburns import render_clip

pytestmark = pytest.mark.slow

HOSTILE = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'
WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def picture(seed: int, size: tuple[int, int] = (384, 288)) -> Image.Image:
    """A small landscape: a sky gradient, a sun and hills, in a hue of its own."""
    w, h = size
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(40, 220, 3), rng.integers(120, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = (top * (1 - t) + bottom * t).repeat(w, axis=1)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.integers(w // 4, 3 * w // 4), rng.integers(h // 5, h // 2), h // 8
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = (255, 236, 160)
    hills = h * 0.7 + (h * 0.08) * np.sin(xx / w * 6.28 * rng.uniform(0.8, 2.0) + seed)
    img[yy > hills] = rng.integers(20, 90, 3)
    return Image.fromarray(img.astype("uint8"))


def published(outbox: Path, name: str, scenes: int) -> Result:
    """A finished story's real outputs: scene PNGs, a Ken Burns film, a contact sheet, a ZIP."""
    folder = outbox / name
    (folder / "images").mkdir(parents=True)
    pngs = []
    for i in range(1, scenes + 1):
        path = folder / "images" / f"scene_{i:03d}.png"
        picture(100 + i).save(path)
        pngs.append(path)
    encoding = VideoEncoding(width=320, height=240, fps=Fraction(8), crf=23, preset="ultrafast")
    render_clip(picture(101), folder / "film.mp4", encoding, seconds=1.0)
    make_contact_sheet([(p, i, f"scene {i}") for i, p in enumerate(pngs, 1)], folder / "contact_sheet.jpg")
    with zipfile.ZipFile(outbox / f"{name}.zip", "w") as zf:
        for p in folder.rglob("*"):
            zf.write(p, p.relative_to(folder).as_posix())
    return Result(
        name,
        "done",
        title="Mara and the storm",
        finished=WHEN,
        scenes=scenes,
        film=f"{name}/film.mp4",
        poster=f"{name}/images/scene_001.png",
        contact_sheet=f"{name}/contact_sheet.jpg",
        zip=f"{name}.zip",
        folder=name,
    )


def snapshot(outbox: Path, work: Path) -> PageSnapshot:
    (work / "images").mkdir(parents=True)
    thumbs = []
    for i in (1, 2, 3):
        picture(i, (1024, 768)).save(work / "images" / f"scene_{i:03d}.png")
        thumbs.append(SceneThumb(i, work / "images" / f"scene_{i:03d}.png"))
    return PageSnapshot(
        time=WHEN,
        state="running",
        current=InProgress("lighthouse", "The lighthouse keeper", 4, 8, 125.0, tuple(thumbs)),
        queue=(
            Queued("hostile", HOSTILE, 3, WHEN - timedelta(minutes=5)),
            Queued("harbour", "Harbour at dawn", 5, WHEN - timedelta(minutes=2)),
        ),
        results=(
            published(outbox, "mara", 4),
            Result(
                "broken",
                "failed",
                title="Broken story",
                finished=WHEN,
                scenes=2,
                error="scenes.1: description is empty",
            ),
        ),
    )


def test_the_page_in_a_real_browser(tmp_path: Path) -> None:
    outbox = tmp_path / "share" / "outbox"
    outbox.mkdir(parents=True)
    write_page(outbox, snapshot(outbox, tmp_path / "state" / "work"))
    page = outbox / "index.html"

    seen = inspect(page, (1100, 1400), tmp_path / "profile")
    text = seen["text"]
    for words in (
        "lighthouse",
        "The lighthouse keeper",
        "Scene 4 of 8",
        "harbour",
        "Harbour at dawn",
        "mara",
    ):
        assert words in text, words
    assert "Broken story" in text and "scenes.1: description is empty" in text
    assert seen["state"].strip().lower() == "running"
    assert HOSTILE in text and "pwned" not in seen["title"] and seen["scripts"] == 1  # only the probe's
    assert seen["bar"]["now"] == "3" and seen["bar"]["max"] == "8"
    assert seen["bar"]["fraction"] == pytest.approx(3 / 8, abs=0.02)
    assert seen["refresh"]
    images = {i["src"]: i for i in seen["images"]}
    assert set(images) == {
        ".storyreel/thumbs/lighthouse/scene_001.jpg",
        ".storyreel/thumbs/lighthouse/scene_002.jpg",
        ".storyreel/thumbs/lighthouse/scene_003.jpg",
        "mara/contact_sheet.jpg",
    }
    for src, img in images.items():
        assert img["width"] > 0 and img["shown"] > 0, f"{src} did not load"  # not a broken image
    (video,) = seen["videos"]
    assert video["src"] == "mara/film.mp4" and video["error"] is None
    assert video["ready"] >= 2 and video["duration"] == pytest.approx(1.0, abs=0.2) and video["width"] == 320

    phone = inspect(page, (390, 844), tmp_path / "profile")
    assert phone["scroll_width"] <= phone["viewport_width"]  # nothing wider than a phone's screen
    assert all(i["width"] > 0 for i in phone["images"])

    shot = screenshot(page, tmp_path / "page.png", (1100, 1500), tmp_path / "profile")
    screenshot(page, tmp_path / "page-phone.png", (390, 2200), tmp_path / "profile")
    with Image.open(shot) as img:
        assert img.size == (1100, 1500)
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # a rendered page, not a blank one
    print(f"screenshots: {shot} {tmp_path / 'page-phone.png'}")


def test_moving_the_share_keeps_every_link(tmp_path: Path) -> None:
    """Relative links only: the outbox copied elsewhere (another mount point) still shows everything."""
    outbox = tmp_path / "a" / "outbox"
    outbox.mkdir(parents=True)
    write_page(outbox, snapshot(outbox, tmp_path / "work"))
    moved = tmp_path / "elsewhere" / "mnt" / "share"
    moved.parent.mkdir(parents=True)
    outbox.rename(moved)
    seen = inspect(moved / "index.html", (1100, 1400), tmp_path / "profile")
    assert len(seen["images"]) == 4 and all(i["width"] > 0 for i in seen["images"])
    assert seen["videos"][0]["ready"] >= 2
