"""The core's imports go one way: no module of lorakit/ imports, directly or through others, a
module that imports it back (lazily inside a function included)."""

import ast
from pathlib import Path

CORE = {p.stem: p for p in (Path(__file__).parent.parent / "lorakit").glob("*.py")
        if p.stem not in ("__init__", "__main__")}


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(CORE)


def test_core_imports_have_no_cycles():
    graph = {name: imports_of(path) for name, path in CORE.items()}
    cycles, done = [], set()

    def visit(node, stack):  # depth-first; a module on the current path seen again closes a cycle
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, cycles[:5]
