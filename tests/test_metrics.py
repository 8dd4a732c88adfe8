"""The metrics textfile, parsed back with prometheus_client's own parser."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.queue import history
from daemon.queue.claim import Identity
from daemon.queue.sidecar import append_status
from daemon.queue.spool import Spool
from daemon.report.metrics import Metrics
from daemon.report.page import InProgress, PageSnapshot, Queued
from pipeline.settings import ConfigError, settings_from_dict


def samples(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(path.read_text("utf-8")):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def mixed_history(root: Path) -> tuple[Path, Path]:
    """A state folder and outbox as a run of mixed stories leaves them: history lines and sidecars."""
    state, outbox, inbox = root / "state", root / "outbox", root / "inbox"
    for folder in (outbox, inbox):
        folder.mkdir(parents=True)
    spool = Spool(state, inbox)
    spool.open()
    for i, (state_, n) in enumerate([("done", 2), ("failed", 3), ("done", 4), ("failed", 0), ("done", 1)]):
        name = f"s{i}"
        append_status(outbox, name, "queued", 0, n)
        append_status(outbox, name, state_, n if state_ == "done" else 0, n)
        images = [f"{name}/images/scene_{k:03d}.png" for k in range(1, n + 1)]
        extra = {"outputs": {"images": images}} if state_ == "done" else {"error": "bad"}
        spool.remember(Identity(f"{name}.json", i, i, i), name, state_, **extra)
    spool.close()
    return state, outbox


def sidecar_counts(outbox: Path) -> tuple[dict[str, int], int]:
    outcomes: dict[str, int] = {}
    scenes = 0
    for sidecar in outbox.glob("*.status.jsonl"):
        last = json.loads(sidecar.read_text().splitlines()[-1])
        outcomes[last["state"]] = outcomes.get(last["state"], 0) + 1
        scenes += last["scenes"] if last["state"] == "done" else 0
    return outcomes, scenes


def test_counters_equal_the_sidecars_and_survive_restarts_and_compaction(tmp_path: Path) -> None:
    state, outbox = mixed_history(tmp_path)
    prom = tmp_path / "node" / "storyreel.prom"
    prom.parent.mkdir()
    outcomes, scenes = sidecar_counts(outbox)
    assert outcomes == {"done": 3, "failed": 2} and scenes == 7

    for start in (1, 2):  # a restart recomputes the same totals
        m = Metrics(prom)
        m.start(state)
        assert m.write()
        found = samples(prom)
        assert value(found, "storyreel_stories_total", outcome="done") == 3
        assert value(found, "storyreel_stories_total", outcome="failed") == 2
        assert value(found, "storyreel_stories_total", outcome="cancelled") == 0
        assert value(found, "storyreel_scenes_total") == 7
        assert value(found, "storyreel_starts_total") == start
    assert history.compact(state / "history.jsonl", tmp_path / "inbox", keep=1, over_bytes=0) == 4
    m = Metrics(prom)
    m.start(state)
    m.write()
    assert value(samples(prom), "storyreel_stories_total", outcome="done") == 3
    assert value(samples(prom), "storyreel_scenes_total") == 7
    m.story_ended("done", scenes=5)  # one more while running
    m.write()
    assert value(samples(prom), "storyreel_stories_total", outcome="done") == 4
    assert value(samples(prom), "storyreel_scenes_total") == 12
    assert not [p for p in prom.parent.iterdir() if p != prom]  # no temporary file left


def test_histograms_gauges_state_and_vram(tmp_path: Path) -> None:
    now = [1_000_000.0]
    prom = tmp_path / "s.prom"
    m = Metrics(prom, clock=lambda: now[0])
    m.start(tmp_path)
    for image, clip in ((3.0, 0.4), (7.0, 1.5), (40.0, 2.5)):
        m.scene_timed(image, clip)
    m.oom_retry()
    claimed = datetime.fromtimestamp(now[0] - 600, UTC)
    snap = PageSnapshot(
        datetime.fromtimestamp(now[0], UTC),
        "waiting",
        "outbox full",
        current=InProgress("a", "", 1, 2),
        queue=(Queued("b", since=claimed), Queued("c", since=datetime.fromtimestamp(now[0], UTC))),
    )
    m.observe(snap)
    m.write()
    found = samples(prom)
    assert "storyreel_vram_peak_bytes" not in {k[0] for k in found}  # no CUDA: not shown at all
    assert value(found, "storyreel_image_seconds_count") == 3
    assert value(found, "storyreel_image_seconds_sum") == 50.0
    assert value(found, "storyreel_image_seconds_bucket", le="5.0") == 1
    assert value(found, "storyreel_clip_seconds_bucket", le="2.0") == 2
    assert value(found, "storyreel_oom_retries_total") == 1
    assert value(found, "storyreel_queue_length") == 2
    assert value(found, "storyreel_oldest_queued_timestamp_seconds") == now[0] - 600
    assert value(found, "storyreel_oldest_queued_age_seconds") == 600
    assert value(found, "storyreel_daemon_state", storyreel_daemon_state="waiting") == 1
    assert value(found, "storyreel_daemon_state", storyreel_daemon_state="running") == 0
    now[0] += 60
    m.vram_peak(123 << 20)  # what the worker reports on CUDA
    m.write()
    found = samples(prom)
    assert value(found, "storyreel_vram_peak_bytes") == 123 << 20
    assert value(found, "storyreel_oldest_queued_age_seconds") == 660


def test_off_by_default_and_a_missing_folder_is_not_fatal(tmp_path: Path) -> None:
    m = Metrics("")
    m.start(tmp_path)
    assert not m.write()
    assert [p.name for p in tmp_path.iterdir()] == ["starts"]
    assert not Metrics(tmp_path / "gone" / "s.prom").write()  # logged, not raised


def test_textfile_must_be_a_prom_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"metrics.textfile: must end in .prom"):
        settings_from_dict({"metrics": {"textfile": "/tmp/storyreel.txt"}}, tmp_path)
