"""The status page without a browser: escaping, links, refresh, thumbnails, the write throttle."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.inbox.scan import is_candidate_name
from daemon.queue.claim import Identity
from daemon.queue.current import write_current
from daemon.queue.sidecar import append_status
from daemon.queue.spool import Spool
from daemon.report.metrics import Metrics
from daemon.report.overview import page_view
from daemon.report.page import (
    InProgress,
    PageSnapshot,
    Queued,
    Result,
    SceneThumb,
    render_page,
    thumb_path,
    write_page,
)
from daemon.report.snapshot import read_snapshot
from daemon.report.writer import ReportWriter, Throttle
from pipeline.names import PAGE_ASSETS, is_reserved

HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
WHEN = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


class Tags(HTMLParser):
    """Every start tag with its attributes, and the page's visible text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]

    def links(self) -> list[str]:
        return [str(a[k]) for _, a in self.tags for k in ("href", "src", "poster") if a.get(k)]


def png(path: Path, seed: int, size: tuple[int, int] = (256, 192)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
    return path


def busy_snapshot(work: Path) -> PageSnapshot:
    thumbs = tuple(SceneThumb(i, png(work / f"scene_{i:03d}.png", i, (640, 480))) for i in (1, 2))
    return PageSnapshot(
        time=WHEN,
        state="running",
        current=InProgress("lighthouse", "The Lighthouse", 3, 4, 75.0, thumbs),
        queue=(Queued("hostile", HOSTILE, 2, WHEN), Queued("next", "Next one", 1, WHEN)),
        results=(
            Result(
                "mara",
                "done",
                title="Mara",
                finished=WHEN,
                scenes=2,
                film="mara/film.mp4",
                poster="mara/images/scene_001.png",
                contact_sheet="mara/contact_sheet.jpg",
                zip="mara.zip",
                folder="mara",
            ),
            Result("bad", "failed", title="Bad", finished=WHEN, error="scenes: field required <b>"),
            Result("evil", "done", film="/etc/passwd", zip="../x.zip", contact_sheet="file:x.jpg"),
        ),
    )


def test_a_hostile_title_is_text_and_links_are_relative(tmp_path: Path) -> None:
    page = Tags(render_page(busy_snapshot(tmp_path / "work")))
    assert not page.all("script")
    assert not [a for a in page.all("img") if a.get("src") == "x"]
    assert HOSTILE in "".join(page.text)  # shown as it was written, every character
    assert "scenes: field required <b>" in "".join(page.text)
    links = page.links()
    for link in ("mara/film.mp4", "mara.zip", "mara/contact_sheet.jpg", "mara/", "mara/images/scene_001.png"):
        assert link in links, link
    for link in links:
        assert not link.startswith("/") and ":" not in link and ".." not in link, link
    bar = next(a for a in page.all("div") if a.get("role") == "progressbar")
    assert (bar["aria-valuenow"], bar["aria-valuemax"]) == ("2", "4")
    assert page.all("video")[0]["src"] == "mara/film.mp4"


def test_names_are_quoted_in_links_and_shown_as_written(tmp_path: Path) -> None:
    snap = PageSnapshot(WHEN, "idle", results=(Result("a b#1", "done", zip="a b#1.zip", folder="a b#1"),))
    page = Tags(render_page(snap))
    assert "a%20b%231.zip" in page.links()
    assert "a b#1" in "".join(page.text)


def test_the_page_reloads_itself_only_while_something_is_coming(tmp_path: Path) -> None:
    def refreshes(snap: PageSnapshot) -> bool:
        return any(a.get("http-equiv") == "refresh" for a in Tags(render_page(snap)).all("meta"))

    assert refreshes(busy_snapshot(tmp_path))
    assert refreshes(PageSnapshot(WHEN, "paused", "PAUSE file in the inbox", queue=(Queued("q"),)))
    assert not refreshes(PageSnapshot(WHEN, "idle", results=busy_snapshot(tmp_path).results))
    assert not refreshes(PageSnapshot(WHEN, "stopped", queue=(Queued("q"),)))


def test_write_page_makes_thumbnails_and_skips_an_unchanged_page(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    snap = busy_snapshot(tmp_path / "work")
    assert write_page(outbox, snap)
    page = outbox / "index.html"
    thumb = thumb_path(outbox, "lighthouse", 2)
    with Image.open(thumb) as img:
        assert img.format == "JPEG" and img.width == 320 and img.height == 240
        img.load()
    srcs = Tags(page.read_text("utf-8")).links()
    assert f"{PAGE_ASSETS}/thumbs/lighthouse/scene_001.jpg" in srcs and f"{PAGE_ASSETS}/page.css" in srcs
    assert (outbox / PAGE_ASSETS / "page.css").stat().st_size > 0
    before = page.stat().st_ino, page.stat().st_mtime_ns
    assert not write_page(outbox, snap)  # nothing changed: nothing written
    assert (page.stat().st_ino, page.stat().st_mtime_ns) == before
    assert not [p for p in outbox.rglob(".*") if p.name != PAGE_ASSETS]  # no temp file left behind
    write_page(outbox, PageSnapshot(WHEN, "idle"))
    assert not thumb.parent.exists()  # another story's thumbnails are not kept


def test_throttle_keeps_the_last_request() -> None:
    now = [100.0]
    t = Throttle(3.0, clock=lambda: now[0])
    assert not t.due() and t.next_deadline() is None
    t.request()
    assert t.due()
    t.done()
    t.request()
    assert not t.due() and t.next_deadline() == 103.0
    now[0] = 103.0
    assert t.due()


def observed(
    root: Path, now: list[float], interval: float, outbox_ok: list[bool] | None = None
) -> ReportWriter:
    """The daemon's report writer over an opened spool, on a test clock, with a metrics textfile."""
    inbox, outbox = root / "inbox", root / "outbox"
    inbox.mkdir(exist_ok=True)
    spool = Spool(root / "state", inbox)
    spool.open()
    ok = outbox_ok if outbox_ok is not None else [True]
    obs = ReportWriter(
        outbox,
        spool.state,
        spool.claims,
        metrics=Metrics(root / "storyreel.prom"),
        outbox_ok=lambda: ok[0],
        interval=interval,
        clock=lambda: now[0],
    )
    obs.started()
    return obs


def paused_by(who: str) -> dict[str, object]:
    return {"activity": "paused", "paused": [{"by": who, "since": "2025-03-01T12:00:00+00:00"}]}


def test_report_writer_write_at_most_once_per_interval_and_never_lose_the_last(tmp_path: Path) -> None:
    now = [0.0]
    (tmp_path / "outbox").mkdir()
    obs = observed(tmp_path, now, interval=5.0)
    page = tmp_path / "outbox" / "index.html"
    for i in range(10):  # a burst of changes
        obs.changed(paused_by(f"user{i}"))
        obs.tick()
        now[0] += 0.1
    assert obs.writes == 1 and obs.next_deadline() == 5.0
    obs.tick()
    assert obs.writes == 1  # still inside the interval
    now[0] = 6.0
    obs.tick()
    assert obs.writes == 2
    assert "by user9" in page.read_text("utf-8") and "by user8" not in page.read_text("utf-8")
    obs.changed({"activity": "stopped"})
    obs.flush()  # at stop: written at once, whatever the interval
    assert "stopped" in page.read_text("utf-8")
    assert (tmp_path / "storyreel.prom").is_file()  # the metrics with it
    obs.tick()
    assert obs.writes == 3


def test_report_writer_write_nothing_while_nothing_changes(tmp_path: Path) -> None:
    now = [0.0]
    (tmp_path / "outbox").mkdir()
    obs = observed(tmp_path, now, interval=1.0)
    obs.tick()
    files = [tmp_path / "outbox" / "index.html", tmp_path / "storyreel.prom"]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]
    for _ in range(20):  # an idle daemon's turns
        now[0] += 10.0
        obs.tick()
        assert obs.next_deadline() is None  # nothing pending: no reason to wake the loop
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files] == before
    assert obs.writes == 1


def test_report_writer_survive_an_outbox_that_is_gone(tmp_path: Path) -> None:
    now = [0.0]
    obs = observed(tmp_path, now, interval=1.0)  # no outbox folder
    obs.changed({"activity": "idle"})
    obs.tick()  # no exception: the page is output, not the work
    assert obs.writes == 0 and obs.throttle.pending
    (tmp_path / "outbox").mkdir()
    now[0] = 2.0
    obs.tick()
    assert obs.writes == 1 and (tmp_path / "outbox" / "index.html").exists()


def test_no_page_onto_an_outbox_that_is_not_the_share(tmp_path: Path) -> None:
    """A share unmounted leaves a bare mount point: no page there; the metrics still say waiting."""
    now, ok = [0.0], [False]
    (tmp_path / "outbox").mkdir()
    obs = observed(tmp_path, now, interval=1.0, outbox_ok=ok)
    obs.changed({"activity": "waiting", "waiting": "outbox is not mounted"})
    obs.tick()
    assert not (tmp_path / "outbox" / "index.html").exists() and obs.writes == 0
    assert 'storyreel_daemon_state{storyreel_daemon_state="waiting"} 1.0' in (
        tmp_path / "storyreel.prom"
    ).read_text("utf-8")
    now[0] = 5.0
    obs.tick()
    assert obs.writes == 0  # still not
    ok[0] = True
    obs.tick()  # the share is back: the page it missed
    assert obs.writes == 1 and "outbox is not mounted" in (tmp_path / "outbox" / "index.html").read_text()


@pytest.mark.parametrize("name", ["index.html", "INDEX.HTML", ".storyreel"])
def test_the_page_is_never_a_story(name: str) -> None:
    assert is_reserved(name)
    assert not is_candidate_name(name)
    assert not is_reserved("index")


def test_read_snapshot_from_the_spool(tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    for folder in (inbox, outbox):
        folder.mkdir()
    spool = Spool(tmp_path / "state", inbox)
    spool.open()
    claims = []
    for i, title in enumerate(["Running one", HOSTILE, "Last"]):
        src = inbox / f"s{i}.json"
        src.write_text(json.dumps({"title": title, "scenes": ["a", "b", "c"]}))
        st = src.stat()
        claims.append(spool.claim(src, Identity(src.name, st.st_size, st.st_mtime_ns, st.st_ino), f"s{i}"))
    png(claims[0].work / "out" / "images" / "scene_001.png", 1)
    current = {"activity": "processing", "story": "s0", "scene": 2, "scenes": 3, "eta_seconds": 9}
    write_current(spool.state, current)
    (outbox / "old").mkdir()
    (outbox / "old" / "story.json").write_text(json.dumps({"title": "Old", "scenes": ["x"]}))
    (outbox / "old.zip").write_bytes(b"zip")
    ident = Identity("old.json", 1, 1, 1)
    spool.remember(ident, "old", "done", outputs={"folder": "old", "zip": "old.zip", "film": "old/film.mp4"})
    append_status(outbox, "old", "done", 1, 1)
    append_status(outbox, "broke", "failed", 0, 2, error="no scenes")
    spool.remember(Identity("broke.json", 1, 2, 3), "broke", "failed", error="no scenes", kept="/nope.json")
    snap = page_view(read_snapshot(spool.state, spool.claims(), 20, now=WHEN), outbox)
    spool.close()
    assert snap.state == "running" and snap.current is not None
    assert (snap.current.name, snap.current.title, snap.current.scene, snap.current.scenes) == (
        "s0",
        "Running one",
        2,
        3,
    )
    assert [t.number for t in snap.current.finished] == [1]
    assert [(q.name, q.title, q.scenes) for q in snap.queue] == [("s1", HOSTILE, 3), ("s2", "Last", 3)]
    broke, old = snap.results
    assert (broke.state, broke.error, broke.scenes) == ("failed", "no scenes", 2)
    assert (old.state, old.title, old.zip, old.folder) == ("done", "Old", "old.zip", "old")
    assert old.film is None and old.poster is None  # listed in history, gone from the outbox: no broken link
    assert snap.live and os.getpid() == json.loads((spool.state / "current.json").read_text())["pid"]


def test_a_killed_writers_temporaries_are_removed_at_start(tmp_path: Path) -> None:
    """kill -9 mid-write leaves `.index.html.PID.part`; the next start removes it, and nothing else
    (seen in test_kill_9_at_random_points_then_restart under load)."""
    from daemon.report.page import clean_stale_temps

    keep = [tmp_path / "index.html", tmp_path / ".story.abc.staging", tmp_path / ".storyreel" / "page.css"]
    stale = [
        tmp_path / ".index.html.123.part",
        tmp_path / ".storyreel" / "thumbs" / "a" / ".scene_001.jpg.9.part",
    ]
    for path in keep + stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert clean_stale_temps(tmp_path) == 2
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
