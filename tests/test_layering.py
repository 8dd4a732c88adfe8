"""pipeline/ is the library and never reaches into daemon/; commands that need no model start fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text("utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_pipeline_never_imports_daemon() -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "daemon")
        for p in (REPO / "pipeline").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_light_commands_do_not_import_torch() -> None:
    code = (
        "import sys; from daemon.cli import main; import pipeline.kenburns, pipeline.story; "
        "main(['schema']); assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'heavy'"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
