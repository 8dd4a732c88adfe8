"""Claim, extract and check a story bundle of 100 pictures (issue 22).

    python bench/bundle_extract.py [--images 100] [--size 1600x1200] [--repeat 3] [--dir DIR]

The bundle is story.json plus N JPEGs (painted by examples/make_bundle.py, varied per
picture), stored as cameras' JPEGs are zipped (no deflate: they are compressed already).
Each row is the best of --repeat runs, wall time on this machine:

- the claim's look (`inspect_bundle`: the listing checked, story.json read and validated,
  every named file found; nothing inflated but story.json, nothing written);
- the run's extraction (`extract_bundle`: every entry inflated under the byte budget, the
  named files written and hashed, every picture decoded, turned upright, converted to sRGB);
- side by side, the naive baseline: `zipfile.extractall` and a plain Pillow decode of each
  picture, with none of the checks;
- and, for scale, loading and fitting every picture to 1024x768 (what each provided scene
  costs later, at render time).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import make_bundle  # noqa: E402  (examples/make_bundle.py: the painted pictures)

from pipeline.bundle import extract_bundle, inspect_bundle  # noqa: E402
from pipeline.bundle.pictures import fit_picture  # noqa: E402
from pipeline.settings import LimitsSettings  # noqa: E402


def build(path: Path, images: int, width: int, height: int) -> int:
    """The bundle; returns the bytes of its pictures."""
    painters = list(make_bundle.PAINTERS.values())
    bases = [np.asarray(p(width, height, np.random.default_rng(i))) for i, p in enumerate(painters * 3)]
    story = {"title": "bench", "scenes": [{"description": f"scene {i}", "image": f"pictures/{i:03d}.jpg"}
                                          for i in range(images)]}  # fmt: skip
    total = 0
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("bench/story.json", json.dumps(story), compress_type=zipfile.ZIP_DEFLATED)
        for i in range(images):
            arr = np.roll(bases[i % len(bases)], shift=(7 * i) % width, axis=1)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            total += buf.tell()
            zf.writestr(f"bench/pictures/{i:03d}.jpg", buf.getvalue(), compress_type=zipfile.ZIP_STORED)
    return total


def best(repeat: int, run: Callable[[Path], object], scratch: Path) -> float:
    times = []
    for k in range(repeat):
        target = scratch / f"run{k}"
        started = time.perf_counter()
        run(target)
        times.append(time.perf_counter() - started)
        shutil.rmtree(target, ignore_errors=True)
    return min(times)


def naive(zip_path: Path, target: Path) -> None:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(target)
    for path in sorted(target.rglob("*.jpg")):
        with Image.open(path) as im:
            im.load()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", default="1600x1200", help="each picture's size, WxH")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to work (default: a temp folder)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    limits = LimitsSettings()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        scratch = Path(tmp)
        zip_path = scratch / "bench.zip"
        t0 = time.perf_counter()
        pictures = build(zip_path, args.images, width, height)
        built = time.perf_counter() - t0
        claim = best(args.repeat, lambda _t: inspect_bundle(zip_path, limits), scratch)
        extract = best(args.repeat, lambda t: extract_bundle(zip_path, t, limits), scratch)
        baseline = best(args.repeat, lambda t: naive(zip_path, t), scratch)
        kept = extract_bundle(zip_path, scratch / "kept", limits)
        started = time.perf_counter()
        for f in kept.files.values():
            fit_picture(kept.path(f.path), 1024, 768).image()
        fitting = time.perf_counter() - started
    n = args.images
    print(f"bundle: {n} JPEGs of {width}x{height}, {pictures / 1e6:.1f} MB of pictures, stored "
          f"(built in {built:.1f} s); best of {args.repeat}\n")  # fmt: skip
    print("| step | seconds | ms per picture | vs naive baseline |")
    print("|---|---:|---:|---:|")
    rows = [
        ("claim: inspect_bundle (listing, story.json, names)", claim),
        ("run: extract_bundle (budgeted inflate, write, sha256, decode, EXIF, sRGB)", extract),
        ("claim + run", claim + extract),
        ("naive baseline: zipfile.extractall + Pillow decode, no checks", baseline),
        ("for scale: load and fit every picture to 1024x768 (Lanczos, once each)", fitting),
    ]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.3f} | {1000 * seconds / n:.2f} | {seconds / baseline:.2f}x |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak resident memory of this process: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
