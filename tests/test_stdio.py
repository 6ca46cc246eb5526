"""End to end: a real `card-mcp serve` subprocess on the embedded PostgreSQL, through the SDK's stdio client."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.server import MCPServer
from mcp.types import CallToolResult, Implementation

from tests.conftest import make_tempdir
from tests.test_embedded import postgres_processes

CARD_MCP = str(Path(sys.executable).parent / "card-mcp")


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    folder = make_tempdir("card-mcp-stdio-")
    try:
        yield folder
    finally:
        assert postgres_processes(folder / "pgdata") == [], "a serve process left PostgreSQL running"
        shutil.rmtree(folder, ignore_errors=True)


def server_params(data_dir: Path, tenant: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=CARD_MCP, args=["serve", "--tenant", tenant], env={"CARD_MCP_DATA_DIR": str(data_dir)}
    )


def payload(result: CallToolResult) -> dict[str, Any]:
    text = result.content[0].text  # type: ignore[union-attr]
    data: dict[str, Any] = json.loads(text)
    return data


async def test_serve_over_stdio_lists_and_calls_every_tool_and_keeps_tenants_apart(data_dir: Path) -> None:
    info = Implementation(name="stdio-e2e", version="0.1")
    async with Client(server_params(data_dir, "brand-a"), mode="legacy", client_info=info) as a:
        tools = {t.name: t for t in (await a.list_tools()).tools}
        assert len(tools) == 9
        for tool in tools.values():
            assert "$schema" not in tool.input_schema and tool.annotations is not None
        created = payload(
            await a.call_tool(
                "create_card",
                {"card_type": "company", "title": "Acme", "content": {"about": "rockets"}, "tags": ["core"]},
            )
        )
        card_id = created["card"]["id"]
        assert payload(await a.call_tool("get_card", {"card_id": card_id}))["card"]["title"] == "Acme"
        assert [c["id"] for c in payload(await a.call_tool("search_cards", {"query": "rockets"}))["cards"]] == [card_id]
        batch = payload(
            await a.call_tool(
                "batch_create_cards",
                {
                    "cards": [
                        {"card_type": "voice", "title": "Voice", "content": {"tone": "bold"}},
                        {"card_type": "audience", "title": "Makers", "content": {"who": "engineers"}},
                    ]
                },
            )
        )
        assert batch["created"] == 2
        updated = payload(
            await a.call_tool("update_card", {"card_id": card_id, "title": "Acme Inc", "expected_version": 1})
        )
        assert updated["card"]["version"] == 2
        deletable = batch["results"][0]["card_id"]
        assert payload(await a.call_tool("delete_card", {"card_id": deletable}))["card_id"] == deletable
        assert payload(await a.call_tool("restore_card", {"card_id": deletable}))["card"]["version"] == 3
        versions = payload(await a.call_tool("get_card_history", {"card_id": deletable}))["versions"]
        assert [(v["op"], v["changed_by"]["transport"], v["changed_by"]["client_name"]) for v in versions] == [
            ("restore", "stdio", "stdio-e2e"),
            ("delete", "stdio", "stdio-e2e"),
            ("create", "stdio", "stdio-e2e"),
        ]
        stats = payload(await a.call_tool("usage_stats", {"group_by": "client"}))
        assert stats["rows"][0]["key"] == "stdio-e2e"
        bad = await a.call_tool("get_card", {"card_id": "nope"})
        assert bad.is_error and payload(bad)["error"]["code"] == "invalid_argument"

        async with Client(server_params(data_dir, "brand-b"), mode="legacy", client_info=info) as b:
            for other in (card_id, batch["results"][1]["card_id"]):
                missing = await b.call_tool("get_card", {"card_id": other})
                assert missing.is_error and payload(missing)["error"]["code"] == "not_found"
            assert payload(await b.call_tool("search_cards", {"query": "rockets"}))["cards"] == []
            assert payload(await b.call_tool("search_cards", {}))["cards"] == []
            history = await b.call_tool("get_card_history", {"card_id": deletable})
            assert history.is_error and payload(history)["error"]["code"] == "not_found"


def start_serve(data_dir: Path) -> subprocess.Popen[bytes]:
    """A bare `card-mcp serve`, returned once it serves (it logs that on stderr)."""
    proc = subprocess.Popen(
        [CARD_MCP, "serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "CARD_MCP_DATA_DIR": str(data_dir)},
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if b"serving tenant" in line:
            return proc
    raise AssertionError(f"card-mcp serve exited with {proc.wait()} before serving")


def end(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    out = proc.stdout.read() if proc.stdout else b""
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None and not pipe.closed:
            pipe.close()
    return proc.wait(timeout=60), out


def test_sigterm_stops_serve_and_its_embedded_postgres(data_dir: Path) -> None:
    proc = start_serve(data_dir)
    assert postgres_processes(data_dir / "pgdata")
    proc.send_signal(signal.SIGTERM)
    code, out = end(proc)
    assert code == 0 and out == b""  # nothing but protocol messages on stdout, and none were asked for
    assert postgres_processes(data_dir / "pgdata") == []


def test_closing_stdin_stops_serve_and_its_embedded_postgres(data_dir: Path) -> None:
    proc = start_serve(data_dir)
    assert proc.stdin is not None
    proc.stdin.close()
    code, _ = end(proc)
    assert code == 0
    assert postgres_processes(data_dir / "pgdata") == []


def test_the_sdk_is_the_version_the_stdio_adapter_was_written_for() -> None:
    """card_mcp/stdio.py drives MCPServer's low-level server, which the SDK does not publish. If this fails, the SDK
    moved: check card_mcp/stdio.py against the new version before moving the pin in pyproject.toml."""
    assert version("mcp").startswith("2.3."), version("mcp")
    lowlevel = MCPServer("probe")._lowlevel_server
    assert list(inspect.signature(lowlevel.run).parameters)[:3] == [
        "read_stream",
        "write_stream",
        "initialization_options",
    ]
    assert callable(lowlevel.create_initialization_options)
