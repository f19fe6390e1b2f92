"""Imports go one way: down the stages of DESIGN.md's data flow, never up, never round.

Every ``import`` of a workbench module counts, at the top of a file or inside a function (a function-level
import defers a dependency, it does not remove it). A module belongs to the layer of the longest prefix in
``LAYERS`` that names it; it may import its own layer and the layers before it. The upward imports that remain
are listed in ``UPWARD`` with their reasons, and so are the lazy attributes of package facades (``FACADES``)
and the known import cycles (``CYCLES``). A new upward import or cycle fails here with the file and line; an
entry of those lists that no longer occurs fails too, so the lists stay the truth. Pure ``ast``: nothing is
imported, about a second.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"

#: Lowest first. "base" and "measure" serve every stage (the root package: ``__version__``); "inputs" are what
#: stages read and write besides graphs; then the data flow: the IR and the paged layout it describes (the
#: tuner's example steps use it), the op registry and its kernels (the graph executor looks ops up in the
#: registry, and autotuning is the registry's), the graph stages, evaluating a program (perplexity, greedy
#: drivers: used by quant and the build's gate), precision,
#: analysis, the stage drivers, engine directories, opening what runs, finding where it diverges (debug), the
#: runtime, the server, and the user interfaces over all of them.
LAYERS = (
    ("base", ("workbench.errors", "workbench.env", "workbench.device", "workbench.plugins", "workbench.progress",
              "workbench.display", "workbench.distributed")),
    ("measure", ("workbench.profiling.nvtx", "workbench.profiling.timing", "workbench.profiling.ceilings")),
    ("inputs", ("workbench.models", "workbench.workspace")),
    ("ir", ("workbench.graph.ir", "workbench.graph.paged")),
    ("kernels", ("workbench.kernels",)),
    ("graph", ("workbench.graph",)),
    ("evaluate", ("workbench.evaluate",)),
    ("quant", ("workbench.quant",)),
    ("profiling", ("workbench.profiling",)),
    ("pipeline", ("workbench.pipeline",)),
    ("engine", ("workbench.engine",)),
    ("runnable", ("workbench.runnable",)),
    ("debug", ("workbench.debug",)),
    ("runtime", ("workbench.runtime",)),
    ("serve", ("workbench.serve",)),
    ("ui", ("workbench.cli", "workbench.__main__", "workbench.graph.widgets", "workbench.quant.widgets",
            "workbench.profiling.widgets", "workbench.runtime.widgets", "workbench.debug.widgets")),
)
ROOT = "workbench"  # the package itself is "base": it defines ``__version__`` and imports errors alone

#: Lazy attributes (PEP 562 ``__getattr__``) of a package's ``__init__``: imported on first use, so that importing
#: the package stays light; not dependencies of the package's own modules, so left out of both checks.
FACADES = {
    (ROOT, "workbench.runtime.engine"): "`from workbench import LLM`: the front door, loaded on first use",
    (ROOT, "workbench.runtime.sampling"): "`from workbench import SamplingParams`, likewise",
    ("workbench.graph", "workbench.graph.executor"): "`from workbench.graph import Program`: eager, it would make "
    "importing graph.ir (which kernels/cost.py does) import the executor, which imports the kernels",
}

#: (importer, imported) -> why it stays for now.
UPWARD = {}

#: Import cycles (modules that import each other, directly or round) -> why they stay for now.
CYCLES = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and \
        (getattr(test, "id", None) or getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of a workbench module; ``from a import b`` imports ``a.b``
    where that is a module, else ``a``."""
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo = [ast.parse(path.read_text())]
        while todo:
            node = todo.pop()
            todo.extend(c for c in ast.iter_child_nodes(node) if not _type_checking(c))
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base == ROOT or base.startswith(ROOT + "."):
                    edges += [(name, f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base, node.lineno)
                              for a in node.names]
            elif isinstance(node, ast.Import):
                edges += [(name, a.name, node.lineno) for a in node.names
                          if a.name == ROOT or a.name.startswith(ROOT + ".")]
    return sorted(set(edges))


def _layer(module: str) -> int | None:
    if module == ROOT:
        return 0
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    return None if best is None else best[1]


def _where(mods, importer, line) -> str:
    return f"{mods[importer].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, f"add these modules to a layer of LAYERS in tests/test_layers.py: {', '.join(missing)}"


def test_no_upward_imports_beyond_the_listed_ones():
    mods = _modules()
    upward: dict[tuple[str, str], list[int]] = {}
    for importer, imported, line in _imports(mods):
        if (importer, imported) not in FACADES and _layer(imported) > _layer(importer):
            upward.setdefault((importer, imported), []).append(line)
    new = [f"{_where(mods, a, lines[0])}: {a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
           for (a, b), lines in upward.items() if (a, b) not in UPWARD]
    assert not new, ("imports from a lower layer into a higher one (move the code down, or pass it in):\n  "
                     + "\n  ".join(new))
    gone = sorted(set(UPWARD) - set(upward))
    assert not gone, f"no longer imported, remove from UPWARD in tests/test_layers.py: {gone}"


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_no_import_cycles_beyond_the_listed_ones():
    # importing a.b.c runs the __init__ of a.b too, so that edge counts, except into one's own packages (which
    # are running already); an explicit import of one's own package (``from . import X``) counts
    mods = _modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for importer, imported, _ in _imports(mods):
        if (importer, imported) in FACADES:
            continue
        if imported != importer:
            edges[importer].add(imported)
        parts = imported.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in mods and not (importer == parent or importer.startswith(parent + ".")):
                edges[importer].add(parent)
    cycles = _cycles(edges)
    new = [sorted(c) for c in cycles if c not in CYCLES]
    assert not new, "import cycles (break them by moving what both sides need down a layer):\n  " + \
        "\n  ".join(" <-> ".join(c) for c in new)
    gone = [sorted(c) for c in CYCLES if c not in cycles]
    assert not gone, f"no longer a cycle, remove from CYCLES in tests/test_layers.py: {gone}"


def test_the_checks_see_function_level_imports_and_layers():
    """The parser counts an import inside a function (autotune's paged layout is one) and orders layers as listed."""
    edges = _imports(_modules())
    assert ("workbench.kernels.autotune", "workbench.graph.paged") in {(a, b) for a, b, _ in edges}
    assert ("workbench.kernels.autotune", "workbench.env") in {(a, b) for a, b, _ in edges}
    assert _layer("workbench.graph.ir") < _layer("workbench.kernels.autotune") < _layer("workbench.graph.executor")
    assert _layer("workbench.profiling.timing") < _layer("workbench.kernels") < _layer("workbench.profiling.trace")
    assert _layer("workbench.runtime.metrics") < _layer("workbench.serve.metrics") < _layer("workbench.cli")
