"""The package's folders are its layers: no module imports a later layer, no stage imports another,
and no two modules import each other (read from the source, function-level imports included)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hdb_jax"
# Bottom up, as hdb_jax/__init__.py and the README's layout table state them.
LAYERS = (
    "common",
    "sd",
    "adapters",
    "eval",
    "formats",
    "blocks",
    "toy",
    "data",
    "hypernet",
    "stages",
    "jobs",
)
ENTRY_POINTS = {"train", "personalize", "sample", "export_base"}  # hdb_jax/<name>.py -> jobs.<name>


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules) -> set[str]:
    """Every hdb_jax module ``path`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hdb_jax"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hdb_jax"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules and m != "hdb_jax"}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 2 and parts[1] in ENTRY_POINTS:
        return len(LAYERS)  # the short command-line names sit above everything
    if len(parts) < 2 or parts[1] not in LAYERS:
        raise AssertionError(f"{module} is in no layer: put it in one of {LAYERS}")
    return LAYERS.index(parts[1])


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(p, modules) for m, p in modules.items() if m != "hdb_jax"}


def test_the_layers_are_the_folders(graph):
    upward = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if _layer(d) > _layer(m) and not d.endswith("__init__")
    ]
    assert not upward, "imports of a later layer:\n" + "\n".join(sorted(upward))


def test_stages_are_peers(graph):
    crossing = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith("hdb_jax.stages.")
        for d in deps
        if d.startswith("hdb_jax.stages.")
    ]
    assert not crossing, crossing


def test_no_import_cycles(graph):
    # Tarjan's strongly connected components; any component of two or more modules is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_checks_catch_what_they_look_for():
    """A hand-made graph: an upward import and a two-module cycle are both found."""
    assert _layer("hdb_jax.common.images") < _layer("hdb_jax.jobs.demo")
    assert _layer("hdb_jax.train") == len(LAYERS)
    with pytest.raises(AssertionError, match="in no layer"):
        _layer("hdb_jax.misc")
    fake = {"hdb_jax.common.a": {"hdb_jax.jobs.b"}, "hdb_jax.jobs.b": {"hdb_jax.common.a"}}
    with pytest.raises(AssertionError, match="later layer"):
        test_the_layers_are_the_folders(fake)
    with pytest.raises(AssertionError):
        test_no_import_cycles(fake)
