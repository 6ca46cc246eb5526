"""The house's rules, as docs/architecture.md draws them: imports point down the floors, and none goes in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import card_mcp

PACKAGE = Path(card_mcp.__file__).parent

# docs/architecture.md's floors, top (0) to bottom; a module may import its own floor or lower ones.
FLOORS = {
    0: {
        "cli",
        "admin",
        "output",
        "lifecycle",
        "server",
        "http_app",
        "http_edges",
        "http_answers",
        "sessions",
        "stdio",
        "auth",
        "oauth",
        "issuer",
        "signin",
    },
    1: {"tools", "registry", "resources", "prompts"},
    2: {"calls"},
    3: {
        "cards",
        "history",
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
    4: {"db", "jsonb", "migrate", "embedded", "bootstrap", "locks"},
    5: {"models", "errors", "config", "logs", "__init__"},
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


def modules_after_importing(module: str) -> set[str]:
    """The modules a fresh interpreter holds after importing ``module`` alone."""
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_importing_the_command_line_loads_no_mcp_sdk_nor_http_stack() -> None:
    """Start-up: `card-mcp --version`, `tenants list` and the like pay only for what they use; `serve` imports the
    SDK when it runs."""
    loaded = modules_after_importing("card_mcp.cli")
    assert not {m for m in loaded if m.split(".")[0] in {"mcp", "uvicorn", "starlette", "jwt", "matplotlib"}}
    assert not loaded & {"card_mcp.server", "card_mcp.http_app", "card_mcp.stdio", "uvloop"}


def test_serving_over_stdio_loads_neither_the_http_app_nor_the_oauth_pages_nor_jwt() -> None:
    loaded = modules_after_importing("card_mcp.server, card_mcp.stdio")
    assert not loaded & {"card_mcp.http_app", "card_mcp.signin", "card_mcp.issuer", "jwt", "difflib"}
