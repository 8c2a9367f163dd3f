"""The package's import graph, read from the source (module-level and function-level imports): no
cycle between modules, and no private name imported from another package."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "stdistill"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """(line, imported module, imported names) of every import in ``path``, lazy ones included;
    relative imports resolved; ``from pkg import sub`` yields the submodule ``pkg.sub``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (path.name == "__init__.py")]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            for a in node.names:
                sub = f"{stem}.{a.name}"
                yield node.lineno, (sub if sub in mods else stem), ([] if sub in mods else [a.name])


def _graph(root: Path) -> dict[str, set[str]]:
    """Module -> modules it imports (package ``__init__`` files are namespaces, not edges)."""
    mods = _modules(root)
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for _, target, _ in _imports(m, f, mods):
            while target not in mods and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in mods and target != m and mods[target].name != "__init__.py":
                graph[m].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_lazy_cycle(tmp_path):
    """The checker itself: a cycle closed by an import inside a function is found."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import f\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert _cycles(_graph(pkg)) == [["pkg.a", "pkg.sub.b"]]


def test_no_import_cycle():
    cycles = _cycles(_graph(SRC))
    assert not cycles, "import cycles between modules (move what both sides need to a neutral module):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_name_across_packages():
    """``from stdistill.<a>... import _name`` only inside package ``<a>``: what several packages share
    lives in a neutral module under a public name."""
    mods = _modules(SRC)
    bad = []
    for m, f in mods.items():
        own = m.split(".")[1] if "." in m else ""
        for line, target, names in _imports(m, f, mods):
            if not target.startswith("stdistill"):
                continue
            theirs = target.split(".")[1] if "." in target else ""
            for n in names:
                if n.startswith("_") and not n.startswith("__") and theirs != own:
                    bad.append(f"{f.relative_to(SRC.parent)}:{line} imports {target}.{n}")
    assert not bad, "private names used across packages:\n" + "\n".join(bad)
