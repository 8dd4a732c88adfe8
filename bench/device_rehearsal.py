"""The GPU visit's dress rehearsal, here on the CPU: a fresh clone, the device's Python and versions.

    .venv/bin/python bench/device_rehearsal.py [--work build/device-rehearsal]   (make device-rehearsal)

The project's .venv is not what the device has: Python 3.11, storyreel installed (editable), newer
torch and transformers. The device has Python 3.12 with the image's own torch, transformers,
accelerate, huggingface_hub and numpy (KINDS.md) and nothing of storyreel but what travels. So:

1. find a Python 3.12 (DEVICE_REHEARSAL_PYTHON, `python3.12` on PATH, pyenv's, `uv python find`);
2. make (once; reused while its requirements stay the same) a venv of it holding the device's
   versions (device_wheels.DEVICE_VERSIONS) and the device-image packages the visit relies on
   (computed from the wheels' and storyreel's requirements), then remove every distribution the
   device's package list does not name, so nothing here stands in for a missing wheel. torch is
   PyPI's 2.11.0 build, with its CUDA 13.0 libraries: the device's very build (2.11.0+cu130) and
   the only 2.11.0 for cp312 on PyPI (the CPU-only build lives on PyTorch's own index, which this
   machine cannot reach). Here it sees no GPU and runs on the CPU;
3. `git clone` HEAD (uncommitted changes are not rehearsed: the device gets what is committed and
   checked out where the session started) and run `make device-wheels` there;
4. copy what the device tool would send (tracked and untracked-not-ignored files, plus
   carry=["wheels"]) to a folder, and measure it against the 64 MiB limit;
5. run `bash bench/device_check.sh --mode reduced` in that folder with a bare environment: the
   venv's python3 first on PATH, no .venv, no PYTHONPATH, fresh Inductor/Triton caches;
6. pass only if every part reports ok; print the table, the wall time and the carried size.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import device_wheels as dw

REPO = Path(__file__).resolve().parents[1]
# On the device too, and read by the visit: transformers probes torchvision, the sampler uses pynvml.
EXTRA_DEVICE_PACKAGES = ("torchvision==0.26.0", "nvidia-ml-py", "pip", "setuptools", "wheel")
KEEP = {"pip", "setuptools", "wheel"}  # a venv's own tools


def log(text: str) -> None:
    print(f"rehearsal: {text}", flush=True)


def run(cmd: list[str], quiet: Path | None = None) -> None:
    """A step that must succeed; with `quiet`, its output goes to that file, shown only if it fails.

    Run from /: a checkout's own storyreel.egg-info in the working folder would pass for installed."""
    log("$ " + " ".join(cmd))
    if quiet is None:
        subprocess.run(cmd, check=True, cwd="/")
        return
    with open(quiet, "a") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd="/").returncode
    if code != 0:
        print(quiet.read_text()[-6000:], flush=True)
        sys.exit(f"rehearsal: failed ({code}): {' '.join(cmd)}")


# -- 1. a Python 3.12 ------------------------------------------------------------------------------
def _is_312(exe: str) -> bool:
    try:
        out = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == b"(3, 12)"


def find_python312() -> str:
    candidates = [os.environ.get("DEVICE_REHEARSAL_PYTHON", ""), shutil.which("python3.12") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/3.12*/bin/python3.12"), reverse=True)
    candidates += ["/usr/local/bin/python3.12", "/usr/bin/python3.12"]
    if shutil.which("uv"):
        found = subprocess.run(["uv", "python", "find", "3.12"], capture_output=True, text=True)
        candidates.append(found.stdout.strip())
    for exe in filter(None, candidates):
        if _is_312(exe):
            return exe
    sys.exit(
        "rehearsal: no Python 3.12 found. Set DEVICE_REHEARSAL_PYTHON, or install one: "
        "`pyenv install 3.12`, `uv python install 3.12`, or a distribution's python3.12 package."
    )


# -- 2. the device's packages ------------------------------------------------------------------------
def device_requirements(wheels: Path) -> list[str]:
    pins = [f"{name}=={version}" for name, version in sorted(dw.DEVICE_VERSIONS.items())]
    pinned = set(dw.DEVICE_VERSIONS)
    extra = [n for n in dw.device_side_names(wheels) if n not in pinned]
    return pins + sorted(extra) + list(EXTRA_DEVICE_PACKAGES)


def device_venv(python: str, folder: Path, reqs: list[str]) -> Path:
    """A venv like the device's python3: reused while the interpreter and requirements are unchanged."""
    stamp_text = json.dumps({"python": os.path.realpath(python), "requirements": reqs})
    stamp = folder / "rehearsal-stamp.json"
    py = folder / "bin" / "python3"
    if stamp.is_file() and stamp.read_text() == stamp_text and py.exists():
        log(f"device venv {folder}: reused")
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    pip_log = folder.with_suffix(".log")
    pip_log.unlink(missing_ok=True)
    run([python, "-m", "venv", str(folder)])
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], pip_log)
    run([str(py), "-m", "pip", "install", "-q", *reqs], pip_log)
    prune(py, pip_log)
    stamp.write_text(stamp_text)
    return folder


def installed(py: Path) -> dict[str, str]:
    code = (
        "import json, importlib.metadata as m; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    out = subprocess.run([str(py), "-I", "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return {dw.normalize(k): v for k, v in json.loads(out.stdout).items()}


def prune(py: Path, pip_log: Path) -> None:
    """Remove what the device's list does not name: such a package here would hide a missing wheel."""
    extra = sorted(n for n in installed(py) if n not in dw.DEVICE_HAS and n not in KEEP)
    if extra:
        log("not on the device, removed from its stand-in: " + ", ".join(extra))
        run([str(py), "-m", "pip", "uninstall", "-q", "-y", *extra], pip_log)


def check_versions(py: Path) -> dict[str, str]:
    have = installed(py)
    wrong = {n: have.get(n) for n, v in dw.DEVICE_VERSIONS.items() if have.get(n) != v}
    if wrong:
        sys.exit(f"rehearsal: the venv does not hold the device's versions: {wrong}")
    return have


# -- 3.-4. a fresh clone, its wheels, the tree that travels --------------------------------------------
def fresh_clone(work: Path) -> Path:
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    if dirty.stdout.strip():
        log("NOTE: uncommitted changes here are not rehearsed (the clone is of HEAD)")
    clone = work / "clone"
    shutil.rmtree(clone, ignore_errors=True)
    run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(clone)])
    head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=clone, capture_output=True, text=True)
    log(f"clone at {head.stdout.strip()}")
    return clone


def make_wheels(clone: Path, work: Path) -> str:
    """`make device-wheels` in the clone, with a venv of its own and the download cache seeded."""
    dev_venv = work / "dev-venv"  # the project's .venv, copied once: `make install` in the clone reuses it
    if not (dev_venv / "bin" / "python").exists():
        if not (REPO / ".venv" / "bin" / "python").exists():
            sys.exit("rehearsal: no .venv here to copy (run `make install` first)")
        run(["cp", "-a", str(REPO / ".venv"), str(dev_venv)])
    cache = REPO / "build" / "device-wheels"  # pip's downloads and the compressed ffmpeg (minutes to make)
    if cache.is_dir():
        (clone / "build").mkdir(parents=True, exist_ok=True)
        shutil.copytree(cache, clone / "build" / "device-wheels")
    cmd = ["make", "-C", str(clone), "device-wheels", f"VENV={dev_venv}"]
    log("$ " + " ".join(cmd))
    out = subprocess.run(cmd, capture_output=True, text=True)
    shown = [line for line in out.stdout.splitlines() if "is ignored: it is neither" not in line]
    print("\n".join(shown[-25:]), flush=True)
    if out.returncode != 0:
        print(out.stderr[-3000:], flush=True)
        sys.exit(f"rehearsal: make device-wheels failed ({out.returncode})")
    if not cache.is_dir():  # keep what the clone made for the next rehearsal
        shutil.copytree(clone / "build" / "device-wheels", cache)
    return out.stdout


def send_tree(clone: Path, dest: Path, carry: list[str]) -> int:
    """What the device tool sends: tracked and untracked-not-ignored files, plus the carried paths."""
    shutil.rmtree(dest, ignore_errors=True)
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=clone,
        capture_output=True,
        check=True,
    ).stdout
    files = [os.fsdecode(n) for n in names.split(b"\0") if n]
    for c in carry:
        files += [str(p.relative_to(clone)) for p in (clone / c).rglob("*") if p.is_file()]
    total = 0
    for name in files:
        src = clone / name
        if not src.is_file() or src.is_symlink():
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / name)
        total += src.stat().st_size
    return total


# -- 5.-6. the visit, and its verdict ---------------------------------------------------------------
def visit(tree: Path, venv: Path, work: Path) -> tuple[int, float, Path]:
    out, caches = work / "out", work / "caches"
    for d in (out, caches, work / "visit-work"):
        shutil.rmtree(d, ignore_errors=True)
    out.mkdir(parents=True)
    env = {
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "OUT": str(out),
        "DEVICE_CHECK_SITE": str(work / "site"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        # The device's budget is for its 16 cores and one GPU; this shared 2-core machine is slower
        # (the CPU compile alone took 65-240 s with other jobs running), and a part cut short for time
        # here would prove nothing. Parts end when done; the budgeting is tested on its own.
        "DEVICE_CHECK_SECONDS": os.environ.get("DEVICE_CHECK_SECONDS", "1800"),
    }
    cmd = ["bash", "bench/device_check.sh", "--mode", "reduced", "--work", str(work / "visit-work")]
    cmd += ["--cap-scale", os.environ.get("DEVICE_REHEARSAL_CAP_SCALE", "3")]
    log("$ " + " ".join(cmd) + f"   (in {tree}, PATH={env['PATH']})")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tree, env=env)
    return proc.returncode, time.monotonic() - t0, out


def verdict(out: Path) -> list[str]:
    """Every part ok, and storyreel installed as the device will have it: pip's metadata and script."""
    try:
        doc = json.loads((out / "device_check.json").read_text("utf-8"))
    except (OSError, ValueError) as err:
        return [f"no device_check.json: {err}"]
    problems = [
        f"{name}: {part['status']}: {part.get('message', '')[:300]}"
        for name, part in doc["parts"].items()
        if part["status"] != "ok"
    ]
    own = doc["env"].get("storyreel", {})
    if own.get("console_script_by") != "pip's" or not own.get("metadata") or "+" in own.get("version", "+"):
        problems.append(f"storyreel is not installed from its wheel: {own}")
    version = doc["parts"].get("daemon", {}).get("figures", {}).get("storyreel_version")
    if version != own.get("version"):
        problems.append(f"the daemon's manifest says storyreel {version!r}, pip {own.get('version')!r}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "build" / "device-rehearsal")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    python = find_python312()
    log(f"python 3.12: {python}")
    clone = fresh_clone(work)
    make_wheels(clone, work)
    venv = device_venv(python, work / "py312", device_requirements(clone / "wheels"))
    have = check_versions(venv / "bin" / "python3")
    shown = ", ".join(f"{n} {have[n]}" for n in sorted(dw.DEVICE_VERSIONS))
    log(f"device stand-in: {venv} ({shown})")
    carried = send_tree(clone, work / "device-tree", ["wheels"])
    code, wall, out = visit(work / "device-tree", venv, work)
    problems = verdict(out)
    if code != 0:
        problems.insert(0, f"device_check.sh exited {code}")
    table = (out / "device_check.md").read_text("utf-8") if (out / "device_check.md").is_file() else ""
    print("\n" + table, flush=True)
    size = f"{carried / 2**20:.1f} MiB of {dw.LIMIT_BYTES >> 20} MiB"
    log(f"visit wall {wall:.0f} s; rehearsal {time.monotonic() - t0:.0f} s; carried (tree + wheels) {size}")
    if carried > dw.LIMIT_BYTES:
        problems.append(f"the tree and wheels are {size}: over the limit")
    if problems:
        log("FAILED:\n  " + "\n  ".join(problems))
        return 1
    log("every part ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
