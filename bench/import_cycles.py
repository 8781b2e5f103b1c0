#!/usr/bin/env python3
"""Import circles among the modules of some source roots: exit 1 when there is one.

A root is a folder on ``sys.path`` (``src``: the ``quench`` package; ``bench``: its flat
scripts and helper modules). An edge is an ``import`` or ``from ... import`` of a module of
the same roots: at module level, or with ``--local`` also inside functions. A circle is a
strongly connected component of more than one module (or a module importing itself).

    .venv/bin/python bench/import_cycles.py src bench [--local]
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(p.isidentifier() for p in parts):
            out[".".join(parts)] = path
    return out


def imported(
    tree: ast.Module, name: str, is_pkg: bool, local: bool
) -> Iterator[tuple[str, list[str]]]:
    """What a module imports: (module, []) for ``import module``, (module, names) for
    ``from module import names`` (relative ones resolved)."""
    nodes = _statements(tree.body, local)
    package = name if is_pkg else name.rpartition(".")[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from ((a.name, []) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            yield base, [a.name for a in node.names]


def _statements(body: list[ast.stmt], local: bool) -> Iterator[ast.stmt]:
    """The statements of ``body`` run on import: inside if/try/with blocks too, and with
    ``local`` inside functions and classes; never under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        if local or isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _statements([child], local)
                elif isinstance(child, ast.excepthandler):
                    yield from _statements(child.body, local)


def graph(roots: list[Path], local: bool) -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for root in roots:
        mods.update(modules(root))
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, names in imported(tree, name, path.name == "__init__.py", local):
            # ``from pkg import sub``: an edge to the submodule, not to the package's __init__
            targets = [f"{base}.{n}" if f"{base}.{n}" in mods else base for n in names]
            edges[name].update(t for t in targets or [base] if t in mods and t != name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("roots", nargs="+", type=Path, help="Folders on sys.path (e.g. src bench).")
    ap.add_argument("--local", action="store_true", help="Count imports inside functions too.")
    a = ap.parse_args(argv)
    edges = graph(a.roots, a.local)
    found = circles(edges)
    for comp in found:
        inner = {m: sorted(edges[m] & set(comp)) for m in comp}
        print(
            f"circle of {len(comp)}: "
            + "; ".join(f"{m} -> {', '.join(t)}" for m, t in inner.items())
        )
    print(f"{len(edges)} modules, {len(found)} import circle(s)", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
