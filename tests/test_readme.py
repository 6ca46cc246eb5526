"""The README documents every tool, command and environment variable there is."""

from __future__ import annotations

import re
from pathlib import Path

from card_mcp.cli import _parser
from card_mcp.config import Settings
from card_mcp.tools import TOOLS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_environment_variable_is_in_the_readme() -> None:
    for name in Settings.model_fields:
        if name == "transport":  # set by `serve --transport`, not documented as a variable
            continue
        assert f"CARD_MCP_{name.upper()}" in README, name


def test_every_command_is_in_the_readme() -> None:
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name, sub in commands.items():
        actions = [a for a in sub._actions if a.choices and a.dest == "action"]
        subnames = list(actions[0].choices) if actions else [""]  # type: ignore[arg-type]
        for action in subnames:
            assert f"card-mcp {name} {action}".strip() in README, (name, action)


def test_every_tool_is_in_the_readme() -> None:
    assert TOOLS
    for tool in TOOLS:
        assert f"`{tool.name}`" in README, tool.name


def test_the_readmes_layout_names_every_module_of_the_package() -> None:
    package = Path(__file__).resolve().parent.parent / "card_mcp"
    layout = README.split("\ncard_mcp/ ", 1)[1].split("\nschema/", 1)[0]
    named = set(re.findall(r"\b(\w+)\.py\b", layout))
    assert named == {path.stem for path in package.glob("*.py")} - {"__init__"}
