"""The rooms of daemon/ and pipeline/, measured: imports, sizes, the longest function.

    python tests/rooms.py [ROOT]     a table per room: modules, lines, classes, the largest class
                                     and the longest function (ROOT: another checkout, e.g. an old
                                     commit's `git worktree`, to compare before and after)

tests/test_layering.py holds the rules over the same data: floors between rooms, no import
cycle (function-local imports included), no class over 250 lines, no module over 400.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "pipeline")

# A flat daemon/ (before the rooms) grouped as its imports clustered, so that old and new compare.
FLAT_ROOMS = {
    "inbox": {"watch", "scan", "settle", "observer", "fstype", "folders"},
    "queue": {"spool", "ledger", "states", "history", "controls", "lookahead", "retention"},
    "report": {"status", "overview", "page", "metrics", "observers"},
    "system": {"notify", "logs", "hooks"},
}


@dataclass
class Module:
    name: str  # dotted: daemon.queue.ledger
    path: Path
    lines: int
    tree: ast.Module = field(repr=False)

    def imports(self) -> Iterator[tuple[str, list[str], int]]:
        """(module, names, line) for every import anywhere in the file, function-local ones too."""
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, [], node.lineno
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield node.module, [a.name for a in node.names], node.lineno

    def classes(self) -> list[tuple[str, int]]:
        return [
            (n.name, (n.end_lineno or n.lineno) - n.lineno + 1)
            for n in ast.walk(self.tree)
            if isinstance(n, ast.ClassDef)
        ]

    def functions(self) -> list[tuple[str, int]]:
        return [
            (n.name, (n.end_lineno or n.lineno) - n.lineno + 1)
            for n in ast.walk(self.tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]


def modules(root: Path = REPO) -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            text = path.read_text("utf-8")
            name = ".".join(parts)
            found[name] = Module(name, path, len(text.splitlines()), ast.parse(text))
    return found


def edges(found: dict[str, Module]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports (`from pkg import mod` counts as pkg.mod)."""
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, module in found.items():
        for target, names, _line in module.imports():
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in found]
            if hits:
                graph[name].update(hits)
            elif target in found:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def room_of(module: Module, root: Path = REPO) -> str:
    """A module's room: its folder under daemon/ or pipeline/ (daemon/queue), else the file
    itself (daemon/cli.py); a flat daemon's modules by FLAT_ROOMS, to compare with the rooms."""
    rel = module.path.relative_to(root)
    if len(rel.parts) >= 3:
        return "/".join(rel.parts[:2])
    stem = rel.stem
    if rel.parts[0] == "daemon":
        for room, members in FLAT_ROOMS.items():
            if stem in members:
                return f"daemon/{room} (flat)"
    return rel.as_posix()


def table(root: Path = REPO) -> str:
    rooms: dict[str, list[Module]] = {}
    for module in modules(root).values():
        rooms.setdefault(room_of(module, root), []).append(module)
    rows = [
        "| room | modules | lines | classes | largest class | longest function |",
        "|---|---|---|---|---|---|",
    ]
    for room in sorted(rooms):
        members = rooms[room]
        classes = [(f"{c} ({m.name.rsplit('.', 1)[-1]})", n) for m in members for c, n in m.classes()]
        funcs = [(f"{f} ({m.name.rsplit('.', 1)[-1]})", n) for m in members for f, n in m.functions()]
        big = max(classes, key=lambda x: x[1], default=("-", 0))
        long = max(funcs, key=lambda x: x[1], default=("-", 0))
        rows.append(
            f"| {room} | {len(members)} | {sum(m.lines for m in members)} | {len(classes)} "
            f"| {big[0]} {big[1]} | {long[0]} {long[1]} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO))
