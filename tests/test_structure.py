"""The layer rules of ARCHITECTURE.md, over every module of lorakit/ (imports inside functions too):

- a unit (a top-level module or a subpackage) imports only units of lower layers, or itself;
- the core (every layer up to io/) never imports hub/, tools/, training/, serving/ or cli/, nor the
  ``lorakit`` facade (``import lorakit as lk`` is for the layers above it);
- no two modules import each other, directly or through others.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "lorakit"
# the layers, lowest first (ARCHITECTURE.md); a unit may import units of lower layers only
LAYERS = [["errors"], ["config", "delta"], ["kernels"], ["variants"], ["layers"], ["model"], ["io"], ["hub"],
          ["tools"], ["serving"], ["training"], ["cli"]]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}
CORE_TOP = LEVEL["io"]  # the facade (lorakit/__init__.py) exports layers up to here


def module_name(path: Path) -> str:
    parts = ["lorakit", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path) -> set[str]:
    """The lorakit modules ``path`` imports, resolved to absolute names (submodules named in
    ``from . import x`` included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorakit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "lorakit":
                continue
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found |= set(submodules) or {target}
    return found


def unit_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the facade


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in MODULES} - {None, "__main__"}
    assert units <= set(LEVEL), f"add {sorted(units - set(LEVEL))} to LAYERS here and in ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if unit_of(m) not in (None, "__main__")))
def test_imports_go_down_the_layers(module):
    unit = unit_of(module)
    wrong = []
    for target in sorted(imported(MODULES[module])):
        other = unit_of(target)
        if other is None:
            if LEVEL[unit] <= CORE_TOP:
                wrong.append(f"{target} (the facade: the core imports the module it needs)")
        elif other != unit and LEVEL.get(other, 99) >= LEVEL[unit]:
            wrong.append(f"{target} ({other} is not below {unit})")
    assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycles():
    graph = {name: {t for t in imported(path) if t in MODULES and t != name} for name, path in MODULES.items()}
    graph["lorakit"] = set()  # the facade sits on top: importing it is an edge to the top, not into a cycle
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
