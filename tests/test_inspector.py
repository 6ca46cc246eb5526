"""A real MCP client not written here: the MCP Inspector CLI (pinned in .ci/inspector) against `card-mcp serve`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.conftest import TestDatabase, make_tempdir
from tests.test_embedded import postgres_processes
from tests.test_http import http_server, new_key

CARD_MCP = str(Path(sys.executable).parent / "card-mcp")
INSPECTOR = os.environ.get("CARD_MCP_INSPECTOR")

if not INSPECTOR and os.environ.get("CI") != "true":
    pytest.skip("the MCP Inspector is installed by .ci/run (set CARD_MCP_INSPECTOR)", allow_module_level=True)


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    folder = make_tempdir("card-mcp-inspector-")
    try:
        yield folder
    finally:
        assert postgres_processes(folder / "pgdata") == []
        shutil.rmtree(folder, ignore_errors=True)


def inspect(data_dir: Path, *args: str) -> dict[str, Any]:
    assert INSPECTOR, "CI=true but CARD_MCP_INSPECTOR is not set: .ci/run must install the inspector"
    result = subprocess.run(
        [INSPECTOR, CARD_MCP, *args, "--", "serve", "--tenant", "inspector"],
        env={**os.environ, "CARD_MCP_DATA_DIR": str(data_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_the_inspector_lists_the_nine_tools_of_the_spec(data_dir: Path) -> None:
    tools = {t["name"]: t for t in inspect(data_dir, "--method", "tools/list")["tools"]}
    assert set(tools) == {  # SPEC section 3, written out: a tool missing from the registry fails here too
        "create_card",
        "get_card",
        "search_cards",
        "update_card",
        "delete_card",
        "batch_create_cards",
        "usage_stats",
        "get_card_history",
        "restore_card",
    }
    assert tools["get_card"]["annotations"]["readOnlyHint"] is True
    assert all("$schema" not in t["inputSchema"] for t in tools.values())


def test_the_inspector_creates_then_gets_a_card(data_dir: Path) -> None:
    created = inspect(
        data_dir,
        "--method",
        "tools/call",
        "--tool-name",
        "create_card",
        "--tool-arg",
        "card_type=voice",
        "title=Inspector voice",
        'content={"tone":"plain"}',
        'tags=["qa"]',
    )
    assert created["isError"] is False
    assert created["structuredContent"]["status"] == "created"
    card = created["structuredContent"]["card"]
    got = inspect(data_dir, "--method", "tools/call", "--tool-name", "get_card", "--tool-arg", f"card_id={card['id']}")
    assert got["isError"] is False and got["structuredContent"]["card"] == card
    missing = inspect(
        data_dir,
        "--method",
        "tools/call",
        "--tool-name",
        "get_card",
        "--tool-arg",
        "card_id=00000000-0000-0000-0000-000000000000",
    )
    assert missing["isError"] is True
    assert json.loads(missing["content"][0]["text"])["error"]["code"] == "not_found"


async def test_the_inspector_lists_and_calls_tools_over_http_with_a_bearer_key(database: TestDatabase) -> None:
    assert INSPECTOR, "CI=true but CARD_MCP_INSPECTOR is not set: .ci/run must install the inspector"
    _, key = await new_key(database, f"insp-{uuid.uuid4().hex[:8]}")
    with http_server(database, CARD_MCP_STATELESS="true") as server:

        def over_http(*args: str, bearer: str = key) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [INSPECTOR, server.url, "--transport", "http", "--header", f"Authorization: Bearer {bearer}", *args],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        listed = await anyio.to_thread.run_sync(lambda: over_http("--method", "tools/list"))
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)["tools"]) == 9
        args = ["--method", "tools/call", "--tool-name", "create_card", "--tool-arg", "card_type=insight"]
        args += ["title=Over HTTP", 'content={"via":"inspector"}', "--method", "tools/call"]
        created = await anyio.to_thread.run_sync(lambda: over_http(*args))
        assert created.returncode == 0, created.stderr
        assert json.loads(created.stdout)["structuredContent"]["status"] == "created"
        refused = await anyio.to_thread.run_sync(lambda: over_http("--method", "tools/list", bearer="cmk_wrong"))
        assert refused.returncode != 0 and "invalid_token" in refused.stderr
