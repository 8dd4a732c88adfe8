"""The wheels the GPU machine lacks, pinned to this .venv, checked for completeness, sized against 64 MiB.

    .venv/bin/python bench/device_wheels.py download [--dest wheels]      (what `make device-wheels` runs)
    python3 bench/device_wheels.py fallbacks WHEELS SITE                 (on the device, before PYTHONPATH)
    python3 bench/device_wheels.py unpack-ffmpeg WHEELS SITE             (on the device, stdlib only)

The device (see /work/.library/device/KINDS.md) has Python 3.12, torch, transformers, accelerate,
opencv, tqdm, numpy, pillow, psutil … but no network: everything else travels as cp312 manylinux
x86-64 wheels inside the 64 MiB that a call may carry. Versions are read with importlib.metadata
from the interpreter running this script (the project's .venv), so the device runs what the tests ran.

One wheel does not fit as it is: imageio-ffmpeg 0.8.1 for manylinux is 68 MB, nearly all of it one
static ffmpeg. It is split: the wheel travels without the binary, the binary travels xz-compressed
(x86 filter + LZMA2 9e, about 48 MB) and `unpack-ffmpeg` puts it back where imageio_ffmpeg looks
(imageio_ffmpeg/binaries/), so `get_ffmpeg_exe()` finds it with no environment variable.

storyreel itself travels as a wheel too (built from the files the device tool sends), so pip writes its
metadata (the manifest's storyreel_version) and the real `storyreel` console script there.

What the device has in a version nobody here knows (typing-extensions, psutil) travels in
wheels/fallback/ and is installed only where the device's copy is missing or fails a requirement of
what is carried (`fallbacks`): on PYTHONPATH a carried copy would shadow the device's newer one.

Every requirement of every shipped wheel (and of storyreel itself) must be either shipped or in the
device's package list; known device versions are checked against the specifiers.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "build" / "device-wheels"  # pip's downloads and the compressed ffmpeg, kept between runs
LIMIT_BYTES = 64 << 20  # what one call of the device tool may carry: tree + carried folders

# What the device lacks: always installed there.
SHIP = (
    "diffusers",
    "compel",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "pydantic-settings",
    "python-dotenv",
    "structlog",
    "watchdog",
    "imageio-ffmpeg",
    "moviepy",  # storyreel lists it (nothing imports it yet); small
    "decorator",
    "proglog",
)
# On the device in a version unknown here: installed only where it is missing or too old there
# (pydantic-core needs typing-extensions >= 4.16; storyreel psutil >= 5.9).
FALLBACK = ("typing-extensions", "psutil")
# Required, but never imported on the device's Python: not carried.
NOT_NEEDED = {"importlib-metadata": "diffusers imports it only on Python < 3.8"}
STORYREEL = "storyreel"

# The device image's packages ("Python packages already there", KINDS.md, read 2026-11-17).
_DEVICE_LIST = """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
    cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
    execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
    httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
    jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
    lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
    mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
    networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
    nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
    nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
    nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
    optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
    shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp"""
DEVICE_HAS = set(_DEVICE_LIST.split())
# Versions a session saw there (KINDS.md "pip list" row, 2026-11); the rest are unknown here.
DEVICE_VERSIONS = {
    "accelerate": "1.15.0",
    "huggingface-hub": "1.33.0",
    "numpy": "2.5.2",
    "safetensors": "0.8.0",
    "tokenizers": "0.23.2",
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "triton": "3.6.0",
}
# The device's interpreter, for evaluating requirement markers.
DEVICE_MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
FFMPEG_WHEEL = "imageio_ffmpeg"
BIG_MEMBER = 1 << 20  # a wheel member over this is the ffmpeg binary


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """SHIP's and FALLBACK's versions, as installed in the interpreter running this (the project's .venv)."""
    from importlib import metadata

    pins, missing = {}, []
    for name in SHIP + FALLBACK:
        try:
            pins[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        sys.exit(f"not installed in {sys.prefix}: {', '.join(missing)} (run `make install` first)")
    return pins


def pip_download(pins: dict[str, str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", "3.12", "--implementation", "cp", "-d", str(dest)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    cmd += [f"{name}=={version}" for name, version in pins.items()]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalized project name, version) from a wheel's file name."""
    dist, version = path.name.split("-")[:2]
    return normalize(dist), version


def pick(cache: Path, pins: dict[str, str]) -> dict[str, Path]:
    """The one cached wheel per pinned name and version (the cache may hold older ones too)."""
    wanted = {normalize(n): v for n, v in pins.items()}
    found: dict[str, Path] = {}
    for whl in sorted(cache.glob("*.whl")):
        name, version = wheel_name(whl)
        if wanted.get(name) == version:
            found[name] = whl
    missing = sorted(set(wanted) - set(found))
    if missing:
        sys.exit(f"pip download left no wheel for: {', '.join(missing)}")
    return found


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def split_ffmpeg(wheel: Path, dest: Path) -> Path:
    """Write `wheel` to `dest` without its ffmpeg binary (RECORD updated); the binary goes to CACHE as .xz.

    Returns the .xz. Compressing takes minutes of one core, so it is redone only when the wheel changes.
    """
    with zipfile.ZipFile(wheel) as zin:
        big = [i for i in zin.infolist() if i.file_size > BIG_MEMBER]
        if len(big) != 1:
            sys.exit(f"{wheel.name}: expected one binary member over 1 MiB, found {len(big)}")
        member = big[0]
        xz = CACHE / (Path(member.filename).name + ".xz")
        stamp = xz.with_suffix(".source-sha256")
        source = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if not (xz.is_file() and stamp.is_file() and stamp.read_text().strip() == source):
            print(f"compressing {member.filename} ({member.file_size >> 20} MiB; takes a few minutes)")
            filters = [
                {"id": lzma.FILTER_X86},
                {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME},
            ]
            data = lzma.compress(zin.read(member), format=lzma.FORMAT_XZ, filters=filters)
            tmp = xz.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, xz)
            stamp.write_text(source + "\n")
        tmp_whl = dest / (wheel.name + ".tmp")
        with zipfile.ZipFile(tmp_whl, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if info.filename == member.filename:
                    continue
                data = zin.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines()
                    data = (
                        "\n".join(x for x in lines if not x.startswith(member.filename + ",")) + "\n"
                    ).encode()
                zout.writestr(info, data)
        os.replace(tmp_whl, dest / wheel.name)
    return xz


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def own_requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))["project"]
    return list(project["dependencies"])


def check_closure(shipped: dict[str, str], wheels: dict[str, Path]) -> list[str]:
    """Every needed requirement is shipped or on the device; known versions satisfy the specifiers."""
    from packaging.requirements import Requirement

    problems, unchecked = [], set()
    sources = [("storyreel", own_requirements())] + [(n, requirements(w)) for n, w in wheels.items()]
    for owner, reqs in sources:
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
                continue
            name = normalize(req.name)
            if name in NOT_NEEDED:
                continue
            version = shipped.get(name) or DEVICE_VERSIONS.get(name)
            if version is not None:
                if req.specifier and not req.specifier.contains(version, prereleases=True):
                    where = "shipped" if name in shipped else "on the device"
                    problems.append(f"{owner} needs {text}; {where}: {name} {version}")
            elif name in DEVICE_HAS:
                if req.specifier:
                    unchecked.add(f"{name}{req.specifier}")
            else:
                problems.append(f"{owner} needs {text}: neither shipped nor on the device")
    if unchecked:
        print("on the device, version not known here (unchecked): " + ", ".join(sorted(unchecked)))
    return problems


def device_side_names(wheels: Path) -> list[str]:
    """The device-image packages the visit relies on: what storyreel and the carried wheels require
    and the wheels folder does not carry (the rehearsal's stand-in for the device installs these)."""
    from packaging.requirements import Requirement

    found = {wheel_name(w)[0]: w for w in sorted(wheels.glob("*.whl"))}  # always installed
    needs: set[str] = set()
    for reqs in [own_requirements()] + [requirements(w) for w in sorted(wheels.rglob("*.whl"))]:
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(DEVICE_MARKERS):
                continue
            name = normalize(req.name)
            if name not in found and name in DEVICE_HAS:
                needs.add(name)
    return sorted(needs)


def travelling_files() -> list[Path]:
    """The working tree as the device tool sends it: tracked and untracked-not-ignored files."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    paths = (REPO / os.fsdecode(name) for name in filter(None, out.split(b"\0")))
    return [p for p in paths if p.is_file() and not p.is_symlink()]


def storyreel_wheel(dest: Path) -> Path:
    """storyreel as pip would install it, built from the files that travel (never from stale build/)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for path in travelling_files():
            rel = path.relative_to(REPO)
            if rel.parts[0] in ("pipeline", "daemon") or rel.name in ("pyproject.toml", "README.md"):
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, src / rel)
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        subprocess.run([*cmd, "-w", str(dest), str(src)], check=True)
    (wheel,) = dest.glob(f"{STORYREEL}-*.whl")
    return wheel


def download(dest: Path) -> int:
    pins = pinned()
    pip_download(pins, CACHE)
    found = pick(CACHE, pins)
    if dest.exists():
        shutil.rmtree(dest)  # one version of each: two would stop the whole install
    (dest / "fallback").mkdir(parents=True)
    shipped = {normalize(n): v for n, v in pins.items()}
    fallback = {normalize(n) for n in FALLBACK}
    for name, whl in found.items():
        if name == normalize(FFMPEG_WHEEL):
            shutil.copy2(split_ffmpeg(whl, dest), dest)
        else:
            shutil.copy2(whl, dest / "fallback" if name in fallback else dest)
    own = storyreel_wheel(dest)
    shipped[STORYREEL] = wheel_name(own)[1]
    problems = check_closure(shipped, found)
    lines = [f"{n}=={v}" for n, v in sorted(pins.items())] + [
        f"{STORYREEL}=={shipped[STORYREEL]} (this tree)"
    ]
    (dest / "PINS.txt").write_text(
        "# made by `make device-wheels` from " + sys.prefix + "\n" + "\n".join(lines) + "\n"
    )
    files = [p for p in dest.rglob("*") if p.is_file()]
    wheel_bytes = sum(p.stat().st_size for p in files)
    tree = sum(p.stat().st_size for p in travelling_files())
    total = wheel_bytes + tree
    print(f"\n{dest.name}/: {len(files)} files, {wheel_bytes / 2**20:.1f} MiB")
    for p in sorted(files, key=lambda p: -p.stat().st_size)[:5]:
        print(f"  {p.stat().st_size / 2**20:6.1f} MiB  {p.relative_to(dest)}")
    print(f"working tree that travels: {tree / 2**20:.1f} MiB")
    print(f"total with carry=[{dest.name!r}]: {total / 2**20:.1f} MiB of {LIMIT_BYTES >> 20} MiB")
    if problems:
        print("incomplete for the device:\n  " + "\n  ".join(problems))
        return 1
    if total > LIMIT_BYTES:
        print("over the device tool's 64 MiB limit")
        return 1
    print("closure: every requirement is shipped or on the device")
    return 0


def fallback_needed(name: str, specifiers: list[str], have: str | None) -> str | None:
    """Why the carried copy of `name` must be installed, or None where the device's own will do."""
    if have is None:
        return "not on the device"
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # no way to compare: trust the device's copy
        return None
    wanted = [s for s in specifiers if s and not SpecifierSet(s).contains(have, prereleases=True)]
    return f"the device has {have}, the carried wheels need {', '.join(wanted)}" if wanted else None


def fallbacks(wheels: Path, site: Path) -> int:
    """On the device, before SITE is on PYTHONPATH: install each fallback wheel only where needed."""
    from importlib import metadata

    specs: dict[str, list[str]] = {}
    for whl in sorted(wheels.parent.glob("*.whl")):
        for text in requirements(whl):
            m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^]]*\])?\s*([^;]*)", text)
            if m and ";" not in text:
                specs.setdefault(normalize(m.group(1)), []).append(m.group(2).strip().strip("()"))
    chosen = []
    for whl in sorted(wheels.glob("*.whl")):
        name, version = wheel_name(whl)
        try:
            have: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        why = fallback_needed(name, specs.get(name, []), have)
        print(
            f"fallback {name} {version}: " + (f"installed ({why})" if why else f"the device's {have} is used")
        )
        if why:
            chosen.append(str(whl))
    if not chosen:
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(site), *chosen]
    return subprocess.run(cmd).returncode


def unpack_ffmpeg(wheels: Path, site: Path) -> int:
    """Put the carried ffmpeg back into the installed imageio_ffmpeg (stdlib only: runs on the device)."""
    packs = sorted(wheels.glob("ffmpeg-*.xz"))
    if not packs:
        print(f"no ffmpeg-*.xz in {wheels}", file=sys.stderr)
        return 1
    target = site / "imageio_ffmpeg" / "binaries" / packs[0].name.removesuffix(".xz")
    if not target.parent.is_dir():
        print(f"{target.parent}: imageio_ffmpeg is not installed there", file=sys.stderr)
        return 1
    tmp = target.with_suffix(".tmp")
    with lzma.open(packs[0]) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 22)
    tmp.chmod(0o755)
    os.replace(tmp, target)
    print(f"ffmpeg: {target} ({target.stat().st_size >> 20} MiB)")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dl = sub.add_parser("download", help="fill the wheels folder (make device-wheels)")
    dl.add_argument("--dest", type=Path, default=REPO / "wheels")
    for cmd in ("unpack-ffmpeg", "fallbacks"):
        up = sub.add_parser(cmd, help="on the device, with pip install --target SITE")
        up.add_argument("wheels", type=Path)
        up.add_argument("site", type=Path)
    args = ap.parse_args()
    if args.cmd == "download":
        return download(args.dest)
    if args.cmd == "fallbacks":
        return fallbacks(args.wheels, args.site)
    return unpack_ffmpeg(args.wheels, args.site)


if __name__ == "__main__":
    sys.exit(main())
