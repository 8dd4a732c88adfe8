"""Numbers for the sysadmin's graphs: a Prometheus textfile for node_exporter.

The unit runs with PrivateNetwork=yes, so there is no port to scrape: when
`[metrics] textfile` is set, the daemon writes the Prometheus text format to that
file with `prometheus_client.write_to_textfile` (a temporary name, then a
rename), and node_exporter's textfile collector serves it. The registry is this
object's own, never the library's global one.

Restarts and counters. `storyreel_stories_total{outcome}` and
`storyreel_scenes_total` (scenes of published stories) are recomputed at every
start from `state/history.jsonl`, the local truth, so they always equal what the
sidecars say and survive restarts and history compaction (see daemon/queue/history.py).
The histograms and `storyreel_oom_retries_total` count this process only and
start again from zero at a restart, as Prometheus counters may (`rate()` and
`increase()` handle that). `storyreel_starts_total` is kept in `state/starts`.

Idle, nothing is written: the report writer calls `write()` when something changed.
Ages are therefore also given as timestamps (`..._timestamp_seconds`), which stay
true between writes; alert rules should use those (see README).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import get_args

import structlog
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, write_to_textfile

from daemon.queue import history
from daemon.report.page import PageSnapshot
from daemon.report.snapshot import DaemonState
from pipeline.fsutil import atomic_write_bytes

log = structlog.get_logger("storyreel.metrics")

STATES = list(get_args(DaemonState))  # the page's states, the enum's values
OUTCOMES = ("done", "failed", "cancelled")
IMAGE_BUCKETS = (0.5, 1, 2, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600)
CLIP_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The daemon's metrics. Every method is cheap and never raises for a metrics problem."""

    def __init__(self, textfile: str | Path = "", clock: Callable[[], float] = time.time) -> None:
        self.path = Path(textfile) if textfile else None
        self.now = clock
        self._oldest = 0.0
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.stories = Counter("storyreel_stories", "Stories that ended, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:
            self.stories.labels(outcome=outcome)
        self.scenes = Counter("storyreel_scenes", "Scenes of published stories", registry=r)
        self.image_seconds = Histogram(
            "storyreel_image_seconds", "Seconds to generate one image", buckets=IMAGE_BUCKETS, registry=r
        )
        self.clip_seconds = Histogram(
            "storyreel_clip_seconds", "Seconds to finish and encode a clip", buckets=CLIP_BUCKETS, registry=r
        )
        self.queue_length = Gauge("storyreel_queue_length", "Stories waiting in the queue", registry=r)
        self.oldest_age = Gauge(
            "storyreel_oldest_queued_age_seconds", "Age of the oldest waiting story when written", registry=r
        )
        self.oldest_time = Gauge(
            "storyreel_oldest_queued_timestamp_seconds",
            "When the oldest waiting story was claimed (Unix time); 0 when the queue is empty",
            registry=r,
        )
        self.state = Enum("storyreel_daemon_state", "What the daemon is doing", states=STATES, registry=r)
        self.oom_retries = Counter(
            "storyreel_oom_retries", "Scenes retried after running out of GPU memory", registry=r
        )
        self.starts = Counter("storyreel_starts", "Times the daemon started", registry=r)
        self.start_time = Gauge("storyreel_start_time_seconds", "When this process started", registry=r)
        self.vram: Gauge | None = None  # registered on CUDA only, at the first peak reported

    # -- start ---------------------------------------------------------------------
    def start(self, state: Path) -> None:
        """Counters from history (the local truth), one more start counted; call once, lock held."""
        totals = history.totals(state / history.HISTORY)
        for outcome, n in totals.outcomes.items():
            if outcome != history.SUMMARY and n:
                self.stories.labels(outcome=outcome).inc(n)
        self.scenes.inc(totals.scenes)
        self.starts.inc(_count_start(state / "starts"))
        self.start_time.set(self.now())
        self.state.state("idle")

    # -- events --------------------------------------------------------------------
    def story_ended(self, outcome: str, scenes: int = 0) -> None:
        self.stories.labels(outcome=outcome).inc()
        if outcome == "done":
            self.scenes.inc(scenes)

    def scene_timed(self, image_seconds: float | None, clip_seconds: float | None) -> None:
        if image_seconds is not None:
            self.image_seconds.observe(image_seconds)
        if clip_seconds is not None:
            self.clip_seconds.observe(clip_seconds)

    def oom_retry(self) -> None:
        self.oom_retries.inc()

    def vram_peak(self, peak_bytes: int | None) -> None:
        """The allocator's peak on CUDA (`torch.cuda.max_memory_allocated()`); None elsewhere: not shown."""
        if peak_bytes is None:
            return
        if self.vram is None:
            self.vram = Gauge(
                "storyreel_vram_peak_bytes",
                "Peak GPU memory allocated by this process",
                registry=self.registry,
            )
        self.vram.set(peak_bytes)

    def observe(self, snapshot: PageSnapshot) -> None:
        """Queue and daemon state from the same snapshot the page shows."""
        self.state.state(snapshot.state)
        self.queue_length.set(len(snapshot.queue))
        since = [q.since.timestamp() for q in snapshot.queue if isinstance(q.since, datetime)]
        self._oldest = min(since, default=0.0)
        self.oldest_time.set(self._oldest)

    # -- output --------------------------------------------------------------------
    def write(self) -> bool:
        """Write the textfile if one is configured; a failure is logged, never raised."""
        if self.path is None:
            return False
        self.oldest_age.set(max(0.0, self.now() - self._oldest) if self._oldest else 0.0)  # as of this write
        try:
            write_to_textfile(str(self.path), self.registry)
        except OSError as err:
            log.warning("metrics not written", path=str(self.path), error=str(err))
            return False
        return True


def _count_start(path: Path) -> int:
    """Starts so far, this one included; kept in a small file (one write per start)."""
    before = 0
    with contextlib.suppress(OSError, ValueError):
        before = int(path.read_text().strip() or 0)
    with contextlib.suppress(OSError):
        atomic_write_bytes(path, f"{before + 1}\n".encode())
    return before + 1


def cuda_peak_bytes() -> int | None:
    """Peak VRAM of this process on CUDA, None where there is no CUDA (untested without a GPU)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())
