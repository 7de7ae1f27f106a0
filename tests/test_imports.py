"""Every module imports on its own, and the import graph of gansem + weights_port has no cycle.

Two checks:

* **isolation**: each module of ``gansem`` and ``weights_port`` is imported first thing in
  a fresh interpreter (a module that only works after another one was imported hides an
  order dependency, usually a cycle);
* **static graph**: every ``import`` statement of the two packages, at the top of a
  file or inside a function, is an edge from the importing module to the module it
  names (``from pkg import name`` names ``pkg.name`` when that is a module). The graph
  must be acyclic: ARCHITECTURE.md's layers, imports only downward.

Importing ``pkg.sub`` runs ``pkg/__init__.py`` first, so it is an edge to ``pkg`` too
(that is how ``gansem.generators`` ↔ ``weights_port`` was a cycle: the converters
import ``gansem.generators.<family>``, whose package ``__init__`` imported the
converters), except for

* the importer's own packages (a package's ``__init__`` is a facade above its
  submodules, which import their siblings while it is being initialised), and
* the top-level packages ``gansem`` and ``weights_port``: ``gansem/__init__.py`` is the
  public API, the topmost layer, importing everything and imported by nothing inside
  the packages; an explicit ``from gansem import <name defined in __init__>`` in a
  module of the packages still counts as an edge to it.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("gansem", "weights_port")


def _modules() -> dict:
    """``{dotted name: path}`` of every module of the packages."""
    out = {}
    for pkg in PACKAGES:
        for folder, dirs, files in os.walk(os.path.join(ROOT, pkg)):
            dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
            rel = os.path.relpath(folder, ROOT).replace(os.sep, ".")
            for f in sorted(files):
                if f.endswith(".py"):
                    out[rel if f == "__init__.py" else f"{rel}.{f[:-3]}"] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].endswith("__init__.py")


def _resolve(module: str, level: int, target: str) -> str:
    """Absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_edges(name: str) -> set:
    """Modules of the packages that ``name`` imports (anywhere in the file)."""
    tree = ast.parse(open(MODULES[name]).read(), MODULES[name])
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node.level, node.module or "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        own = {name} | {name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)}  # importer and packages
        for t in targets:
            while t and t not in MODULES:  # `import a.b.c` of a name inside a module
                t = t.rpartition(".")[0]
            if not t or t == name:
                continue
            edges.add(t)
            parts = t.split(".")
            for i in range(2, len(parts)):  # packages initialised on the way (not the top-level facade)
                p = ".".join(parts[:i])
                if p not in own:
                    edges.add(p)
    return edges


def find_cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(cycle: list, graph: dict) -> str:
    inside = set(cycle)
    return "\n".join(f"    {a} -> {', '.join(sorted(graph[a] & inside))}" for a in cycle)


def test_import_graph_has_no_cycle():
    graph = {m: import_edges(m) for m in MODULES}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (module -> modules of the same cycle it imports):\n" + "\n\n".join(
        _describe(c, graph) for c in cycles)


def test_graph_check_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_static_edges_see_imports_inside_functions():
    edges = import_edges("gansem.segment")
    assert "gansem.run" in edges and "gansem.batching" in edges
    assert "gansem" not in import_edges("gansem.run")  # `from . import zoo` names the submodule
    # a converter importing a family module also runs the families' package __init__
    assert {"gansem.generators", "gansem.generators.dcgan"} <= import_edges("weights_port.dcgan")
    # a package's own submodules do not point back at it
    assert "gansem.generators" not in import_edges("gansem.generators.dcgan")


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first, with none of ours loaded (third-party packages stay cached).

    One interpreter for all modules: before each import every ``gansem``/``weights_port``
    module is dropped from ``sys.modules``, so the module runs its imports from scratch,
    in its own order, as in a fresh interpreter; JAX, Flax and the like are imported once
    (they cannot depend on ours), which keeps the test fast.
    """
    code = (
        "import importlib, sys, traceback\n"
        f"mods = {sorted(MODULES)!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k.split('.')[0] in ('gansem', 'weights_port')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception:\n"
        "        bad.append(m + ':\\n' + traceback.format_exc(limit=-4))\n"
        "print('\\n\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, f"modules that fail to import on their own:\n{r.stdout}{r.stderr[-2000:]}"


def test_import_gansem_starts_no_backend():
    """Launch scripts set up devices after importing gansem: importing must not start JAX's backends."""
    code = ("import gansem\nfrom jax._src import xla_bridge\n"
            "assert not xla_bridge._backends, 'importing gansem started a JAX backend'\n"
            "print(sorted(gansem.__all__))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
