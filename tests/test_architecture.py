"""The house's rules, as docs/architecture.md draws them: imports point down the floors, and none goes in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import card_mcp

PACKAGE = Path(card_mcp.__file__).parent

# docs/architecture.md's floors, top (0) to bottom; a module may import its own floor or lower ones.
FLOORS = {
    0: {"cli", "output", "lifecycle", "server", "http_app", "stdio", "auth", "oauth", "issuer", "signin"},
    1: {"tools", "registry", "resources", "prompts"},
    2: {"calls"},
    3: {
        "cards",
        "search",
        "usage",
        "idempotency",
        "keys",
        "tenants",
        "readers",
        "connections",
        "semantic",
        "chart",
        "retention",
        "transfer",
    },
    4: {"db", "migrate", "embedded"},
    5: {"models", "errors", "config", "__init__"},
}
FLOOR = {module: floor for floor, modules in FLOORS.items() for module in modules}


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (anywhere in it, TYPE_CHECKING included)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets |= {node.module.split(".")[0]} if node.module else {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("card_mcp."):
                targets.add((node.module or "").split(".")[1])
        found[path.stem] = {target for target in targets if (PACKAGE / f"{target}.py").exists()} - {path.stem}
    return found


def test_every_module_has_a_floor() -> None:
    assert set(imports()) == set(FLOOR)


def test_imports_never_point_up_a_floor() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in imports().items()
        for target in targets
        if FLOOR[target] < FLOOR[module]
    ]
    assert upward == []


def test_no_imports_go_in_a_circle() -> None:
    graph = imports()
    circles = []

    def visit(module: str, path: tuple[str, ...]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                circles.append(" -> ".join((*path[path.index(target) :], target)))
            else:
                visit(target, (*path, target))

    for module in sorted(graph):
        visit(module, (module,))
    assert circles == []
