"""A ZIP from a stranger: its listing checked, its entries read under a byte budget.

A story bundle arrives over a share from someone we do not know, so nothing in its
headers is trusted. The rules, in the order they are applied:

1. Before Python's zipfile parses anything, the end-of-central-directory record says how
   big the directory is; one larger than `max_bundle_files` entries can need is refused
   (zipfile reads the whole directory into memory, so a crafted one could exhaust it).
2. Every entry, ignored or not, counts against `max_bundle_files` and has its name and
   type checked: no absolute paths, drive letters, backslashes, `..`, control characters;
   no links or special files; no encryption; only stored or deflated data (deflate's
   output is bounded per read; bzip2's and LZMA's are not, so one read could fill memory);
   no two names that a Windows or macOS share would see as one (case, Unicode form).
3. Bytes are counted as they inflate, never taken from headers: the budget stops a zip
   bomb at `max_bundle_bytes`, long before a disk fills.

Every refusal is a `BundleError` with one line naming the entry (or "(bundle)") and the
limit. I/O errors reading the file are not the bundle's fault and propagate as OSError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.settings import LimitsSettings
from pipeline.story import StoryError

# The central directory may hold up to this many bytes per allowed entry: a directory
# record is 46 bytes plus its name, extra fields and comment; real archivers stay far
# below this even with long names and a Unicode-path extra field.
CD_BYTES_PER_ENTRY = 4096
MAX_PATH_BYTES = 1024  # an entry's whole name: well inside PATH_MAX under any work folder
CHUNK = 1 << 20  # one read: deflate inflates at most this much per call
READABLE = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
_METHODS = {zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "LZMA", 9: "Deflate64", 93: "Zstandard"}
_AES = 99  # WinZip AES: encrypted data behind a method number of its own
_DRIVE = re.compile(r"^[A-Za-z]:")
_NAME_SHOWN = 120  # characters of an entry name quoted in a message
_ZIP_BROKEN = (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, zlib.error)


class BundleError(StoryError):
    """A bundle that cannot be used: `problems` holds one line per problem, each naming the
    entry or field and the limit hit (a StoryError, so everything that reports a bad story
    reports a bad bundle the same way)."""

    def __init__(self, problem: str | list[str]) -> None:
        super().__init__([problem] if isinstance(problem, str) else problem)


def shown(name: str) -> str:
    """An entry name quoted for a message: escaped (control characters visible), kept short."""
    text = name if len(name) <= _NAME_SHOWN else name[: _NAME_SHOWN - 1] + "…"
    return repr(text)


def name_key(name: str) -> str:
    """The name as a case-insensitive, normalisation-insensitive filesystem sees it (SMB, macOS)."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def is_junk(name: str) -> bool:
    """macOS Finder's companions (`__MACOSX/`, `._*` resource forks, `.DS_Store`): ignored."""
    parts = name.rstrip("/").split("/")
    return parts[0] == "__MACOSX" or parts[-1].startswith("._") or parts[-1] == ".DS_Store"


# ----------------------------------------------------------------------------------------------
# 1. Opening: the directory's size checked before zipfile reads it


def _directory_size(fh: Any) -> int | None:
    """Bytes in the central directory, from the same end record zipfile will use.

    Uses CPython's private `zipfile._EndRecData` (3.11-3.14) so the record checked is the one
    parsed; where it is gone, the file's own size bounds what zipfile can read instead.
    """
    end_record: Callable[[Any], list[Any] | None] | None = getattr(zipfile, "_EndRecData", None)
    if end_record is None:
        return None
    try:
        record = end_record(fh)
    except (OSError, ValueError, zipfile.BadZipFile, struct.error):
        return None  # zipfile itself will say what is wrong
    fh.seek(0)
    return None if not record else int(record[getattr(zipfile, "_ECD_SIZE", 5)])


@contextlib.contextmanager
def open_zip(path: Path, limits: LimitsSettings) -> Iterator[zipfile.ZipFile]:
    """The archive opened for reading, once its directory is known to be of a sane size."""
    with open(path, "rb") as fh:
        size = _directory_size(fh)
        most = limits.max_bundle_files * CD_BYTES_PER_ENTRY
        if size is not None and size > most:
            raise BundleError(
                f"(bundle): the ZIP's directory is {size} bytes, more than "
                f"{limits.max_bundle_files} entries (limits.max_bundle_files) can need"
            )
        try:
            zf = zipfile.ZipFile(fh)
        except (*_ZIP_BROKEN, UnicodeDecodeError, ValueError) as err:
            raise BundleError(f"(bundle): not a readable ZIP archive ({_reason(err)})") from None
        with zf:
            yield zf


def _reason(err: BaseException) -> str:
    if isinstance(err, UnicodeDecodeError):
        return "an entry name marked UTF-8 is not valid UTF-8"
    text = str(err) or type(err).__name__
    if isinstance(err, EOFError):
        return "it ends early: truncated, or still being copied"
    return {"File is not a zip file": "no ZIP directory found; truncated, or not a ZIP"}.get(text, text)


# ----------------------------------------------------------------------------------------------
# 2. The listing: every entry counted and checked


@dataclass(frozen=True)
class Listing:
    """The checked entries: `files` maps each file entry's name (NFC) to its ZipInfo."""

    entries: list[zipfile.ZipInfo]  # every entry, in directory order
    files: dict[str, zipfile.ZipInfo]  # file entries that are not Finder junk, by NFC name
    folders: set[str]  # every folder those names and the folder entries imply, NFC, no '/'
    keys: dict[str, str]  # name_key -> the NFC name of a file, for "did you mean" hints


def _name_problem(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    if "\x00" in info.orig_filename:
        return "a NUL byte in its name"
    if "\\" in name:
        return "'\\' in its name (a ZIP separates folders with '/'; a backslash is a trick or a Windows path)"
    if name.startswith("/"):
        return "an absolute path (entries must be relative to the bundle)"
    if _DRIVE.match(name):
        return "a drive letter (entries must be relative to the bundle)"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "a control character in its name"
    parts = name.removesuffix("/").split("/")
    if ".." in parts:
        return "'..' in its path, which would reach outside the bundle"
    if any(p in ("", ".") for p in parts):
        return "an empty or '.' part in its path"
    if any(len(p.encode("utf-8")) > 255 for p in parts):
        return "a name longer than 255 bytes, which no filesystem stores"
    if len(name.encode("utf-8")) > MAX_PATH_BYTES:
        return f"a path longer than {MAX_PATH_BYTES} bytes"
    return None


def _place_problem(info: zipfile.ZipInfo, archive_bytes: int) -> str | None:
    """Where the directory says the entry is must lie inside the file: zipfile would otherwise
    seek to a negative offset, an OSError that reads like a failing disk, not a bad bundle."""
    if info.header_offset < 0 or info.header_offset + 30 + info.compress_size > archive_bytes:
        return "damaged (the directory puts its data outside the archive)"
    return None


def _type_problem(info: zipfile.ZipInfo) -> str | None:
    if info.flag_bits & 0x1 or info.compress_type == _AES:
        return "encrypted (password-protected ZIPs cannot be read; zip it again without a password)"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link (a bundle holds plain files only)"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "a special file (device, FIFO or socket; a bundle holds plain files only)"
    if not info.is_dir() and info.compress_type not in READABLE:
        method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        return f"compressed with {method}; bundles use stored or deflated entries (the ZIP default)"
    return None


class _Names:
    """The names met so far, as a case- and normalisation-blind filesystem (SMB, macOS) sees them."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, bool]] = {}  # name_key -> (the name as listed, is a folder)
        self.folders: dict[str, str] = {}  # name_key of every folder a name implies -> a name inside

    def clash(self, info: zipfile.ZipInfo) -> str | None:
        name, is_dir = info.filename.removesuffix("/"), info.is_dir()
        key = name_key(name)
        parts = key.split("/")
        if key in self.seen:
            other, other_dir = self.seen[key]
            if other == name:
                return "appears twice in the ZIP" if is_dir == other_dir else "is both a file and a folder"
            looks_same = unicodedata.normalize("NFC", other) == unicodedata.normalize("NFC", name)
            other = ascii(other) if looks_same else shown(other)  # code points, where names look alike
            return (
                f"clashes with {other}: names differing only by case or Unicode "
                "normalisation are one file on Windows and macOS shares"
            )
        for prefix in ("/".join(parts[:i]) for i in range(1, len(parts))):
            if prefix in self.seen and not self.seen[prefix][1]:
                return f"lies inside {shown(self.seen[prefix][0])}, which is a file"
        if not is_dir and key in self.folders:
            return f"is a file, and also the folder of {shown(self.folders[key])}"
        self.seen[key] = (name, is_dir)
        for i in range(1, len(parts)):
            self.folders.setdefault("/".join(parts[:i]), name)
        return None


def read_listing(zf: zipfile.ZipFile, limits: LimitsSettings) -> Listing:
    """Every entry counted against `max_bundle_files` and checked; the first problem is raised."""
    entries = zf.infolist()
    if len(entries) > limits.max_bundle_files:
        raise BundleError(
            f"(bundle): {len(entries)} entries is over the limit of "
            f"{limits.max_bundle_files} (limits.max_bundle_files)"
        )
    archive_bytes = os.fstat(zf.fp.fileno()).st_size if zf.fp is not None else 0
    names = _Names()
    files: dict[str, zipfile.ZipInfo] = {}
    folders: set[str] = set()
    for info in entries:
        junk = is_junk(info.filename)
        problem = _name_problem(info) or _place_problem(info, archive_bytes) or _type_problem(info)
        if problem is None and not junk:
            problem = names.clash(info)
        if problem:
            raise BundleError(f"entry {shown(info.orig_filename)}: {problem}")
        if junk:
            continue
        name = unicodedata.normalize("NFC", info.filename.removesuffix("/"))
        parts = name.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
        if info.is_dir():
            folders.add(name)
        else:
            files[name] = info
    keys = {name_key(n): n for n in files}
    return Listing(entries=entries, files=files, folders=folders, keys=keys)


# ----------------------------------------------------------------------------------------------
# 3. Reading: bytes counted as they inflate


class Budget:
    """What is left of `max_bundle_bytes`, taken as bytes come out of the decompressor."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int, entry: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise BundleError(
                f"entry {shown(entry)}: the bundle unpacks to more than {self.limit} bytes "
                "(limits.max_bundle_bytes)"
            )


def stream_entry(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, sink: Callable[[bytes], object]
) -> int:
    """Inflate one entry chunk by chunk into `sink`, counting against `budget`; its CRC is
    checked by zipfile at the end. Returns the bytes it gave. A damaged entry is a BundleError;
    an error of the sink (a full disk) propagates as it is."""
    total = 0
    try:
        with zf.open(info) as src:
            while True:
                chunk = src.read(CHUNK)
                if not chunk:
                    return total
                budget.take(len(chunk), info.filename)
                total += len(chunk)
                sink(chunk)
    except _ZIP_BROKEN as err:
        raise BundleError(f"entry {shown(info.filename)}: damaged ({_reason(err)})") from None
    except RuntimeError as err:  # zipfile's "is encrypted, password required"
        raise BundleError(f"entry {shown(info.filename)}: cannot be read ({err})") from None
    except OSError as err:
        if err.errno != errno.EINVAL:  # a disk or share failing: the machine's problem, retried
            raise
        raise BundleError(f"entry {shown(info.filename)}: damaged (an offset no file has)") from None


def read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: Budget, most: int) -> bytes | None:
    """An entry's bytes in memory, or None if it holds more than `most` bytes (reading stops there)."""
    parts: list[bytes] = []
    size = 0

    class _Full(Exception):
        pass

    def keep(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        if size > most:
            raise _Full
        parts.append(chunk)

    try:
        stream_entry(zf, info, budget, keep)
    except _Full:
        return None
    return b"".join(parts)
