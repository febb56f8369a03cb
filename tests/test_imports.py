"""No import cycle among gptjax's modules, lazy (function-level) imports included.

An edge is what an import statement names: `import a.b` -> a.b, `from a.b import c` -> a.b (the
module the statement names, as a reader of the code sees it) and a.b.c too when c is a module."""

import ast

from conftest import ROOT


def module_graph() -> dict[str, set[str]]:
    package = ROOT / "gptjax"
    files = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    graph = {name: set() for name in files}
    for name, path in files.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package `level - 1` levels up
                    parents = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parents + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    graph = module_graph()
    assert "gptjax.data.pipeline" in graph["gptjax.data"]  # the graph is really read
    assert "gptjax.data.corpus" in graph["gptjax.data.array_records"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


# The layers, top (1) to bottom (6): a module imports only from layers below its own, from its
# own package, or (the applications of layer 2, and the base modules of layer 6) from its peers.
LAYERS = {
    "gptjax.__main__": 1,
    "gptjax.cli": 1,
    "gptjax.experiments": 2,
    "gptjax.inference": 2,
    "gptjax.evaluation": 2,
    "gptjax.interop": 2,
    "gptjax.tools": 2,
    "gptjax.training": 3,
    "gptjax.core": 4,
    "gptjax.data": 5,
    "gptjax.config": 6,
    "gptjax.distributed": 6,
    "gptjax.errors": 6,
    "gptjax.atomic": 6,
    "gptjax.compile_cache": 6,
    "gptjax.progress": 6,
    "gptjax": 6,  # the package itself: its version only
}
PEERS = {1, 2, 6}  # layers whose members may use each other


def group(module: str) -> str:
    """The entry of LAYERS a module belongs to (its longest matching prefix)."""
    for name in sorted(LAYERS, key=len, reverse=True):
        if module == name or module.startswith(name + ".") or name == "gptjax":
            return name
    raise AssertionError(module)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up the layers or across them, as 'a -> b (layer m -> n)'."""
    found = []
    for source, targets in sorted(graph.items()):
        here = group(source)
        for target in sorted(targets):
            there = group(target)
            low, high = LAYERS[here], LAYERS[there]
            if here == there or high > low or (high == low and low in PEERS):
                continue
            found.append(f"{source} -> {target} (layer {low} -> {high})")
    return found


def test_every_module_has_a_layer():
    for module in module_graph():
        assert group(module) != "gptjax" or module == "gptjax", f"{module}: add it to LAYERS"


def test_the_layer_checker_finds_a_wrong_import():
    graph = {
        "gptjax.core.model": {"gptjax.training.loop", "gptjax.data.batching"},  # up; down
        "gptjax.training.loop": {"gptjax.inference.generate"},  # up
        "gptjax.data.pipeline": {"gptjax.core.steps"},  # up
        "gptjax.tools.plan": {"gptjax.experiments.spec", "gptjax.core.steps"},  # peers; down
        "gptjax.core.steps": {"gptjax.training.metrics"},  # up
        "gptjax.training.runs": {"gptjax.core.steps", "gptjax.config"},  # down
        "gptjax.config": {"gptjax.data.sources"},  # up
        "gptjax.distributed": {"gptjax.config"},  # peers
    }
    assert violations(graph) == [
        "gptjax.config -> gptjax.data.sources (layer 6 -> 5)",
        "gptjax.core.model -> gptjax.training.loop (layer 4 -> 3)",
        "gptjax.core.steps -> gptjax.training.metrics (layer 4 -> 3)",
        "gptjax.data.pipeline -> gptjax.core.steps (layer 5 -> 4)",
        "gptjax.training.loop -> gptjax.inference.generate (layer 3 -> 2)",
    ]


def test_imports_go_down_the_layers():
    graph = module_graph()
    assert "gptjax.core.steps" in graph["gptjax.training.loop"]  # the graph is really read
    assert "gptjax.data.sources" in graph["gptjax.training.loop"]
    assert violations(graph) == []
