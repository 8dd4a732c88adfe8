"""`make test`'s order: tests handed out longest first, by the last run's durations."""

from __future__ import annotations

from typing import Any

import pytest

# Where the last run's test durations are kept (pytest's cache, .pytest_cache/): see `_longest_first`.
DURATIONS = "storyreel/durations"


def longest_first(items: list[pytest.Item], last: dict[str, float]) -> None:
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
