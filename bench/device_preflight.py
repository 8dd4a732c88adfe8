"""Part 0 of the GPU visit, in its first seconds: what is installed, from where, and does it work.

It names every version the figures depend on (python, torch and its CUDA, triton, gcc, the card,
the driver, diffusers, transformers, …) and where each package came from (carried or the device's
own), imports every module the visit uses, runs `storyreel --version` through the console script
pip wrote, finds ffmpeg, and compiles one tiny op with torch.compile: a missing compiler or a broken
Triton shows here in seconds, not after minutes of compiling the UNet. It also records whether
torch sees the GPU that nvidia-smi sees: where it does not, the visit refuses to run its CPU
version (bench/device_check.py), which would otherwise pass and measure nothing.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from device_tools import Ctx

REPO = Path(__file__).resolve().parents[1]
# Every module the visit imports, the daemon's included; (module, distribution) for the version.
MODULES = (
    ("torch", "torch"),
    ("triton", "triton"),
    ("numpy", "numpy"),
    ("PIL", "pillow"),
    ("cv2", "opencv-python-headless"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface-hub"),
    ("transformers", "transformers"),
    ("accelerate", "accelerate"),
    ("diffusers", "diffusers"),
    ("compel", "compel"),
    ("typing_extensions", "typing-extensions"),
    ("pydantic", "pydantic"),
    ("pydantic_settings", "pydantic-settings"),
    ("structlog", "structlog"),
    ("watchdog", "watchdog"),
    ("imageio_ffmpeg", "imageio-ffmpeg"),
    ("tqdm", "tqdm"),
    ("psutil", "psutil"),
    ("jinja2", "jinja2"),
    ("prometheus_client", "prometheus-client"),
    ("pipeline.images.sdxl", "storyreel"),
    ("daemon.cli", "storyreel"),
)
CUDA_ONLY = {"triton"}  # Inductor's GPU backend; on a CPU it writes C++ (a CPU-only torch has no triton)
SHOWN = ("torch", "triton", "diffusers", "transformers", "accelerate", "huggingface-hub", "numpy")


def _first_line(cmd: list[str], pick: int = 0) -> str | None:
    """One line of what a tool prints (the first, or `pick`), or None where it is missing."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[pick].strip() if lines else None


def gpu_seen_by_driver() -> str | None:
    """The first GPU nvidia-smi lists (name, driver, memory), or None where there is none."""
    query = "--query-gpu=name,driver_version,memory.total"
    return _first_line(["nvidia-smi", query, "--format=csv,noheader"])


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _origin(module: Any, site: str) -> str:
    where = str(getattr(module, "__file__", "") or "")
    if site and where.startswith(site):
        return "carried"
    if where.startswith(str(REPO)):
        return "tree"
    return "device"


def import_gate(ctx: Ctx) -> tuple[list[str], dict[str, Any]]:
    """Import each module for real (finding it is not enough: a too-old dependency fails only here)."""
    site = os.environ.get("DEVICE_CHECK_SITE", "")
    problems, found = [], {}
    for module_name, dist in MODULES:
        ctx.report.phase(f"import {module_name}")
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # any import-time failure is a finding, not a crash
            if module_name in CUDA_ONLY and not _cuda():
                continue
            problems.append(f"import {module_name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            continue
        found[dist] = {"version": _version(dist), "from": _origin(module, site)}
    return problems, found


def _cuda() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def storyreel_install() -> tuple[list[str], dict[str, Any]]:
    """storyreel's metadata and console script as pip wrote them, and whether the wheel is the tree's."""
    from pipeline.version import storyreel_version

    problems: list[str] = []
    facts: dict[str, Any] = {"version": storyreel_version()}
    exe = shutil.which("storyreel")
    facts["console_script"] = exe
    if exe is None:
        problems.append("no storyreel on PATH")
    else:
        text = Path(exe).read_text("utf-8", errors="replace")
        by_hand = "written by bench/device_check.sh" in text
        facts["console_script_by"] = "hand-written" if by_hand else "pip's"
        facts["version_command"] = _first_line([exe, "--version"])
        if not (facts["version_command"] or "").startswith("storyreel "):
            problems.append(f"storyreel --version said {facts['version_command']!r}")
    try:
        dist = metadata.distribution("storyreel")
    except metadata.PackageNotFoundError:
        facts["metadata"] = None
        problems.append("no storyreel metadata (the wheel did not install): the manifest says +source")
        return problems, facts
    root = Path(str(dist.locate_file("")))
    facts["metadata"] = str(root)
    stale = []
    for rel in dist.files or []:
        path = str(rel)
        if path.endswith(".py") and path.split("/")[0] in ("pipeline", "daemon"):
            carried, tree = root / path, REPO / path
            if not tree.is_file() or _sha(carried) != _sha(tree):
                stale.append(path)
    if stale:  # the tree is first on PYTHONPATH, so its code runs; only the version string is the wheel's
        facts["wheel_differs_from_tree"] = stale[:10]
    return problems, facts


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def tiny_compile(device: str) -> dict[str, Any]:
    """torch.compile of one small function, timed: the compiler, Triton (CUDA) or C++ (CPU) at work."""
    import torch

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x) * 2.0 + 1.0

    x = torch.randn(256, 256, device=device)
    t0 = time.perf_counter()
    y = torch.compile(f)(x)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    ok = bool(torch.allclose(y, f(x), atol=1e-5))
    return {"device": device, "seconds": round(seconds, 2), "matches_eager": ok}


def part_preflight(ctx: Ctx) -> None:
    problems, found = import_gate(ctx)
    ctx.report.phase("versions and tools")
    smi = gpu_seen_by_driver()
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "python_exe": sys.executable,
        "gcc": _first_line(["gcc", "--version"]),
        "nvcc": _first_line(["nvcc", "--version"], pick=-2),  # "Cuda compilation tools, release …"
        "nvidia_smi": smi,
        "packages": found,
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
        "triton_cache": os.environ.get("TRITON_CACHE_DIR"),
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    for dist in SHOWN:
        env[dist.replace("-", "_")] = (found.get(dist) or {}).get("version")
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        cuda = bool(torch.cuda.is_available())
        env.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=cuda)
        env["device"] = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
        if smi and not cuda:
            env["refuse"] = (
                f"nvidia-smi sees {smi} but torch {torch.__version__} (CUDA build {torch.version.cuda}) "
                "sees no CUDA device: the visit would run its CPU version and measure nothing"
            )
            problems.append(env["refuse"])
    ctx.report.env(**env)
    ctx.report.phase("storyreel: metadata, console script")
    more, facts = storyreel_install()
    problems += more
    ctx.report.env(storyreel=facts)
    ctx.report.phase("ffmpeg")
    try:
        import imageio_ffmpeg

        ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
        ctx.report.env(ffmpeg=_first_line([ffmpeg, "-version"]))
    except Exception as err:
        problems.append(f"ffmpeg: {type(err).__name__}: {err}")
    if "tiny-compile" in ctx.skip:
        ctx.report.env(tiny_compile={"skipped": "--skip tiny-compile"})
    elif "torch" in sys.modules and not env.get("refuse"):
        ctx.report.phase("torch.compile of one tiny op")
        try:
            tiny = tiny_compile("cuda" if env.get("cuda_available") else "cpu")
            ctx.report.env(tiny_compile=tiny)
            if not tiny["matches_eager"]:
                problems.append("tiny torch.compile: result differs from eager")
        except Exception as err:
            problems.append(f"tiny torch.compile: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
    summary = _summary(env, found, facts, ctx.report.data["env"])
    ctx.report.part("preflight", "failed" if problems else "ok", "; ".join(problems) or summary)


def _summary(env: dict[str, Any], found: dict[str, Any], facts: dict[str, Any], seen: dict[str, Any]) -> str:
    carried = sorted(d for d, f in found.items() if f["from"] == "carried")
    tiny = seen.get("tiny_compile") or {}
    script = f"{facts.get('console_script_by')} console script says {facts.get('version_command')!r}"
    stale = (
        "; carried wheel differs from the tree (the tree runs)"
        if facts.get("wheel_differs_from_tree")
        else ""
    )
    return (
        f"{len(found)} modules import ({len(carried)} carried: {', '.join(carried)}); {script}{stale}; "
        f"gcc {(env.get('gcc') or 'missing').split()[-1]}; triton {env.get('triton')}; "
        f"tiny torch.compile on {tiny.get('device')} {tiny.get('seconds')} s; "
        f"{seen.get('ffmpeg') or 'no ffmpeg'}"
    )
