"""examples/make_bundle.py: the demo's bundle is valid, the same every time, and real pictures."""

from __future__ import annotations

import itertools
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

from pipeline.bundle import extract_bundle
from pipeline.bundle.pictures import fit_picture
from pipeline.settings import LimitsSettings

from conftest import REPO

SCRIPT = REPO / "examples" / "make_bundle.py"


def make(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_example_bundle_is_valid_and_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    done = make(first, "--size", "600x400")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{first}: 4 scenes with their own pictures"
    assert make(second, "--size", "600x400").returncode == 0
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as zf:
        assert all(n.startswith("own-pictures/") for n in zf.namelist())
    bundle = extract_bundle(first, tmp_path / "x", LimitsSettings())
    names = ("01-dawn.jpg", "02-ridges.jpg", "03-sunset.jpg", "04-night.jpg")
    assert [s.image for s in bundle.story.scenes] == [f"pictures/{n}" for n in names]
    assert bundle.story.characters["Mara"].image == "people/mara.png"
    assert bundle.story.music == "music/theme.wav" and bundle.files["music/theme.wav"].picture is None
    assert [bool(s.narration) for s in bundle.story.scenes] == [True, False, True, True]
    sizes = {p: (f.picture.width, f.picture.height) for p, f in bundle.files.items() if f.picture}
    assert sizes["people/mara.png"] == (300, 400) and sizes["pictures/01-dawn.jpg"] == (600, 400)


def test_example_pictures_are_pictures_not_noise(tmp_path: Path) -> None:
    """Smooth regions and edges (little pixel-to-pixel change against the spread of values),
    colour, and every scene different from every other: what the tiny model's noise is not."""
    assert make(tmp_path / "a.zip", "--size", "480x320").returncode == 0
    bundle = extract_bundle(tmp_path / "a.zip", tmp_path / "x", LimitsSettings())
    pics = {
        p: np.asarray(fit_picture(bundle.path(p), 256, 192).image()).astype(float)
        for p, f in bundle.files.items()
        if f.picture
    }

    def smooth(arr: np.ndarray) -> bool:
        return bool(np.abs(np.diff(arr, axis=1)).mean() < 0.25 * arr.std())

    assert all(smooth(arr) for arr in pics.values())
    assert not smooth(
        np.random.default_rng(0).integers(0, 256, (192, 256, 3)).astype(float)
    )  # the measure tells
    for arr in pics.values():
        assert np.abs(arr[..., 0] - arr[..., 2]).mean() > 8  # coloured, not grey
    for a, b in itertools.combinations(pics.values(), 2):
        assert np.abs(a - b).mean() > 20


def test_make_bundle_refuses_a_missing_folder(tmp_path: Path) -> None:
    done = make(tmp_path / "nowhere" / "a.zip")
    assert done.returncode == 2 and "no such folder; create it first" in done.stderr
