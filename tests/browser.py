"""Headless Chromium for page tests: a screenshot, and what a small script sees in the page.

Debian's `chromium` is installed by `make browser` (run by .ci/run). Where it is
missing the browser tests skip, except under CI, where that is a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--allow-file-access-from-files",
]

# Appended to a copy of the page (the page itself has no script): waits for every image and
# the video to load or fail, then writes what a person would see into <pre id="check">.
CHECK = """
<script>
(async () => {
  const out = document.createElement("pre");
  out.id = "check";
  const settle = (el, ok, bad) => new Promise(res => {
    el.addEventListener(ok, () => res(), {once: true});
    el.addEventListener(bad, () => res(), {once: true});
  });
  const imgs = [...document.images];
  const vids = [...document.querySelectorAll("video")];
  await Promise.all([
    ...imgs.filter(i => !i.complete).map(i => settle(i, "load", "error")),
    ...vids.filter(v => v.readyState < 2).map(v => settle(v, "loadeddata", "error")),
  ]);
  const bar = document.querySelector("[role=progressbar]");
  const fill = bar && bar.querySelector(".fill");
  out.textContent = JSON.stringify({
    title: document.title,
    text: document.body.innerText,
    scripts: document.querySelectorAll("script").length,
    state: (document.getElementById("daemon-state") || {}).innerText || "",
    images: imgs.map(i => ({src: i.getAttribute("src"), width: i.naturalWidth, shown: i.clientWidth})),
    videos: vids.map(v => ({src: v.getAttribute("src"), ready: v.readyState, duration: v.duration,
                            error: v.error && v.error.code, width: v.videoWidth})),
    bar: bar && {now: bar.getAttribute("aria-valuenow"), max: bar.getAttribute("aria-valuemax"),
                 fraction: fill.getBoundingClientRect().width / bar.getBoundingClientRect().width},
    scroll_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
  });
  document.body.appendChild(out);
})();
</script>
"""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it with `make browser`")
        pytest.skip("chromium is not installed (make browser)")
    return path


def _run(args: list[str], profile: Path) -> str:
    cmd = [chromium_path(), *FLAGS, f"--user-data-dir={profile}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, out: Path, size: tuple[int, int], profile: Path) -> Path:
    _run([f"--screenshot={out}", f"--window-size={size[0]},{size[1]}", page.as_uri()], profile)
    assert out.is_file(), f"no screenshot at {out}"
    return out


def inspect(page: Path, size: tuple[int, int], profile: Path) -> dict[str, Any]:
    """Open a copy of `page` beside it, with the check script, and return what the script saw."""
    probe = page.with_name(".check-" + page.name)
    source = page.read_text("utf-8")
    # The page's own reload would restart the probe: it is reported, then left out of the copy.
    refresh = re.compile(r'<meta http-equiv="refresh"[^>]*>')
    probe.write_text(refresh.sub("", source).replace("</body>", CHECK + "</body>"), "utf-8")
    window = f"--window-size={size[0]},{size[1]}"
    try:
        dom = _run(["--dump-dom", "--virtual-time-budget=20000", window, probe.as_uri()], profile)
    finally:
        probe.unlink()
    found = re.search(r'<pre id="check">(.*?)</pre>', dom, re.S)
    assert found, "the check script did not finish: " + dom[-1500:]
    result: dict[str, Any] = json.loads(html.unescape(found.group(1)))
    result["refresh"] = bool(refresh.search(source))
    return result
