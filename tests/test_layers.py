"""The package's layers: the pure ones never reach I/O, not even through another project module,
and imports point down only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "p2pfl"
# The pure layers: protocol, math, the round state machine, the simulator. Time is an input.
PURE = ("errors", "config", "core", "ppfm", "node", "sim")
IO = {"asyncio", "zmq", "socket", "selectors", "threading", "time", "os", "tempfile", "subprocess", "shutil", "uvloop",
      "io", "glob", "safetensors", "multiprocessing", "concurrent", "signal"}
FILE_CALLS = {"open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "unlink", "iterdir", "glob"}
# What each layer may import besides itself (a layer never imports one above it).
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "core": {"errors", "config"},
    "ppfm": {"errors", "config", "core"},
    "node": {"errors", "config", "core", "ppfm"},
    "learn": {"errors", "config"},
    "sim": {"errors", "config", "core", "ppfm", "node"},
    "net": {"errors", "config", "core"},
    "host": {"errors", "config", "core", "ppfm", "node", "learn", "net"},
    "ops": {"errors", "config", "core", "ppfm", "node", "learn", "net", "host", "sim"},
}


class Tree:
    """The import graph of a package tree (`root/p2pfl`), read from the source as text."""

    def __init__(self, root: Path) -> None:
        self.root, self.pkg = root, root / "p2pfl"
        self._direct: dict[Path, tuple[frozenset[str], frozenset[str], tuple[str, ...]]] = {}

    def path(self, name: str) -> Path | None:
        """The file of project module `name` (`p2pfl.core.wire`), or None if it is not one."""
        parts = name.split(".")
        if parts[0] != "p2pfl":
            return None
        base = self.pkg.joinpath(*parts[1:])
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.exists():
                return cand
        return None

    def name(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        return ".".join(parts)

    def direct(self, path: Path) -> tuple[frozenset[str], frozenset[str], tuple[str, ...]]:
        """(project modules, outside top-level modules, file calls) that `path` uses, function-level imports included."""
        if path not in self._direct:
            project, outside, calls = set(), set(), []
            for n in ast.walk(ast.parse(path.read_text())):
                names: list[str] = []
                if isinstance(n, ast.Import):
                    names = [a.name for a in n.names]
                elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
                elif isinstance(n, ast.Call):
                    f = n.func
                    fname = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                    if fname in FILE_CALLS:
                        calls.append(f"{fname}() at line {n.lineno}")
                for name in names:
                    if not name.startswith("p2pfl"):
                        outside.add(name.split(".")[0])
                    elif self.path(name) is not None:
                        project.add(name)
            self._direct[path] = (frozenset(project), frozenset(outside), tuple(calls))
        return self._direct[path]

    def reach(self, start: str) -> dict[str, list[str]]:
        """Every project module `start` reaches, with the import chain that gets there."""
        chains = {start: [start]}
        todo = [start]
        while todo:
            name = todo.pop()
            for dep in sorted(self.direct(self.path(name))[0]):
                if dep not in chains:
                    chains[dep] = [*chains[name], dep]
                    todo.append(dep)
        return chains


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "p2pfl"


TREE = Tree(ROOT)


def pure_modules() -> list[str]:
    return [n for n in (TREE.name(p) for p in sorted(PKG.rglob("*.py"))) if layer(n) in PURE]


@pytest.mark.parametrize("module", pure_modules())
def test_pure_modules_reach_no_io_through_any_import(module):
    """The round, the protocol and the math take time as an input and never touch a socket, a
    thread, a clock or a file, directly or through another project module."""
    for name, chain in TREE.reach(module).items():
        _, outside, calls = TREE.direct(TREE.path(name))
        bad = outside & IO
        assert not bad, f"{module} reaches {sorted(bad)} through {' -> '.join(chain)}"
        assert not calls, f"{module} reaches file access {list(calls)} in {name} through {' -> '.join(chain)}"
        assert layer(name) in PURE, f"{module} reaches the impure layer {layer(name)} through {' -> '.join(chain)}"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: TREE.name(p))
def test_imports_point_down(path):
    name = TREE.name(path)
    own = layer(name)
    if own not in ALLOWED:
        return  # the package's face (p2pfl/__init__.py, __main__.py) may import anything
    for dep in TREE.direct(path)[0]:
        assert layer(dep) in ALLOWED[own] | {own}, f"{name} ({own}) imports {dep} ({layer(dep)}): {own} may import {sorted(ALLOWED[own])}"


def test_every_module_is_in_a_layer():
    layers = {layer(TREE.name(p)) for p in PKG.rglob("*.py")}
    assert layers - set(ALLOWED) <= {"p2pfl", "__main__"}, layers


def test_the_walk_follows_an_import_through_another_module(tmp_path):
    """A pure module that imports a project module which lazily imports one using `time` and
    `open` is caught, two hops away."""
    pkg = tmp_path / "p2pfl"
    (pkg / "core").mkdir(parents=True)
    for f, text in {"__init__.py": "", "core/__init__.py": "", "core/a.py": "from p2pfl.core import b\n",
                    "core/b.py": "def f():\n    import p2pfl.core.c\n", "core/c.py": "import time\nopen('x')\n"}.items():
        (pkg / f).write_text(text)
    tree = Tree(tmp_path)
    assert tree.reach("p2pfl.core.a")["p2pfl.core.c"] == ["p2pfl.core.a", "p2pfl.core.b", "p2pfl.core.c"]
    _, outside, calls = tree.direct(pkg / "core" / "c.py")
    assert "time" in outside and calls == ("open() at line 2",)
