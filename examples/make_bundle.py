"""Build the example story bundle: a story.json and pictures drawn here, in code, zipped.

    python examples/make_bundle.py OUT.zip [--size 1200x800]

The pictures are painted with numpy from a fixed seed (sky gradients, fractal ridgelines,
a sea with a sun's glitter, a lighthouse, a harbour at night, a portrait of the keeper), so
a newcomer without model weights sees real pictures move in `make demo`, and nothing here
is a downloaded file with a licence to track. The same command writes the same bytes.

Three scenes are narrated (spoken by the box's voice: espeak-ng in the demo) over music made
here too (a slow chord on a pulse, `theme`), which the film loops, ducks under the voice and
brings to the loudness target.

Scene pictures are 3:2 JPEGs, as a camera writes them, so the cover fit to the demo's
4:3 `[image]` size visibly crops them; the keeper is a 3:4 portrait PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import wave
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FIXED_TIME = (2026, 1, 1, 12, 0, 0)  # every entry's timestamp: the same bytes on every run

STORY = {
    "title": "The Keeper's Own Pictures",
    "style": "painted light, quiet coast",
    "characters": {
        "Mara": {"description": "the lighthouse keeper, yellow raincoat", "image": "people/mara.png"}
    },
    "music": "music/theme.wav",
    "scenes": [
        {"description": "The coast at dawn, the lighthouse on its rock",
         "image": "pictures/01-dawn.jpg", "motion": "zoom_in",
         "narration": "Every morning the lighthouse woke before the town."},
        {"description": "Mountains behind the bay, first light on the ridges",
         "image": "pictures/02-ridges.jpg", "motion": "pan_right"},
        {"description": "Mara looks out to sea", "image": "pictures/03-sunset.jpg", "motion": "zoom_out",
         "narration": "Mara kept the lamp for forty years. She never missed a night."},
        {"description": "The harbour at night under the stars", "image": "pictures/04-night.jpg",
         "motion": "pan_left", "narration": "And the boats came home."},
    ],
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Painting helpers


def gradient(h: int, w: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> np.ndarray:
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    return (np.array(top, float) * (1 - t) + np.array(bottom, float) * t) * np.ones((1, w, 1))


def ridge(w: int, rng: np.random.Generator, roughness: float = 0.55, octaves: int = 8) -> np.ndarray:
    """A 1-D fractal line (midpoint-style sum of octaves), values in about [-1, 1]."""
    x = np.linspace(0.0, 1.0, w)
    line = np.zeros(w)
    amp = 1.0
    for octave in range(octaves):
        knots = 2 ** (octave + 1) + 1
        line += amp * np.interp(x, np.linspace(0.0, 1.0, knots), rng.uniform(-1.0, 1.0, knots))
        amp *= roughness
    return line / 2.0


def fill_below(
    img: np.ndarray, heights: np.ndarray, colour: tuple[int, int, int], haze: float = 0.0, bottom: float = 1e9
) -> None:
    """Paint below a per-column skyline (down to `bottom`), faded towards the sky by `haze`."""
    h = img.shape[0]
    rows = np.arange(h)[:, None]
    mask = (rows >= heights[None, :]) & (rows < bottom)
    tint = np.array(colour, float) * (1 - haze) + img[max(0, int(heights.min()) - 1)].mean(axis=0) * haze
    img[mask] = tint


def sun_disc(img: np.ndarray, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    h, w = img.shape[:2]
    y, x = np.mgrid[0:h, 0:w]
    d = np.hypot(x - cx, y - cy)
    glow = np.clip(1.0 - d / (r * 6.0), 0.0, 1.0) ** 2 * 0.6
    img += (np.array(colour, float) - img) * glow[..., None]
    img[d < r] = colour


def sea(img: np.ndarray, horizon: int, rng: np.random.Generator, glitter_x: float | None) -> None:
    """Darker water below the horizon, wave bands, and a sun's glitter path where there is a sun."""
    h, w = img.shape[:2]
    rows = np.arange(horizon, h)
    depth = (rows - horizon) / max(1, h - horizon)
    sky_at_horizon = img[horizon - 1].copy()
    water = (
        sky_at_horizon[None, :, :] * (0.55 - 0.3 * depth[:, None, None])
        + np.array([5, 25, 45.0]) * depth[:, None, None]
    )
    waves = np.sin(
        rows[:, None] * (0.9 + 3.0 * depth[:, None]) + rng.uniform(0, 6, (1, w)) * 0.4 + np.arange(w) * 0.02
    )
    water *= 1.0 + 0.06 * waves[..., None]
    if glitter_x is not None:
        spread = 20 + 260 * depth[:, None]
        path = np.exp(-(((np.arange(w)[None, :] - glitter_x) / spread) ** 2))
        sparkle = (rng.random((len(rows), w)) > 0.82) * path
        water += sparkle[..., None] * np.array([120, 100, 60.0])
    img[horizon:] = water


def to_image(img: np.ndarray, grain: float, rng: np.random.Generator) -> Image.Image:
    noisy = img + rng.normal(0.0, grain, img.shape[:2])[..., None]
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# The pictures


def mound(w: int, centre: float, half: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """How far a rock rises above its base per column: a rough dome, 0 outside it."""
    u = (np.arange(w) / w - centre) / half
    dome = np.clip(1.0 - u**2, 0.0, None) ** 0.6
    return height * dome * (1.0 + 0.15 * ridge(w, rng, 0.5, 6)) * (dome > 0)


def dawn(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = gradient(h, w, (58, 70, 120), (250, 180, 140))
    horizon = int(h * 0.62)
    sun_disc(img, w * 0.68, horizon - h * 0.04, h * 0.05, (255, 236, 200))
    sea(img, horizon, rng, w * 0.68)
    rock = mound(w, 0.27, 0.16, h * 0.12, rng)
    fill_below(
        img, np.where(rock > 0, horizon + h * 0.03 - rock, h + 1), (30, 28, 34), bottom=horizon + h * 0.05
    )
    pic = to_image(img, 2.0, rng)
    draw = ImageDraw.Draw(pic)
    x = int(w * 0.27)
    base, top = horizon + h * 0.03 - rock[x] + 6, int(h * 0.22)
    half_b, half_t = w * 0.022, w * 0.014
    draw.polygon(
        [(x - half_b, base), (x + half_b, base), (x + half_t, top), (x - half_t, top)], (236, 232, 226)
    )
    for k in range(3):  # red bands
        y0 = top + (base - top) * (0.2 + 0.25 * k)
        draw.rectangle([x - half_b, y0, x + half_b, y0 + (base - top) * 0.08], (178, 40, 40))
    draw.rectangle([x - half_t - 3, top - h * 0.05, x + half_t + 3, top], (40, 40, 46))
    draw.ellipse([x - 7, top - h * 0.04, x + 7, top - h * 0.04 + 14], (255, 240, 170))
    draw.polygon(
        [(x, top - h * 0.033), (w * 0.02, top - h * 0.12), (w * 0.02, top + h * 0.04)], (255, 240, 190)
    )
    return pic.filter(ImageFilter.GaussianBlur(0.6))


def ridges(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = gradient(h, w, (150, 175, 210), (245, 215, 185))
    sun_disc(img, w * 0.25, h * 0.3, h * 0.04, (255, 245, 225))
    layers = [(0.42, (120, 130, 160), 0.55), (0.52, (90, 100, 130), 0.35), (0.62, (60, 70, 95), 0.15),
              (0.74, (35, 42, 55), 0.0)]  # fmt: skip
    for level, colour, haze in layers:
        line = h * level - h * 0.12 * ridge(w, rng, 0.58, 9)
        fill_below(img, line, colour, haze)
    return to_image(img, 2.5, rng)


def sunset(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = gradient(h, w, (40, 30, 80), (255, 120, 60))
    horizon = int(h * 0.58)
    sun_disc(img, w * 0.62, horizon - h * 0.02, h * 0.07, (255, 210, 120))
    sea(img, horizon, rng, w * 0.62)
    slope = np.clip(np.linspace(1.3, -0.4, w), 0, 1) ** 1.5
    cliff = horizon - h * 0.08 - h * 0.2 * slope + h * 0.015 * ridge(w, rng, 0.6, 7)
    fill_below(img, np.where(np.arange(w) < w * 0.42, cliff, h + 1), (25, 18, 30))
    pic = to_image(img, 2.0, rng)
    draw = ImageDraw.Draw(pic)
    fx = int(w * 0.34)  # a figure on the cliff top, looking out to sea
    fy, s = float(cliff[fx - 20 : fx + 20].min()) + 4, h / 400
    draw.ellipse([fx - 9 * s, fy - 62 * s, fx + 9 * s, fy - 44 * s], (20, 14, 22))
    body = [(fx - 12 * s, fy - 44 * s), (fx + 12 * s, fy - 44 * s), (fx + 17 * s, fy), (fx - 17 * s, fy)]
    draw.polygon(body, (20, 14, 22))
    return pic


def night(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = gradient(h, w, (6, 10, 30), (30, 44, 80))
    stars = rng.random((h, w)) > 0.9985
    stars[int(h * 0.6) :] = False
    img[stars] = 255
    sun_disc(img, w * 0.8, h * 0.18, h * 0.045, (240, 240, 225))
    horizon = int(h * 0.64)
    sea(img, horizon, rng, w * 0.8)
    pic = to_image(img, 1.5, rng)
    draw = ImageDraw.Draw(pic)
    for i in range(5):  # boats with a lamp each
        bx, by = w * (0.1 + 0.16 * i), horizon + h * (0.06 + 0.05 * (i % 2))
        draw.polygon([(bx - 40, by), (bx + 40, by), (bx + 28, by + 16), (bx - 28, by + 16)], (14, 14, 20))
        draw.line([(bx, by), (bx, by - 60)], (14, 14, 20), 3)
        draw.ellipse([bx - 4, by - 68, bx + 4, by - 60], (255, 210, 120))
    for i in range(12):  # houses along the quay
        x0 = w * 0.02 + i * w * 0.08
        roof = horizon - h * (0.08 + 0.04 * ((i * 7) % 3))
        draw.rectangle([x0, roof, x0 + w * 0.07, horizon], (20, 22, 34))
        draw.rectangle([x0 + w * 0.025, roof + 12, x0 + w * 0.04, roof + 26], (250, 200, 110))
    return pic


def portrait(w: int, h: int, rng: np.random.Generator) -> Image.Image:
    img = gradient(h, w, (180, 200, 215), (120, 140, 160))
    pic = to_image(img, 1.5, rng)
    draw = ImageDraw.Draw(pic)
    cx = w / 2
    draw.ellipse([cx - w * 0.42, h * 0.55, cx + w * 0.42, h * 1.25], (235, 190, 40))  # yellow raincoat
    draw.rectangle([cx - w * 0.07, h * 0.45, cx + w * 0.07, h * 0.6], (214, 170, 140))  # neck
    draw.ellipse([cx - w * 0.2, h * 0.16, cx + w * 0.2, h * 0.5], (224, 182, 150))  # face
    draw.pieslice(
        [cx - w * 0.22, h * 0.12, cx + w * 0.22, h * 0.46], 180, 360, (205, 205, 210)
    )  # silver hair
    draw.line([(cx + w * 0.16, h * 0.3), (cx + w * 0.24, h * 0.62)], (205, 205, 210), int(w * 0.05))  # braid
    for ex in (-0.08, 0.08):
        draw.ellipse([cx + w * ex - 8, h * 0.31 - 5, cx + w * ex + 8, h * 0.31 + 5], (50, 60, 70))
    draw.arc([cx - w * 0.07, h * 0.36, cx + w * 0.07, h * 0.43], 20, 160, (150, 80, 70), 3)
    return pic.filter(ImageFilter.GaussianBlur(0.8))


PAINTERS = {"01-dawn": dawn, "02-ridges": ridges, "03-sunset": sunset, "04-night": night}


def pictures(width: int, height: int, seed: int = 2026) -> dict[str, Image.Image]:
    """Every picture of the example, keyed by its path in the bundle; the same for the same seed."""
    out = {f"pictures/{name}.jpg": paint(width, height, np.random.default_rng(seed + i))
           for i, (name, paint) in enumerate(PAINTERS.items())}  # fmt: skip
    out["people/mara.png"] = portrait(height * 3 // 4, height, np.random.default_rng(seed + 99))
    return out


def theme(seconds: float = 12.0, rate: int = 44_100) -> bytes:
    """A quiet 16-bit stereo WAV: a slow A minor - F - C - G chord on a soft pulse, the same bytes
    every run (no random numbers), so the demo's music is ours and has no licence to track."""
    t = np.arange(round(seconds * rate)) / rate
    chords = [
        (220.0, 261.63, 329.63),
        (174.61, 220.0, 261.63),
        (261.63, 329.63, 392.0),
        (196.0, 246.94, 293.66),
    ]
    bar = seconds / len(chords)
    x = np.zeros_like(t)
    for k, chord in enumerate(chords):
        on = (t >= k * bar) & (t < (k + 1) * bar)
        env = np.sin(np.pi * (t[on] - k * bar) / bar) ** 0.5
        x[on] = env * sum(np.sin(2 * np.pi * f * t[on]) for f in chord) / len(chord)
    x *= 0.6 + 0.4 * np.cos(2 * np.pi * 2.0 * t) ** 2  # the pulse, two a second
    left, right = 0.3 * x, 0.3 * np.roll(x, rate // 100)  # a little width
    pcm = (np.stack([left, right], axis=1) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def encoded(path: str, picture: Image.Image) -> bytes:
    buf = io.BytesIO()
    if path.endswith(".jpg"):
        picture.save(buf, "JPEG", quality=90, optimize=False)
    else:
        picture.save(buf, "PNG")
    return buf.getvalue()


def build(out: Path, width: int = 1200, height: int = 800) -> Path:
    """Write the example bundle to `out` (story.json and the pictures inside one top folder)."""
    files = {"story.json": (json.dumps(STORY, indent=2, ensure_ascii=False) + "\n").encode()}
    files |= {path: encoded(path, pic) for path, pic in pictures(width, height).items()}
    files["music/theme.wav"] = theme()
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            info = zipfile.ZipInfo(f"own-pictures/{path}", FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED if path.endswith(".json") else zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the bundle to write, e.g. demo/inbox/04-own-pictures.zip")
    parser.add_argument("--size", default="1200x800", help="the scene pictures' size, WxH (default 1200x800)")
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        parser.error(f"--size {args.size}: give WIDTHxHEIGHT, e.g. 1200x800")
    if not args.out.parent.is_dir():
        parser.error(f"{args.out.parent}: no such folder; create it first")
    build(args.out, width, height)
    print(f"{args.out}: {len(PAINTERS)} scenes with their own pictures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
