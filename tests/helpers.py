"""Helpers shared by the test modules: clients of a real server, reading results, the usage log, waiting on a
condition, and card queries in a tenant transaction opened by the production call edge."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import anyio
import asyncpg
from mcp import Client
from mcp.types import CallToolResult, Implementation

from card_mcp import db, tools
from card_mcp.calls import Caller, CallFailed, Edge
from card_mcp.config import Settings
from card_mcp.server import build_server
from tests.conftest import TestDatabase

# Every tool the server offers, from the registry (the one list of them).
TOOLS = frozenset(tool.name for tool in tools.TOOLS)


@asynccontextmanager
async def connect(settings: Settings, tenant: str, client_name: str = "pytest") -> AsyncIterator[Client]:
    server = build_server(settings.model_copy(update={"tenant": tenant}))
    info = Implementation(name=client_name, version="1.2.3")
    async with Client(server, mode="legacy", client_info=info) as client:
        yield client


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    text = result.content[0].text  # type: ignore[union-attr]  # the one block is TextContent
    assert json.loads(text) == result.structured_content  # the same JSON as text
    return result.structured_content


def error_code(result: CallToolResult) -> str:
    assert result.is_error
    payload = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message", "hint"}
    assert payload["error"]["hint"]
    code: str = payload["error"]["code"]
    return code


CARD = {
    "card_type": "voice",
    "title": "Brand voice",
    "content": {"tone": "warm", "avoid": ["jargon"]},
    "tags": ["core"],
}


async def create(client: Client, **overrides: Any) -> dict[str, Any]:
    card: dict[str, Any] = ok(await client.call_tool("create_card", {**CARD, **overrides}))["card"]
    return card


async def usage_rows(database_admin_url: str, tenant: str) -> list[asyncpg.Record]:
    conn = await db.connect(database_admin_url)
    try:
        return await conn.fetch(
            "SELECT u.* FROM card_mcp.card_usage u JOIN card_mcp.tenants t USING (tenant_id)"
            " WHERE t.name = $1 ORDER BY u.usage_id",
            tenant,
        )
    finally:
        await conn.close()


@asynccontextmanager
async def tenant_transaction(pool: asyncpg.Pool, tenant_id: uuid.UUID) -> AsyncIterator[db.Connection]:
    """A tenant's transaction as every tool call gets it: opened by the call edge (calls.Edge.call, tool name
    "test", which leaves its usage row like any call), committed on success, rolled back on failure, which raises
    the domain error the call failed with."""
    edge = Edge(pool, Settings(database_url="postgresql://unused", semantic="off"))
    try:
        async with edge.call(Caller(tenant_id, "memory"), "test", durable=True) as call:
            yield await call.transaction()
    except CallFailed as failed:
        raise failed.error from failed.__cause__


@asynccontextmanager
async def superuser(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A superuser's connection to the test database (row-level security does not bind it)."""
    conn = await asyncpg.connect(database.url_as(urlsplit(database.superuser_url).username or "postgres"))
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def maintenance(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    """A superuser's connection to the server's maintenance database: for watching or stopping the test database's
    own backends (pg_stat_activity, pg_terminate_backend, ALTER DATABASE) from outside it."""
    conn = await asyncpg.connect(database.superuser_url)
    try:
        yield conn
    finally:
        await conn.close()


async def until(condition: Callable[[], Awaitable[Any]], what: str, seconds: float = 30.0) -> Any:
    """Poll ``condition`` until it returns something truthy (not a timing assertion: a generous bound on a wait)."""
    with anyio.fail_after(seconds):
        while not (value := await condition()):  # noqa: ASYNC110 - the condition is in another process
            await anyio.sleep(0.02)
    return value
