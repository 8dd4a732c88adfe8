"""Story bundles for tests: good ones made with zipfile, hostile ones with hand-built headers.

Real archives, never mocks: a good bundle is what zipfile (or macOS Finder) writes; a hostile
one is assembled byte by byte here (`RawEntry`, `write_raw_zip`) so its headers can lie about
sizes, flags, attributes and names in ways no well-behaved archiver would write. `HOSTILE`
names every hostile kind with a builder and the words its refusal must contain, so the
library tests and the daemon tests drive the same list.
"""

from __future__ import annotations

import io
import json
import stat
import struct
import subprocess
import tempfile
import wave
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------
# Media


def picture_bytes(width: int = 96, height: int = 64, fmt: str = "PNG", seed: int = 1, **save: Any) -> bytes:
    """A small picture with structure (gradients and a disc), so fits and crops can be checked."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = (255 * x / max(1, width - 1)).astype(np.uint8)
    rgb[..., 1] = (255 * y / max(1, height - 1)).astype(np.uint8)
    rgb[..., 2] = rng.integers(60, 200)
    disc = (x - width * 0.3) ** 2 + (y - height * 0.6) ** 2 < (min(width, height) * 0.2) ** 2
    rgb[disc] = (250, 250, 250)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **save)
    return buf.getvalue()


SOUND_ARGS = {
    "wav": ["-c:a", "pcm_s16le", "-f", "wav"],
    "flac": ["-c:a", "flac", "-f", "flac"],
    "mp3": ["-c:a", "libmp3lame", "-f", "mp3"],
    "m4a": ["-c:a", "aac", "-f", "ipod"],
    "aac": ["-c:a", "aac", "-f", "adts"],
    "ogg": ["-c:a", "libvorbis", "-f", "ogg"],
    "opus": ["-c:a", "libopus", "-f", "ogg"],
}


def sound_bytes(fmt: str = "wav", seconds: float = 1.0, freq: int = 440) -> bytes:
    """A sine tone of `seconds` in `fmt` (a key of SOUND_ARGS), encoded by ffmpeg (through a
    file: MP4's muxer seeks back to write its index)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"tone.{fmt}"
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error",
            "-f", "lavfi", "-i", f"sine=frequency={freq}:duration={seconds}:sample_rate=48000",
            *SOUND_ARGS[fmt], str(out),
        ]  # fmt: skip
        subprocess.run(cmd, capture_output=True, check=True, timeout=60)
        return out.read_bytes()


def wav_bytes(seconds: float, rate: int = 48000) -> bytes:
    """A 16-bit mono WAV tone, by Python's wave module (the plain 44-byte header)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(round(seconds * rate)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 12000).astype("<i2").tobytes())
    return buf.getvalue()


def mp3_claiming(seconds: float, claimed_seconds: float) -> bytes:
    """An MP3 of `seconds` whose LAME Info header's frame count says `claimed_seconds`: what
    a player reads from the header (ffmpeg's "Duration:" included) is the lie."""
    data = bytearray(sound_bytes("mp3", seconds))
    tag = max(data.find(b"Info"), data.find(b"Xing"))
    assert tag > 0 and struct.unpack(">I", data[tag + 4 : tag + 8])[0] & 1, "no frame count in the tag"
    data[tag + 8 : tag + 12] = struct.pack(">I", round(claimed_seconds * 48000 / 1152))
    return bytes(data)


# ----------------------------------------------------------------------------------------------
# Good bundles (zipfile)


def story_with_files(scenes: int = 2, tag: str = "b") -> dict[str, Any]:
    """A story whose scenes bring their own pictures, with a character known by picture."""
    return {
        "title": f"bundle {tag}",
        "characters": {"Mara": {"description": "a keeper", "image": "people/mara.jpg"}},
        "scenes": [
            {"description": f"Mara at dawn {i}", "image": f"images/scene{i}.png"} for i in range(scenes)
        ],
    }


def bundle_files(scenes: int = 2) -> dict[str, bytes]:
    files = {f"images/scene{i}.png": picture_bytes(96 + 8 * i, 64, seed=i) for i in range(scenes)}
    files["people/mara.jpg"] = picture_bytes(48, 64, "JPEG", seed=9)
    return files


def write_bundle(
    path: Path,
    story: dict[str, Any] | bytes | None,
    files: dict[str, bytes],
    *,
    top: str = "",
    finder: bool = False,
    method: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """A bundle as zipfile writes it: story.json (unless None) and `files`, under `top/` if
    given; `finder` adds what macOS Finder's "Compress" adds (`__MACOSX/`, `._*`, `.DS_Store`)."""
    prefix = f"{top}/" if top else ""
    with zipfile.ZipFile(path, "w", method) as zf:
        if story is not None:
            raw = story if isinstance(story, bytes) else json.dumps(story).encode()
            zf.writestr(f"{prefix}story.json", raw)
        for name, data in files.items():
            zf.writestr(prefix + name, data)
        if finder:
            zf.writestr(f"{prefix}.DS_Store", b"\x00\x00\x00\x01Bud1" + bytes(64))
            zf.writestr(f"__MACOSX/{prefix}._story.json", b"\x00\x05\x16\x07" + bytes(60))
            for name in files:
                folder, _, base = (prefix + name).rpartition("/")
                zf.writestr(f"__MACOSX/{folder}/._{base}".replace("//", "/"), b"\x00\x05\x16\x07" + bytes(60))
    return path


def good_bundle(path: Path, scenes: int = 2, **kw: Any) -> Path:
    return write_bundle(path, story_with_files(scenes), bundle_files(scenes), **kw)


# ----------------------------------------------------------------------------------------------
# Hand-built archives


@dataclass
class RawEntry:
    """One entry, header fields as written: any of them may lie."""

    name: str | bytes
    payload: bytes = b""  # the bytes stored after the local header (already compressed)
    method: int = zipfile.ZIP_STORED
    crc: int = 0
    compressed: int = -1  # -1: len(payload)
    size: int = 0  # declared uncompressed size
    flags: int = 0x800  # UTF-8 names
    external_attr: int = (stat.S_IFREG | 0o644) << 16
    create_system: int = 3  # Unix
    local_name: str | bytes | None = None  # a different name in the local header

    def encoded(self, local: bool = False) -> bytes:
        name = self.local_name if local and self.local_name is not None else self.name
        return name if isinstance(name, bytes) else name.encode("utf-8")


def entry(name: str | bytes, data: bytes = b"", *, deflate: bool = False, **lies: Any) -> RawEntry:
    """An honest entry (right CRC and sizes) for `data`; `lies` then overwrite any field."""
    payload = deflated(data) if deflate else data
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    honest = RawEntry(name, payload, method, zlib.crc32(data), len(payload), len(data))
    return replace(honest, **lies)


def deflated(data: bytes) -> bytes:
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush()


@dataclass
class Bomb:
    """A deflate stream of `size` zero bytes, built in chunks (never `size` bytes in memory)."""

    size: int
    payload: bytes = field(init=False)
    crc: int = field(init=False)

    def __post_init__(self) -> None:
        co, crc, out, left = zlib.compressobj(9, zlib.DEFLATED, -15), 0, [], self.size
        block = bytes(1 << 20)
        while left:
            chunk = block[: min(left, len(block))]
            crc = zlib.crc32(chunk, crc)
            out.append(co.compress(chunk))
            left -= len(chunk)
        out.append(co.flush())
        self.payload, self.crc = b"".join(out), crc

    def entry(self, name: str = "bomb.bin", declared: int | None = None) -> RawEntry:
        return RawEntry(
            name, self.payload, zipfile.ZIP_DEFLATED, self.crc, len(self.payload),
            self.size if declared is None else declared,
        )  # fmt: skip


def write_raw_zip(path: Path, entries: Iterable[RawEntry], *, cd_size: int | None = None) -> Path:
    """Local headers, data, central directory and end record exactly as `entries` say."""
    out, central = io.BytesIO(), []
    dos_time, dos_date = 0, (2026 - 1980) << 9 | 1 << 5 | 1
    for e in entries:
        offset = out.tell()
        local = e.encoded(local=True)
        size = e.compressed if e.compressed >= 0 else len(e.payload)
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, e.flags, e.method, dos_time, dos_date,
                              e.crc, size, e.size, len(local), 0))  # fmt: skip
        out.write(local + e.payload)
        name = e.encoded()
        fields = (b"PK\x01\x02", e.create_system << 8 | 20, 20, e.flags, e.method, dos_time, dos_date,
                  e.crc, size, e.size, len(name), 0, 0, 0, 0, e.external_attr, offset)  # fmt: skip
        central.append(struct.pack("<4s6H3L5H2L", *fields) + name)
    start = out.tell()
    for record in central:
        out.write(record)
    size = cd_size if cd_size is not None else out.tell() - start
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(central) % 65536, len(central) % 65536,
                          size, start, 0))  # fmt: skip
    path.write_bytes(out.getvalue())
    return path


# ----------------------------------------------------------------------------------------------
# Every hostile kind: a builder, and the words its one-line reason must contain

STORY = json.dumps({"scenes": [{"description": "a harbour", "image": "a.png"}]}).encode()
VOICED = json.dumps({"scenes": [{"description": "a harbour", "image": "a.png", "audio": "v.mp3"}]}).encode()


def _story_and(*extra: RawEntry) -> list[RawEntry]:
    return [entry("story.json", STORY), entry("a.png", picture_bytes()), *extra]


def _truncated(path: Path) -> Path:
    good_bundle(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bad_crc(path: Path) -> Path:
    pic = picture_bytes()
    return write_raw_zip(path, [entry("story.json", STORY), entry("a.png", pic, crc=zlib.crc32(pic) ^ 1)])


def _damaged_deflate(path: Path) -> Path:
    pic = bytearray(deflated(picture_bytes()))
    pic[10:40] = b"\xff" * 30
    bad = replace(entry("a.png", picture_bytes(), deflate=True), payload=bytes(pic))
    return write_raw_zip(path, [entry("story.json", STORY), bad])


def _offset_outside(path: Path) -> Path:
    """The end record moves the directory's offset on, so every entry's offset becomes negative."""
    write_raw_zip(path, _story_and())
    data = bytearray(path.read_bytes())
    end = len(data) - 22
    struct.pack_into("<I", data, end + 16, struct.unpack_from("<I", data, end + 16)[0] + 1000)
    path.write_bytes(bytes(data))
    return path


def _too_many(path: Path) -> Path:
    return write_raw_zip(path, _story_and(*(entry(f"junk/{i}.txt", b"x") for i in range(40))))


def _huge_directory(path: Path) -> Path:
    return write_raw_zip(path, _story_and(), cd_size=10_000_000)


def _symlink(path: Path) -> Path:
    link = entry("a.png", b"/etc/passwd", external_attr=(stat.S_IFLNK | 0o777) << 16)
    return write_raw_zip(path, [entry("story.json", STORY), link])


def _encrypted(path: Path) -> Path:
    secret = entry("a.png", bytes(range(256)) * 4, flags=0x801)
    return write_raw_zip(path, [entry("story.json", STORY), secret])


@dataclass(frozen=True)
class Hostile:
    build: Callable[[Path], Path]
    reason: str  # words the one-line refusal contains


def _raw(make: Callable[[], list[RawEntry]]) -> Callable[[Path], Path]:
    """Entries made only when the bundle is built: importing this module costs nothing."""
    return lambda path: write_raw_zip(path, make())


def _plus(*extra: Callable[[], RawEntry]) -> Callable[[Path], Path]:
    """story.json naming a.png, a.png, and the extra entries."""
    return _raw(lambda: _story_and(*(make() for make in extra)))


def _not_zip(path: Path) -> Path:
    path.write_bytes(b"GIF89a" + bytes(500))
    return path


_FIFO = (stat.S_IFIFO | 0o644) << 16
_BOMB = 50_000_000  # inflated bytes: over HOSTILE_LIMITS' max_bundle_bytes

HOSTILE: dict[str, Hostile] = {
    "absolute path": Hostile(_plus(lambda: entry("/etc/cron.d/x", b"x")), "an absolute path"),
    "dot-dot": Hostile(_plus(lambda: entry("../../evil.sh", b"x")), "'..' in its path"),
    "dot-dot inside": Hostile(_plus(lambda: entry("a/../../evil.sh", b"x")), "'..' in its path"),
    "drive letter": Hostile(_plus(lambda: entry("C:/Windows/evil.dll", b"x")), "a drive letter"),
    "backslash": Hostile(_plus(lambda: entry("..\\..\\evil.sh", b"x")), "'\\' in its name"),
    "NUL in name": Hostile(_plus(lambda: entry(b"a.png\x00.txt", b"x")), "a NUL byte"),
    "control character": Hostile(_plus(lambda: entry("a\x1b[2J.txt", b"x")), "a control character"),
    "name part over 255 bytes": Hostile(
        _plus(lambda: entry("x" * 256 + ".png", b"x")), "longer than 255 bytes"
    ),
    "path over 1024 bytes": Hostile(
        _plus(lambda: entry("abcdefgh/" * 120 + "x.png", b"x")), "a path longer than"
    ),
    "symlink": Hostile(_symlink, "a symbolic link"),
    "FIFO": Hostile(_plus(lambda: entry("pipe", b"", external_attr=_FIFO)), "a special file"),
    "duplicate name": Hostile(_plus(lambda: entry("a.png", b"second")), "appears twice"),
    "duplicate by case": Hostile(_plus(lambda: entry("A.PNG", b"x")), "differing only by case"),
    "duplicate by Unicode form": Hostile(
        _plus(lambda: entry("caf\u00e9.png", b"x"), lambda: entry("cafe\u0301.png", b"y")),
        "Unicode normalisation",
    ),
    "file and folder": Hostile(_plus(lambda: entry("a.png/x.txt", b"x")), "which is a file"),
    "folder then file": Hostile(
        _plus(lambda: entry("d/x.txt", b"x"), lambda: entry("D", b"x")), "also the folder of"
    ),
    "file and folder entry": Hostile(
        _plus(lambda: entry("a.png/", b"", external_attr=(stat.S_IFDIR | 0o755) << 16)),
        "both a file and a folder",
    ),
    "two story.json": Hostile(_plus(lambda: entry("more/story.json", STORY)), "more than one story.json"),
    "no story.json": Hostile(_raw(lambda: [entry("a.png", picture_bytes())]), "no story.json"),
    "story.json too deep": Hostile(_raw(lambda: [entry("a/b/story.json", STORY)]), "too deep"),
    "encrypted": Hostile(_encrypted, "encrypted"),
    "AES encrypted": Hostile(_plus(lambda: entry("x.bin", b"x" * 40, method=99)), "encrypted"),
    "bzip2": Hostile(_plus(lambda: entry("x.bin", b"x", method=zipfile.ZIP_BZIP2)), "bzip2"),
    "truncated": Hostile(_truncated, "not a readable ZIP"),
    "not a ZIP": Hostile(_not_zip, "not a readable ZIP"),
    "bad CRC": Hostile(_bad_crc, "Bad CRC-32"),
    "damaged deflate data": Hostile(_damaged_deflate, "damaged"),
    "local name differs": Hostile(
        _raw(lambda: [entry("story.json", STORY), entry("a.png", picture_bytes(), local_name="../../a.png")]),
        "damaged",
    ),
    "offset outside the archive": Hostile(_offset_outside, "outside the archive"),
    "too many entries": Hostile(_too_many, "limits.max_bundle_files"),
    "huge directory": Hostile(_huge_directory, "limits.max_bundle_files"),
    "bomb": Hostile(_plus(lambda: Bomb(_BOMB).entry()), "limits.max_bundle_bytes"),
    "bomb, size understated": Hostile(_plus(lambda: Bomb(_BOMB).entry(declared=1000)), "Bad CRC-32"),
    "bomb, size overstated": Hostile(
        _plus(lambda: Bomb(_BOMB).entry(declared=2**32 - 2)), "limits.max_bundle_bytes"
    ),
    "story.json over max_file_bytes": Hostile(
        _raw(lambda: [entry("story.json", STORY + b" " * 300_000), entry("a.png", picture_bytes())]),
        "limits.max_file_bytes",
    ),
    "invalid story.json": Hostile(
        _raw(lambda: [entry("story.json", b'{"scenes": [}')]), "story.json: not valid JSON"
    ),
    "named file missing": Hostile(_raw(lambda: [entry("story.json", STORY)]), "'a.png' is not in the bundle"),
    "named file not a picture": Hostile(
        _raw(lambda: [entry("story.json", STORY), entry("a.png", b"<html>hello</html>")]), "is not a picture"
    ),
    "picture over Pillow's pixel limit": Hostile(
        _raw(lambda: [entry("story.json", STORY), entry("a.png", png_claiming(20000, 20000))]),
        "over Pillow's limit of",
    ),
    "sound not decodable": Hostile(
        _raw(
            lambda: [
                entry("story.json", VOICED),
                entry("a.png", picture_bytes()),
                entry("v.mp3", b"ID3" + bytes(99)),
            ]
        ),
        "'v.mp3' is not a sound ffmpeg can decode",
    ),
    "sound longer than max_scene_seconds": Hostile(
        _raw(
            lambda: [
                entry("story.json", VOICED),
                entry("a.png", picture_bytes()),
                entry("v.mp3", sound_bytes("mp3", 6)),
            ]
        ),
        "limits.max_scene_seconds",
    ),
    "picture truncated": Hostile(
        _raw(lambda: [entry("story.json", STORY), entry("a.png", picture_bytes(300, 200)[:900])]),
        "damaged or truncated",
    ),
}

# Limits under which every HOSTILE kind is refused (and a good bundle is not).
HOSTILE_LIMITS = {
    "max_bundle_files": 30,
    "max_bundle_bytes": 20_000_000,
    "max_file_bytes": 200_000,
    "max_scene_seconds": 5.0,
}


def each_hostile() -> Iterator[tuple[str, Hostile]]:
    yield from HOSTILE.items()


# ----------------------------------------------------------------------------------------------
# Pictures that test the fit: a colour profile, an orientation, a lying size


def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def _tag_xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _s15(x) + _s15(y) + _s15(z)


def icc_swapped_red_blue() -> bytes:
    """An ICC v2 RGB profile (matrix and gamma 2.2 curves) whose red colorant is sRGB's blue and
    whose blue is sRGB's red: a picture tagged with it must come out with red and blue swapped
    once converted to sRGB, which no profile-blind code path can fake."""
    d50 = (0.9642, 1.0, 0.8249)
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)
    gamma = b"curv" + bytes(4) + struct.pack(">IH", 1, round(2.2 * 256)) + bytes(2)
    text = b"swapped red and blue\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4 + 4 + 2 + 1 + 67)
    tags = [
        (b"desc", desc), (b"wtpt", _tag_xyz(*d50)), (b"rXYZ", _tag_xyz(*blue)),
        (b"gXYZ", _tag_xyz(*green)), (b"bXYZ", _tag_xyz(*red)),
        (b"rTRC", gamma), (b"gTRC", gamma), (b"bTRC", gamma), (b"cprt", b"text" + bytes(4) + b"none\x00"),
    ]  # fmt: skip
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, body in tags:
        body += bytes(-len(body) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = (
        struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"mntrRGB XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(24) + struct.pack(">I", 0)
        + _s15(d50[0]) + _s15(d50[1]) + _s15(d50[2]) + bytes(48)
    )  # fmt: skip
    assert len(header) == 128, len(header)
    return header + struct.pack(">I", len(tags)) + table + data


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height over almost no data: a pixel-count bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * min(width, 64)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------
# A small real filesystem
