"""The status page and metrics of a real daemon run: one story done, one failed, one being made,
two queued. The daemon does not write the page yet (the worker wiring is to come): this test
reads the daemon's state the way the worker will (daemon.overview) while the daemon runs.
TODO(lead): once the worker writes index.html and the textfile itself, wait for them here instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import chromium_path, inspect, screenshot
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics
from daemon.overview import read_snapshot
from daemon.page import write_page
from daemon.spool import Spool

from conftest import Setup, wait_for

pytestmark = pytest.mark.slow

HOSTILE = "<script>document.title='pwned'</script><b>bold?</b>"


def story(n: int, title: str) -> dict[str, object]:
    return {"title": title, "seed": 3, "scenes": [f"a quiet harbour at dawn, boat {i}" for i in range(n)]}


def test_page_and_metrics_of_a_real_run(tmp_path: Path, tiny_dir: Path) -> None:
    chromium_path()  # skip (or fail under CI) before starting anything
    s = Setup(tmp_path, tiny_dir)
    # All five at once, claimed in mtime order in one pass: the daemon claims between stories only.
    drops = [
        ("finished", story(2, "Finished story")),
        ("broken", {"title": "Broken story", "scenes": []}),
        ("long", story(12, "The long one")),
        ("hostile", story(2, HOSTILE)),
        ("harbour", story(2, "Harbour at dawn")),
    ]
    for i, (name, doc) in enumerate(drops):
        s.drop(f"{name}.json", doc, mtime=1_700_000_000 + i)
    d = s.start(faults={"slow_step": 0.6})
    try:
        wait_for(lambda: s.last_state("finished") == "done", "finished done")
        assert s.last_state("broken") == "failed"
        spool = Spool(s.state, s.inbox)  # read only, as `storyreel status` does

        def long_has_a_scene() -> bool:
            return any(
                c.name == "long" and (c.work / "out/images/scene_001.png").exists() for c in spool.claims()
            )

        wait_for(long_has_a_scene, "a finished scene of long")
        assert s.last_state("hostile") == s.last_state("harbour") == "queued"
        snap = read_snapshot(spool, s.outbox)
    finally:
        assert d.stop() == 0, d.output()

    assert snap.state == "running" and snap.current is not None and snap.current.name == "long"
    assert snap.current.finished, "no finished scene of the story in progress"
    assert [q.name for q in snap.queue] == ["hostile", "harbour"]
    assert [(r.name, r.state) for r in snap.results] == [
        ("finished", "done"),
        ("broken", "failed"),
    ]  # newest first
    write_page(s.outbox, snap)
    page = s.outbox / "index.html"

    seen = inspect(page, (1100, 1400), tmp_path / "profile")
    text = seen["text"]
    for words in ("The long one", "long", "Harbour at dawn", "harbour", "Finished story", "Broken story"):
        assert words in text, words
    assert HOSTILE in text and "pwned" not in seen["title"] and seen["scripts"] == 1
    assert seen["state"].strip().lower() == "running"
    assert seen["bar"]["max"] == "12" and int(seen["bar"]["now"]) >= 1
    thumbs = [i for i in seen["images"] if i["src"].startswith(".storyreel/thumbs/long/")]
    assert thumbs and all(i["width"] == s.width for i in thumbs)  # thumbnails never upscale: 64 px
    sheet = [i for i in seen["images"] if i["src"] == "finished/contact_sheet.jpg"]
    assert sheet and sheet[0]["width"] > 0
    (video,) = seen["videos"]
    assert video["src"] == "finished/film.mp4" and video["error"] is None and video["ready"] >= 2
    assert video["duration"] > 0 and video["width"] == s.width
    screenshot(page, tmp_path / "page.png", (1100, 1500), tmp_path / "profile")

    prom = tmp_path / "storyreel.prom"
    metrics = Metrics(prom)
    metrics.start(s.state)  # as at the next start: counters from history
    metrics.observe(snap)
    metrics.write()
    found = {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for family in text_string_to_metric_families(prom.read_text())
        for x in family.samples
    }
    sidecars = {
        p.name.removesuffix(".status.jsonl"): s.status(p.name.removesuffix(".status.jsonl"))
        for p in s.outbox.glob("*.status.jsonl")
    }
    ended = [lines[-1] for lines in sidecars.values() if lines[-1]["state"] in ("done", "failed")]
    for outcome in ("done", "failed"):
        expected = sum(1 for last in ended if last["state"] == outcome)
        assert found[("storyreel_stories_total", (("outcome", outcome),))] == expected == 1
    assert found[("storyreel_scenes_total", ())] == 2
    assert found[("storyreel_queue_length", ())] == 2
