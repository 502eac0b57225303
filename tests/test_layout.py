"""The package layout, read from the modules' own source (``ast``; nothing of opd_jax is imported):

* no import cycle inside ``opd_jax``, counting function-local imports (a local import cannot
  dodge a cycle); ``from opd_jax.x import y`` where ``opd_jax.x.y`` is a module is an edge to that
  module; the implicit import of a parent package by its submodules is not an edge;
* no module uses another module's private (leading-underscore) name, nor ``jax._src``;
* no module ``__getattr__`` except the lazy top-level namespace in ``opd_jax/__init__.py``;
* no module over ``MAX_LINES`` lines;
* ``import opd_jax.losses`` stays light (no flax, orbax, grain, tokenizers, ...);
* ``ruff check`` passes (skipped when ruff is not installed).
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "opd_jax"
MAX_LINES = 450
HEAVY = ("flax", "orbax", "grain", "tokenizers", "sentencepiece", "optax")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def owning_module(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is an opd_jax module (``None`` outside opd_jax)."""
    while dotted:
        if dotted in MODULES:
            return dotted
        dotted = dotted.rpartition(".")[0]
    return None


def imported_from(name: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import`` in module ``name``."""
    if not node.level:
        return node.module or ""
    base = name.split(".")
    keep = len(base) - node.level + (1 if is_package(name) else 0)
    return ".".join(base[:keep] + ([node.module] if node.module else []))


def import_targets(name: str, node: ast.Import | ast.ImportFrom) -> list[tuple[str, str | None]]:
    """``(module, imported attribute or None)`` of every name an import statement binds."""
    if isinstance(node, ast.Import):
        return [(alias.name, None) for alias in node.names]
    source = imported_from(name, node)
    return [(f"{source}.{alias.name}", None) if f"{source}.{alias.name}" in MODULES
            else (source, alias.name) for alias in node.names]


def import_graph(trees: dict[str, ast.Module] = TREES) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every import statement, local ones included."""
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, _ in import_targets(name, node):
                    owner = owning_module(target)
                    # a submodule's import of its own parent package is implicit: not an edge
                    if owner and owner != name and not name.startswith(owner + "."):
                        graph[name].add(owner)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle ``[a, b, ..., a]`` of ``graph``, or ``None``."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def is_private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def dotted(node: ast.expr) -> str | None:
    """``a.b.c`` of a ``Name`` / ``Attribute`` chain (``None`` for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (head := dotted(node.value)):
        return f"{head}.{node.attr}"
    return None


def private_uses(name: str, tree: ast.Module) -> list[str]:
    """``line: what`` for each private name of another module that module ``name`` uses."""
    found, aliases = [], {}  # aliases: local name -> the opd_jax module it is bound to
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for target, attr in import_targets(name, node):
            if target == "jax._src" or target.startswith("jax._src."):
                found.append(f"{node.lineno}: imports {target}")
            elif attr is not None and is_private(attr) and owning_module(target) not in (None, name):
                found.append(f"{node.lineno}: from {target} import {attr}")
        for alias in node.names:
            if isinstance(node, ast.Import):  # ``import a.b`` binds ``a``; ``import a.b as c``: a.b
                module = alias.name if alias.asname else alias.name.split(".")[0]
                bound = alias.asname or module
            else:
                module, bound = f"{imported_from(name, node)}.{alias.name}", alias.asname or alias.name
            if module in MODULES:
                aliases[bound] = module
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = dotted(node.value)
            if chain is None or chain.split(".")[0] not in aliases:
                continue
            head, _, rest = chain.partition(".")
            module = aliases[head] + (f".{rest}" if rest else "")
            if module in MODULES and module != name:
                found.append(f"{node.lineno}: {chain}.{node.attr} (private to {module})")
    return found


def module_level(tree: ast.Module):
    """The module's own statements, into ``if`` / ``try`` / ``with`` blocks but not into defs."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle (local imports counted): " + " -> ".join(cycle)


def test_the_checks_see_local_imports_and_private_names():
    # the graph and the private-name scan on a made-up module (names of real opd_jax modules)
    tree = ast.parse(
        "import opd_jax.config as C\n"
        "from opd_jax.config import core\n"
        "from opd_jax.checks import _hidden\n"
        "from jax._src import core as jcore\n"
        "def f():\n"
        "    from opd_jax.cli import main\n"
        "    return C._x, core._y, C.__name__\n")
    graph = import_graph({"opd_jax.analyze": tree})
    assert graph["opd_jax.analyze"] == {"opd_jax.config", "opd_jax.config.core", "opd_jax.checks",
                                        "opd_jax.cli"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    uses = private_uses("opd_jax.analyze", tree)
    assert sorted(u.split(":")[0] for u in uses) == ["3", "4", "7", "7"], uses


def test_no_private_names_across_modules():
    offenders = [f"{MODULES[name].relative_to(ROOT)}:{use}"
                 for name, tree in TREES.items() for use in private_uses(name, tree)]
    assert not offenders, "private names used outside their module:\n" + "\n".join(offenders)


def test_no_module_getattr_outside_top_level():
    offenders = [str(MODULES[name].relative_to(ROOT)) for name, tree in TREES.items()
                 if name != "opd_jax" and any(isinstance(node, ast.FunctionDef)
                                              and node.name == "__getattr__"
                                              for node in module_level(tree))]
    assert not offenders, f"module __getattr__ (re-export tricks) in: {offenders}"


def test_modules_are_short():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
               for path in MODULES.values()}
    offenders = {path: n for path, n in sorted(lengths.items()) if n > MAX_LINES}
    assert not offenders, f"modules over {MAX_LINES} lines (split them): {offenders}"


def test_losses_import_is_light():
    code = (f"import json, sys; import opd_jax.losses; "
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert out.returncode == 0, out.stderr
    heavy = json.loads(out.stdout.strip().splitlines()[-1])
    assert not heavy, f"import opd_jax.losses pulls in {heavy}"


def test_ruff_passes():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if ruff is None:
        pytest.skip("ruff is not installed (make test installs it)")
    out = subprocess.run([ruff, "check", "--no-cache", "."], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
