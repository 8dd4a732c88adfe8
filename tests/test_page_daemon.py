"""The status page, the metrics and retention of one real daemon run, checked as people see them.

One daemon (one start, shared by every test here: a module-scoped fixture) over real folders:
five stories dropped at once, two old published stories already in the outbox. It is held in
the middle of scene 3 of the long story (tests/faulty.py hold_scene), which is the moment the
issue names: one story done, one failed, one being made, two queued. The daemon's own
`outbox/index.html` and metrics textfile are copied then. Then a queued story is cancelled with
`storyreel cancel`, the hold is released, the rest is made, `storyreel pause` is given to the idle
daemon, a story named like the page is dropped, and the daemon is stopped.

The watch runs in inotify mode with a poll and rescan interval of an hour: the idle daemon wakes
only for an event, so `storyreel pause` is seen only if the command's doorbell wakes it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from browser import chromium_path, inspect, screenshot
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from daemon.queue.sidecar import append_status

from conftest import Setup, storyreel

# The tests share one module-scoped daemon run: one worker runs them all (conftest._longest_first).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("page_daemon")]

HOSTILE = "<script>document.title='pwned'</script><b>bold?</b>"
HOLD = "long scene 2 "  # the prompt of scene 3 of "long" (scenes count from 0 in the descriptions)
DAY = 86400.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def story(n: int, tag: str, title: str) -> dict[str, object]:
    return {"title": title, "seed": 3, "scenes": [f"{tag} scene {i} of a quiet harbour" for i in range(n)]}


def samples(path: Path) -> Samples:
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(path.read_text("utf-8"))
        for x in family.samples
    }


def published_long_ago(outbox: Path, name: str, days: float) -> None:
    """A story an earlier run published: folder, ZIP and a sidecar ending `done`, `days` old."""
    append_status(outbox, name, "queued", 0, 1)
    append_status(outbox, name, "done", 1, 1)
    (outbox / name / "images").mkdir(parents=True)
    (outbox / name / "images" / "scene_001.png").write_bytes(b"x" * 1000)
    (outbox / f"{name}.zip").write_bytes(b"z" * 1000)
    t = time.time() - days * DAY
    for p in (outbox / name / "images" / "scene_001.png", outbox / name / "images", outbox / name):
        os.utime(p, (t, t))
    os.utime(outbox / f"{name}.zip", (t, t))


@dataclass
class Run:
    s: Setup
    held: Path  # a copy of the outbox while scene 3 of "long" was being made
    held_prom: Path  # the metrics textfile at that moment
    prom: Path  # the metrics textfile after the stop
    paused_page: str  # index.html once `storyreel pause` was seen by the idle daemon
    log: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Run:
    root = tmp_path_factory.mktemp("page-run")
    prom = root / "node" / "storyreel.prom"
    prom.parent.mkdir()
    s = Setup(
        root,
        tiny_dir,
        watch={"mode": "inotify", "poll_seconds": 3600.0, "rescan_seconds": 3600.0},
        metrics={"textfile": str(prom)},
        retention={"keep_days": 30},
    )
    published_long_ago(s.outbox, "ancient", 40)  # older than keep_days: goes
    published_long_ago(s.outbox, "lastweek", 7)  # stays
    drops = [
        ("finished", story(2, "finished", "Finished story")),
        ("broken", {"title": "Broken story", "scenes": []}),
        ("long", story(12, "long", "The long one")),
        ("hostile", story(2, "hostile", HOSTILE)),
        ("harbour", story(2, "harbour", "Harbour at dawn")),
    ]
    for i, (name, doc) in enumerate(drops):  # claimed in mtime order, in one look
        s.drop(f"{name}.json", doc, mtime=1_700_000_000 + i)
    page = s.outbox / "index.html"
    d = s.start(faults=s.hold(scene=HOLD))
    try:
        d.logged(f"FAULT holding {HOLD}")

        def page_shows_the_hold() -> bool:
            text = page.read_text("utf-8") if page.exists() else ""
            return ".storyreel/thumbs/long/scene_001.jpg" in text and "Scene 3 of 12" in text

        d.wait_for(page_shows_the_hold, "the daemon's page showing scene 3 of long with a thumbnail")
        d.wait_for(lambda: prom.exists() and samples(prom).get(("storyreel_queue_length", ())) == 2)
        held = root / "held-outbox"
        shutil.copytree(s.outbox, held, ignore=lambda _, names: [n for n in names if n.startswith(".check")])
        held_prom = shutil.copy(prom, root / "held.prom")

        cancel = storyreel("cancel", "harbour", "--config", str(s.config))
        assert cancel.returncode == 0, cancel.stderr
        d.wait_for(lambda: s.last_state("harbour") == "cancelled", "harbour cancelled")
        s.release()
        d.wait_for(lambda: s.last_state("hostile") == "done", "hostile done")

        paused = storyreel("pause", "--config", str(s.config))
        assert paused.returncode == 0, paused.stderr
        current = s.state / "current.json"
        d.wait_for(lambda: json.loads(current.read_text()).get("activity") == "paused", "paused, woken")
        d.wait_for(lambda: "paused" in page.read_text("utf-8").split("</header>")[0], "the page says paused")
        paused_page = page.read_text("utf-8")
        s.drop("index.html.json", {"scenes": []})  # claimed while paused; fails at once
        d.wait_for(lambda: s.last_state("index.html-2") == "failed", "index.html-2 failed")
    finally:
        code = d.stop()
    assert code == 0, d.output()[-3000:]
    return Run(s, held, Path(held_prom), prom, paused_page, d.output())


def test_the_daemons_page_in_a_real_browser(run: Run, tmp_path: Path) -> None:
    """The page as the daemon wrote it mid-run: done, failed, processing with thumbnails, queued."""
    chromium_path()  # skip (or fail under CI) where there is no browser
    s, page = run.s, run.held / "index.html"
    seen = inspect(page, (1100, 1400), tmp_path / "profile")
    text = seen["text"]
    for words in ("The long one", "long", "Harbour at dawn", "harbour", "Finished story", "finished"):
        assert words in text, words
    assert "Broken story" in text or "broken" in text
    assert "scenes: List should have at least 1 item" in text  # the failure's reason
    assert HOSTILE in text and "pwned" not in seen["title"] and seen["scripts"] == 1  # only the probe's
    assert seen["state"].strip().lower() == "running" and seen["refresh"]
    assert seen["bar"]["max"] == "12" and int(seen["bar"]["now"]) >= 1
    assert seen["bar"]["fraction"] == pytest.approx(2 / 12, abs=0.02)  # scenes 1 and 2 of 12 done
    queue = text[text.index("Queue") :]
    assert queue.index("hostile") < queue.index("harbour")  # in the order they run
    thumbs = [i for i in seen["images"] if i["src"].startswith(".storyreel/thumbs/long/")]
    assert thumbs and all(i["width"] == s.width and i["shown"] > 0 for i in thumbs)  # loaded, not broken
    sheet = [i for i in seen["images"] if i["src"] == "finished/contact_sheet.jpg"]
    assert sheet and sheet[0]["width"] > 0
    (video,) = seen["videos"]
    assert video["src"] == "finished/film.mp4" and video["error"] is None and video["ready"] >= 2
    assert video["duration"] > 0 and video["width"] == s.width
    shot = screenshot(page, tmp_path / "page.png", (1100, 1500), tmp_path / "profile")
    with Image.open(shot) as img:
        assert img.size == (1100, 1500) and img.convert("L").getextrema()[0] < 100  # not blank
    print(f"screenshot: {shot}")


def test_the_page_at_rest(run: Run) -> None:
    """Paused (the idle daemon woken by the command), then stopped: no reload, no story in progress."""
    head = run.paused_page.split("</header>")[0]
    assert "paused" in head and "storyreel pause" in head
    final = (run.s.outbox / "index.html").read_text("utf-8")
    assert "stopped" in final.split("</header>")[0]
    assert 'http-equiv="refresh"' not in final and "Nothing is being made right now." in final
    assert not (run.s.outbox / ".storyreel" / "thumbs" / "long").exists()  # not the story in progress
    assert (run.s.outbox / "index.html-2.status.jsonl").exists()  # a story is never called index.html


def test_metrics_match_the_sidecars(run: Run) -> None:
    s = run.s
    held = samples(run.held_prom)
    assert held[("storyreel_queue_length", ())] == 2
    assert held[("storyreel_daemon_state", (("storyreel_daemon_state", "running"),))] == 1
    assert held[("storyreel_oldest_queued_timestamp_seconds", ())] > 0

    found = samples(run.prom)
    ended: dict[str, list[dict[str, Any]]] = {}
    for sidecar in s.outbox.glob("*.status.jsonl"):
        last = s.status(sidecar.name.removesuffix(".status.jsonl"))[-1]
        if "seq" in last:  # a story of this daemon (not one an earlier run left, as "lastweek")
            ended.setdefault(last["state"], []).append(last)
    assert {k: len(v) for k, v in ended.items()} == {"done": 3, "failed": 2, "cancelled": 1}
    for outcome in ("done", "failed", "cancelled"):
        value = found[("storyreel_stories_total", (("outcome", outcome),))]
        assert value == len(ended[outcome]), outcome
    made = sum(x["scenes"] for x in ended["done"])
    assert made == 2 + 12 + 2
    assert found[("storyreel_scenes_total", ())] == made
    assert found[("storyreel_image_seconds_count", ())] == made  # every scene made by this process
    assert found[("storyreel_clip_seconds_count", ())] == made
    assert found[("storyreel_queue_length", ())] == 0
    assert found[("storyreel_starts_total", ())] == 1
    assert found[("storyreel_daemon_state", (("storyreel_daemon_state", "stopped"),))] == 1
    assert "storyreel_vram_peak_bytes" not in {k[0] for k in found}  # no CUDA here


def test_retention_in_a_real_run(run: Run) -> None:
    out = run.s.outbox
    assert not (out / "ancient").exists() and not (out / "ancient.zip").exists()
    last = run.s.status("ancient")[-1]
    assert last["state"] == "expired" and last["error"] == "older than retention.keep_days = 30"
    assert (out / "lastweek").is_dir() and (out / "lastweek.zip").is_file()
    for name in ("finished", "long", "hostile"):
        assert (out / name / "film.mp4").is_file() and (out / f"{name}.zip").is_file()
    assert '"event": "expired"' in run.log and '"story": "ancient"' in run.log
