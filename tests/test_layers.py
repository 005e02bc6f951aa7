"""The house rules of ``pipeline/`` (docs/architecture.md), read from the imports in the source.

Every ``import`` and ``from ... import`` of every module counts, at module level or inside a
function: a forbidden import fails here however it is written.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "pipeline"

# What each layer may import from the package (besides itself). The base modules (errors, config,
# sysinfo, the package itself) may be imported by every layer and import no layer.
BASE = {"pipeline", "pipeline.errors", "pipeline.config", "pipeline.sysinfo", "pipeline.progress"}
MAY_IMPORT = {
    "base": set(),
    "codec": {"codec"},
    "io": {"io"},
    "index": {"io", "index"},
    "search": {"codec", "search"},
    "train": {"codec", "io", "train"},
    "distributed": {"codec", "io", "index", "search", "train", "distributed"},
    "stages": {"codec", "io", "index", "search", "train", "distributed", "stages"},
    "api": {"codec", "io", "index", "search", "train", "distributed", "stages", "api"},
    "cli": {"api", "cli"},  # the command line parses and calls the API, nothing below it
}
# Single modules another layer may use: the code dtype is a rule of the code format, which the
# index and the codes files follow too; the model file is stored with the storage functions.
EXTRA = {
    "io": {"pipeline.codec.codes"},
    "index": {"pipeline.codec.codes"},
    "codec": set(),
}
EXTRA_FOR_MODULE = {"pipeline.codec.model_file": {"pipeline.io.storage"}}
# Third-party packages a layer must not import.
FORBIDDEN_PACKAGES = {
    "codec": {"ray", "fsspec", "s3fs", "pyarrow"},
    "search": {"ray", "fsspec", "s3fs", "pyarrow"},
    "train": {"ray"},
    "io": {"ray", "torch"},
    "index": {"ray", "torch"},
    "api": {"ray"},
    "cli": {"ray", "torch"},
}
ALLOWED_FOR_MODULE = {"pipeline.codec.model_file": {"fsspec"}}


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "pipeline.__main__":
        return "cli"
    parts = module.split(".")
    if parts[1] == "cli":
        return "cli"
    return parts[1]


def _is_module(name: str) -> bool:
    p = ROOT.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def imports_of(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            # `from pipeline.io import storage` imports the module pipeline.io.storage (and the
            # package's empty __init__, which ties nothing)
            mods = {m for m in subs if _is_module(m)}
            out.update(mods)
            if len(mods) < len(subs):
                out.add(base)
    return out


def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in imports_of(path) if m in files and m != name}
    return graph


def third_party_of(path: pathlib.Path) -> set[str]:
    return {m.split(".")[0] for m in imports_of(path) if not m.startswith("pipeline")}


def violations(graph: dict[str, set[str]], third_party: dict[str, set[str]]) -> list[str]:
    """The imports that break a rule, one line each."""
    out = []
    for mod, deps in sorted(graph.items()):
        layer = layer_of(mod)
        for dep in sorted(deps):
            if dep in BASE:
                continue
            dl = layer_of(dep)
            ok = (dl in MAY_IMPORT[layer] or dep in EXTRA.get(layer, set())
                  or dep in EXTRA_FOR_MODULE.get(mod, set()))
            if layer == "base" and dl != "base":
                ok = False
            if not ok:
                out.append(f"{mod} ({layer}) imports {dep} ({dl})")
        for pkg in sorted(third_party.get(mod, set()) & FORBIDDEN_PACKAGES.get(layer, set())):
            if pkg not in ALLOWED_FOR_MODULE.get(mod, set()):
                out.append(f"{mod} ({layer}) imports {pkg}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles (strongly connected components of more than one module, or self-loops)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return package_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_layers_import_only_what_they_may(graph):
    third = {module_name(p): third_party_of(p) for p in ROOT.rglob("*.py")}
    assert violations(graph, third) == []


def test_every_module_belongs_to_a_layer(graph):
    for mod in graph:
        assert layer_of(mod) in MAY_IMPORT, mod


def test_the_rules_catch_a_forbidden_import(graph):
    """The checks fail on the imports the house forbids (so the tests above can fail)."""
    g = {k: set(v) for k, v in graph.items()}
    g["pipeline.codec.decoder"].add("pipeline.io.storage")  # codec math reading storage
    g["pipeline.io.vectors"].add("pipeline.codec.model")    # I/O that knows the model
    g["pipeline.search.scan"].add("pipeline.distributed.shard_pool")
    g["pipeline.cli"].add("pipeline.stages.encode")          # the CLI going around the API
    found = violations(g, {"pipeline.search.probe": {"ray"}, "pipeline.io.storage": {"torch"}})
    assert "pipeline.codec.decoder (codec) imports pipeline.io.storage (io)" in found
    assert "pipeline.io.vectors (io) imports pipeline.codec.model (codec)" in found
    assert "pipeline.search.scan (search) imports pipeline.distributed.shard_pool (distributed)" in found
    assert "pipeline.cli (cli) imports pipeline.stages.encode (stages)" in found
    assert "pipeline.search.probe (search) imports ray" in found
    assert "pipeline.io.storage (io) imports torch" in found
    g["pipeline.codec.model"].add("pipeline.codec.decoder")  # decoder -> model -> decoder
    assert any("pipeline.codec.model" in c and "pipeline.codec.decoder" in c for c in cycles(g))


def test_function_local_imports_only_in_the_cli():
    """Imports sit at the top of a module, where they show the graph; the CLI imports each
    command's API call when it runs (it must start without torch or Ray)."""
    local = []
    for path in ROOT.rglob("*.py"):
        if module_name(path) == "pipeline.cli":
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        local.append(f"{module_name(path)}:{node.lineno}")
    # sysinfo reads the peak RSS through `resource` where /proc is missing (not on every platform)
    assert [x for x in local if not x.startswith("pipeline.sysinfo:")] == []


def test_ray_jobs_only_call_the_cli():
    """``jobs/`` are entry points for ``ray job submit``: each parses with the CLI, which calls the
    API, so a job and its ``qinco`` command cannot drift apart."""
    jobs = sorted((ROOT.parent / "jobs").glob("*.py"))
    assert jobs
    for path in jobs:
        own = {m for m in imports_of(path) if m.startswith("pipeline")}
        assert own == {"pipeline.cli"}, (path.name, own)
