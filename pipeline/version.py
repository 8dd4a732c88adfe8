"""storyreel's own version, installed or not.

pip writes the version into the package's metadata; a checkout that runs from PYTHONPATH (the GPU
visit's tree, a source tree on a box) has none, and a missing version must never fail a story at
its very end. Then the source tree's pyproject.toml says it, marked "+source"; else "unknown".
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path


def storyreel_version() -> str:
    try:
        return metadata.version("storyreel")
    except metadata.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text("utf-8"))["project"]
    except (OSError, ValueError, KeyError):  # tomllib.TOMLDecodeError is a ValueError
        return "unknown (not installed)"
    if project.get("name") != "storyreel" or not isinstance(project.get("version"), str):
        return "unknown (not installed)"
    return f"{project['version']}+source"
