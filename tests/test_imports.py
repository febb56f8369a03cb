"""No import cycle among gptjax's modules, lazy (function-level) imports included.

An edge is what an import statement names: `import a.b` -> a.b, `from a.b import c` -> a.b (the
module the statement names, as a reader of the code sees it, even when c is a submodule)."""

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
                targets = [base]
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
    assert "gptjax.data.corpus" in graph["gptjax.data.documents"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
