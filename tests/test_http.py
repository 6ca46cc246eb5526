"""Streamable HTTP end to end: real `card-mcp serve --transport http` processes, the SDK's HTTP client, API keys,
limits, /healthz, stateless instances, and the same isolation through pgbouncer when CI provides one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import anyio
import asyncpg
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, Implementation

from card_mcp import db, http_answers, keys
from tests.conftest import TestDatabase
from tests.helpers import error_code, maintenance, ok, superuser, until, usage_rows
from tests.test_batch import Blocker, batch_waiting_on_a_lock, make_cards
from tests.wire import TurnCounter

CARD_MCP = str(Path(sys.executable).parent / "card-mcp")
PGBOUNCER_URL = os.environ.get("CARD_MCP_TEST_PGBOUNCER_URL")  # e.g. postgresql://127.0.0.1:6432


@dataclass
class HttpServer:
    url: str
    process: subprocess.Popen[str]
    log: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.url.removesuffix("/mcp")


@contextmanager
def http_server(
    database: TestDatabase, *, app_url: str | None = None, exit_code: int = 0, **env: str
) -> Iterator[HttpServer]:
    """`card-mcp serve --transport http` on a free port, against the test database; stopped with SIGTERM, after
    which it must exit with ``exit_code`` (a test that kills it says how)."""
    environment = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": app_url or database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_POOL_MAX_SIZE": "8",
        # As the in-process servers (conftest's settings): answers must not depend on whether the semantic extra
        # is installed, and its embedding worker would add the admin pool's traffic that tests here count.
        "CARD_MCP_SEMANTIC": "off",
        **env,
    }
    process = subprocess.Popen(
        [CARD_MCP, "serve", "--transport", "http", "--port", "0"],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    log: list[str] = []
    listening = threading.Event()
    found: list[str] = []

    def drain() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(r"listening on (http://\S+/mcp)", line)
            if match:
                found.append(match.group(1))
                listening.set()
        listening.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        listening.wait(60)
        assert found, "the server did not start:\n" + "".join(log)
        yield HttpServer(found[0], process, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        finally:
            reader.join(10)
            output = process.stdout.read() if process.stdout else ""
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()
    assert process.returncode == exit_code, "".join(log)
    assert output == ""  # nothing but logs, and those on stderr


@asynccontextmanager
async def mcp_client(
    url: str, key: str | None, *, user_agent: str | None = None, client_name: str = "pytest-http"
) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if user_agent:
        headers["User-Agent"] = user_agent
    info = Implementation(name=client_name, version="9.9")
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", client_info=info) as client,
    ):
        yield client


async def new_key(database: TestDatabase, tenant: str) -> tuple[uuid.UUID, str]:
    await db.tenant_id_for(database.admin_url, tenant)
    conn = await db.connect(database.admin_url)
    try:
        return await keys.create_key(conn, tenant, "test")
    finally:
        await conn.close()


def name() -> str:
    return f"h-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def server(database: TestDatabase) -> Iterator[HttpServer]:
    with http_server(database, CARD_MCP_MAX_CALLS_PER_KEY="64") as running:
        yield running


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}


async def test_no_key_a_wrong_key_and_a_revoked_key_get_401_and_leave_no_usage_row(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = name()
    key_id, key = await new_key(database, tenant)
    async with mcp_client(server.url, key) as client:
        ok(await client.call_tool("create_card", make_cards(1)[0]))
    await revoke(database, key_id)
    await refused_within(server.url, key, seconds=5)
    headers = {"Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(timeout=30) as http:
        for authorization in (None, "Bearer cmk_not-a-key", f"Bearer {key}x", f"Bearer {key}", f"Basic {key}"):
            sent = {**headers, **({"Authorization": authorization} if authorization else {})}
            response = await http.post(server.url, json=INITIALIZE, headers=sent)
            assert response.status_code == 401, authorization
            challenge = response.headers["www-authenticate"]
            assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
            assert f'resource_metadata="{server.base}/.well-known/oauth-protected-resource/mcp"' in challenge
        metadata = (await http.get(f"{server.base}/.well-known/oauth-protected-resource/mcp")).json()
    assert metadata["resource"] == server.url
    assert [r["tool"] for r in await usage_rows(database.admin_url, tenant)] == ["create_card"]


async def revoke(database: TestDatabase, key_id: uuid.UUID) -> None:
    conn = await db.connect(database.admin_url)
    try:
        await keys.revoke_key(conn, str(key_id))
    finally:
        await conn.close()


async def refused_within(url: str, key: str, *, seconds: float) -> None:
    """Wait until the server refuses ``key``: a revocation reaches it by notification, within milliseconds."""
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(timeout=30) as http:
        with anyio.fail_after(seconds):
            while (await http.post(url, json=INITIALIZE, headers=headers)).status_code != 401:  # noqa: ASYNC110
                await anyio.sleep(0.01)


async def logged(server: HttpServer, text: str, seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not any(text in line for line in server.log):  # noqa: ASYNC110 - another process's log
            await anyio.sleep(0.05)


async def test_when_the_server_stops_hearing_revocations_it_stops_trusting_kept_keys(database: TestDatabase) -> None:
    tenant = name()
    key_id, key = await new_key(database, tenant)
    with http_server(database) as running:
        await logged(running, "caching API keys")
        async with mcp_client(running.url, key) as client:
            ok(await client.call_tool("search_cards", {}))  # verified, and kept
            async with maintenance(database) as conn:
                listeners = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = $1 AND query LIKE 'LISTEN %'",
                    database.name,
                )
            assert listeners >= 1  # this server's, and the module's server's if it runs (it listens again)
            await logged(running, "not caching API keys")
            await revoke(database, key_id)  # announced to nobody: the listener is gone
            with pytest.raises(MCPError):  # refused at once all the same: the kept key was dropped with it
                await client.call_tool("search_cards", {})


async def test_a_used_key_is_not_looked_up_again_until_it_is_revoked(database: TestDatabase) -> None:
    tenant = name()
    key_id, key = await new_key(database, tenant)
    with (
        TurnCounter.threaded(database.admin_url) as admin,
        http_server(database, CARD_MCP_ADMIN_DATABASE_URL=admin.url(db.ADMIN_ROLE, database.name)) as running,
    ):
        await logged(running, "caching API keys")  # once it has proven that revocations reach it
        async with mcp_client(running.url, key) as client:
            ok(await client.call_tool("search_cards", {}))
            before = admin.turns
            for _ in range(10):
                ok(await client.call_tool("search_cards", {}))
            admin_round_trips = admin.turns - before
            await revoke(database, key_id)
            await refused_within(running.url, key, seconds=5)
            with pytest.raises(MCPError):
                await client.call_tool("search_cards", {})
    # 10 calls, each several authenticated HTTP requests, and no lookup: at most a probe of the notifications
    assert admin_round_trips <= 2


async def test_a_tenants_key_never_reaches_another_tenants_cards(database: TestDatabase, server: HttpServer) -> None:
    tenant_a, tenant_b = name(), name()
    _, key_a = await new_key(database, tenant_a)
    _, key_b = await new_key(database, tenant_b)
    async with mcp_client(server.url, key_b) as b:
        theirs = ok(await b.call_tool("create_card", make_cards(1, "secret")[0]))["card"]
    async with mcp_client(server.url, key_a) as a:
        assert error_code(await a.call_tool("get_card", {"card_id": theirs["id"]})) == "not_found"
        assert error_code(await a.call_tool("delete_card", {"card_id": theirs["id"]})) == "not_found"
        assert ok(await a.call_tool("search_cards", {"query": "secret"}))["cards"] == []
        # The tenant comes from the key, never from an argument.
        assert error_code(await a.call_tool("search_cards", {"tenant": tenant_b})) == "invalid_argument"
    async with mcp_client(server.url, key_b) as b:
        assert ok(await b.call_tool("get_card", {"card_id": theirs["id"]}))["card"] == theirs


async def run_mixed_load(url: str, database: TestDatabase, clients_per_tenant: int = 20) -> None:
    """2 tenants x N concurrent clients, each calling every tool; then each tenant's cards and usage rows must
    equal what its own clients did, exactly."""
    tenants = [name(), name()]
    tenant_keys = {t: await new_key(database, t) for t in tenants}
    made: dict[str, set[str]] = {t: set() for t in tenants}
    calls: dict[str, Counter[tuple[str, str | None]]] = {t: Counter() for t in tenants}
    foreign: dict[str, list[str]] = {t: [] for t in tenants}

    async def one_client(tenant: str, n: int) -> None:
        _, key = tenant_keys[tenant]

        async def call(client: Client, tool: str, arguments: dict[str, Any]) -> CallToolResult:
            result = await client.call_tool(tool, arguments)
            calls[tenant][(tool, error_code(result) if result.is_error else None)] += 1
            return result

        async with mcp_client(url, key, client_name=f"load-{n}") as client:
            card = ok(await call(client, "create_card", make_cards(1, f"{tenant}-{n}")[0]))["card"]
            made[tenant].add(card["id"])
            ok(await call(client, "get_card", {"card_id": card["id"]}))
            ok(await call(client, "update_card", {"card_id": card["id"], "tags": ["updated"], "expected_version": 1}))
            batch = ok(await call(client, "batch_create_cards", {"cards": make_cards(3, f"{tenant}-{n}-b")}))
            made[tenant].update(r["card_id"] for r in batch["results"])
            hits = ok(await call(client, "search_cards", {"limit": 50}))["cards"]
            foreign[tenant] += [h["id"] for h in hits if not h["title"].startswith(tenant)]
            other_tenant = tenants[1 - tenants.index(tenant)]
            for other_id in list(made[other_tenant])[:2]:
                assert error_code(await call(client, "get_card", {"card_id": other_id})) == "not_found"
            ok(await call(client, "usage_stats", {"group_by": "client"}))
            ok(await call(client, "delete_card", {"card_id": card["id"]}))
            made[tenant].discard(card["id"])

    async with anyio.create_task_group() as group:
        for n in range(clients_per_tenant):
            for tenant in tenants:
                group.start_soon(one_client, tenant, n)

    conn = await db.connect(database.admin_url)
    try:
        for tenant in tenants:
            assert foreign[tenant] == []
            stored = await conn.fetch(
                "SELECT c.id::text FROM card_mcp.cards c JOIN card_mcp.tenants t USING (tenant_id)"
                " WHERE t.name = $1 AND c.is_active",
                tenant,
            )
            assert {r["id"] for r in stored} == made[tenant]
            rows = await usage_rows(database.admin_url, tenant)
            assert Counter((r["tool"], r["error_code"]) for r in rows) == calls[tenant]
            assert {r["api_key_id"] for r in rows} == {tenant_keys[tenant][0]}
            assert {r["transport"] for r in rows} == {"http"}
            assert {r["client_name"] for r in rows} <= {f"load-{n}" for n in range(clients_per_tenant)}
    finally:
        await conn.close()


async def test_two_tenants_with_twenty_concurrent_clients_each_see_only_their_own_cards(
    database: TestDatabase, server: HttpServer
) -> None:
    await run_mixed_load(server.url, database)


@pytest.mark.skipif(not PGBOUNCER_URL, reason="CARD_MCP_TEST_PGBOUNCER_URL is set by .ci/run (pgbouncer)")
async def test_through_pgbouncer_in_transaction_mode_tenants_stay_apart(database: TestDatabase) -> None:
    assert PGBOUNCER_URL is not None
    bouncer = urlsplit(PGBOUNCER_URL)
    app = urlsplit(database.app_url)
    via_bouncer = urlunsplit((app.scheme, f"{db.APP_ROLE}@{bouncer.netloc.split('@')[-1]}", app.path, "", ""))
    app_backends = (
        "SELECT coalesce(array_agg(pid), '{}') FROM pg_stat_activity WHERE datname = $1 AND usename = 'card_mcp_app'"
    )
    async with maintenance(database) as conn:
        direct = set(await conn.fetchval(app_backends, database.name))  # other tests' pools, not pgbouncer's
    with http_server(
        database,
        app_url=via_bouncer,
        CARD_MCP_STATEMENT_CACHE_SIZE="0",
        CARD_MCP_MAX_CALLS_PER_KEY="64",
        CARD_MCP_POOL_MAX_SIZE="20",
    ) as running:
        await run_mixed_load(running.url, database)
        async with maintenance(database) as conn:
            via = set(await conn.fetchval(app_backends, database.name)) - direct
        # pgbouncer's default_pool_size in .ci/run is 4: a pool of 20 and 40 clients on at most 4 backends.
        assert 1 <= len(via) <= 4


async def test_a_busy_key_gets_limit_exceeded_while_another_key_is_served(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant = name()
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    _, key = await new_key(database, tenant)
    _, other_key = await new_key(database, tenant)
    batch = make_cards(5)
    with http_server(database, CARD_MCP_MAX_CALLS_PER_KEY="1") as running:
        async with mcp_client(running.url, key) as client, mcp_client(running.url, other_key) as other:
            outcome: list[CallToolResult] = []

            async def slow_call() -> None:
                outcome.append(await client.call_tool("batch_create_cards", {"cards": batch}))

            async with Blocker.holding(app_pool, tenant_id, batch[0]) as blocker, anyio.create_task_group() as group:
                group.start_soon(slow_call)
                await batch_waiting_on_a_lock(database)  # the key's one allowed call is running
                busy = await client.call_tool("get_card", {"card_id": str(uuid.uuid4())})
                assert error_code(busy) == "limit_exceeded"
                # Another key of the same tenant has its own allowance.
                assert error_code(await other.call_tool("get_card", {"card_id": str(uuid.uuid4())})) == "not_found"
                await blocker.release()
            assert ok(outcome[0])["created"] == 5
            assert error_code(await client.call_tool("get_card", {"card_id": str(uuid.uuid4())})) == "not_found"
    codes = [r["error_code"] for r in await usage_rows(database.admin_url, tenant)]
    assert sorted(codes, key=str) == sorted(["limit_exceeded", "not_found", "not_found", None], key=str)


async def test_a_statement_over_the_timeout_is_cancelled_and_answers_unavailable(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant = name()
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    _, key = await new_key(database, tenant)
    batch = make_cards(5)
    with http_server(database, CARD_MCP_STATEMENT_TIMEOUT_MS="500") as running:
        async with mcp_client(running.url, key) as client:
            # The blocker holds a lock the batch's INSERT waits on for longer than the timeout, whatever the load.
            async with Blocker.holding(app_pool, tenant_id, batch[0]):
                slow = await client.call_tool("batch_create_cards", {"cards": batch})
            assert error_code(slow) == "unavailable"
            assert ok(await client.call_tool("batch_create_cards", {"cards": batch}))["created"] == 5
    codes = [r["error_code"] for r in await usage_rows(database.admin_url, tenant)]
    assert codes == ["unavailable", None]


async def test_a_request_body_over_the_limit_is_refused(database: TestDatabase) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    with http_server(database, CARD_MCP_MAX_REQUEST_BYTES="65536") as running:
        async with httpx2.AsyncClient(timeout=30) as http:
            big = {**INITIALIZE, "params": {**INITIALIZE["params"], "padding": "x" * 70_000}}  # type: ignore[dict-item]
            response = await http.post(
                running.url,
                content=json.dumps(big),
                headers={
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json",
                    "Accept": "application/json, text/event-stream",
                },
            )
    assert response.status_code == 413


async def test_healthz_answers_503_while_the_database_refuses_and_200_again_after(
    database: TestDatabase,
) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    with http_server(database, CARD_MCP_POOL_MIN_SIZE="0") as running:
        async with httpx2.AsyncClient(timeout=30) as http:
            healthy = await http.get(f"{running.base}/healthz")
            assert (healthy.status_code, healthy.json()) == (200, {"status": "ok"})
            async with maintenance(database) as conn:
                await conn.execute(f'ALTER DATABASE "{database.name}" WITH ALLOW_CONNECTIONS false')
                try:
                    await conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND usename = $2",
                        database.name,
                        db.APP_ROLE,
                    )
                    down = await http.get(f"{running.base}/healthz")
                    assert (down.status_code, down.json()) == (503, {"status": "unavailable"})
                finally:
                    await conn.execute(f'ALTER DATABASE "{database.name}" WITH ALLOW_CONNECTIONS true')
            back = await http.get(f"{running.base}/healthz")
            assert back.status_code == 200
        async with mcp_client(running.url, key) as client:  # recovered without a restart
            ok(await client.call_tool("search_cards", {}))


async def test_two_stateless_instances_serve_one_client_interchangeably(database: TestDatabase) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    arguments = {"cards": make_cards(4), "idempotency_key": "lb-retry"}
    with (
        http_server(database, CARD_MCP_STATELESS="true") as one,
        http_server(database, CARD_MCP_STATELESS="true") as two,
    ):
        async with mcp_client(one.url, key, user_agent="brand-bot/2.0 (agents)") as first:
            card = ok(await first.call_tool("create_card", make_cards(1, "lb")[0]))["card"]
            seen: list[float] = []

            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                seen.append(progress)

            batch = ok(await first.call_tool("batch_create_cards", arguments, progress_callback=on_progress))
            assert seen and seen[-1] == 4  # progress streams within the request, sessions or not
        async with mcp_client(two.url, key, user_agent="brand-bot/2.0 (agents)") as second:
            assert ok(await second.call_tool("get_card", {"card_id": card["id"]}))["card"] == card
            assert ok(await second.call_tool("batch_create_cards", arguments)) == {**batch, "replayed": True}
    rows = await usage_rows(database.admin_url, tenant)
    assert [r["tool"] for r in rows] == ["create_card", "batch_create_cards", "get_card", "batch_create_cards"]
    assert {(r["client_name"], r["client_version"]) for r in rows} == {("brand-bot", "2.0")}


def sse_messages(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in body.splitlines() if line.startswith("data:") and line[5:].strip()]


async def test_a_stateless_server_answers_json_unless_the_request_asks_for_progress(database: TestDatabase) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    card = make_cards(1, "answers")[0]

    def call(tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
        params = {"name": tool, "arguments": arguments, **({"_meta": meta} if meta else {})}
        return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}

    with http_server(database, CARD_MCP_STATELESS="true", CARD_MCP_MAX_REQUEST_BYTES="65536") as running:
        async with httpx2.AsyncClient(timeout=30) as http:
            created = await http.post(running.url, json=call("create_card", card), headers=headers)
            assert created.headers["content-type"].startswith("application/json")
            assert created.json()["result"]["structuredContent"]["status"] == "created"
            # A card whose text names the token is still a request without one: one JSON body.
            named = await http.post(
                running.url, json=call("create_card", {**card, "title": '"progressToken" \u0041'}), headers=headers
            )
            assert named.headers["content-type"].startswith("application/json")
            streamed = await http.post(
                running.url,
                json=call("batch_create_cards", {"cards": make_cards(3, "streamed")}, {"progressToken": "p1"}),
                headers=headers,
            )
            assert streamed.headers["content-type"].startswith("text/event-stream")
            messages = sse_messages(streamed.text)
            progress = [m["params"]["progress"] for m in messages if m.get("method") == "notifications/progress"]
            assert progress and progress[-1] == 3
            assert messages[-1]["result"]["structuredContent"]["created"] == 3
            big = call("create_card", {**card, "title": "x" * 70_000})
            refused = await http.post(running.url, json=big, headers=headers)
            assert refused.status_code == 413
            unauthorized = await http.post(running.url, json=call("create_card", card), headers={"Accept": "*/*"})
            assert unauthorized.status_code == 401
            # Refused from the head alone, as before: a declared length over the limit, a client that does not
            # accept both forms, a body that is not JSON.
            declared = {**headers, "Content-Type": "application/json", "Content-Length": "70000"}
            too_long = await http.post(running.url, content=b"{" + b" " * 69_998 + b"}", headers=declared)
            assert too_long.status_code == 413
            json_only = await http.post(
                running.url, json=call("create_card", card), headers={**headers, "Accept": "application/json"}
            )
            assert json_only.status_code == 406
            text = await http.post(running.url, content=b"{}", headers={**headers, "Content-Type": "text/plain"})
            assert (text.status_code, text.text) == (400, "Invalid Content-Type header")  # the SDK's own check
    rows = await usage_rows(database.admin_url, tenant)
    assert [r["tool"] for r in rows] == ["create_card", "create_card", "batch_create_cards"]


async def test_a_session_of_a_stateful_server_is_answered_with_sse_and_streams_progress(
    database: TestDatabase, server: HttpServer
) -> None:
    """A session's message router is one task for all its requests, so sessions keep SSE answers
    (card_mcp/http_answers.py)."""
    tenant = name()
    _, key = await new_key(database, tenant)
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    async with httpx2.AsyncClient(timeout=30) as http:
        opened = await http.post(server.url, json=INITIALIZE, headers=headers)
        assert opened.headers["content-type"].startswith("text/event-stream")
        session = {**headers, "Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(server.url, json=initialized, headers=session)).status_code == 202
        listed = await http.post(server.url, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers=session)
        assert listed.headers["content-type"].startswith("text/event-stream")
        assert {t["name"] for t in sse_messages(listed.text)[-1]["result"]["tools"]} >= {"get_card", "search_cards"}
    async with mcp_client(server.url, key) as client:  # the SDK's client, in a session of its own
        seen: list[float] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            seen.append(progress)

        arguments = {"cards": make_cards(3)}
        batch = ok(await client.call_tool("batch_create_cards", arguments, progress_callback=on_progress))
        assert batch["created"] == 3 and seen and seen[-1] == 3
    assert [r["tool"] for r in await usage_rows(database.admin_url, tenant)] == ["batch_create_cards"]


async def test_a_client_that_goes_away_before_its_json_answer_cancels_its_call(database: TestDatabase) -> None:
    """As an SSE answer's does: the call waits on a lock, the client disconnects, the call is rolled back and
    recorded as cancelled; nothing is written when the lock is released."""
    tenant = name()
    _, key = await new_key(database, tenant)
    message = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": "create_card", "arguments": make_cards(1, "gone")[0]},
    }
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    with http_server(database, CARD_MCP_STATELESS="true") as running:
        async with superuser(database) as lock:

            async def waiting() -> bool:
                return bool(
                    await lock.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )

            async with lock.transaction():
                await lock.execute("LOCK TABLE card_mcp.cards IN ACCESS EXCLUSIVE MODE")
                async with httpx2.AsyncClient(timeout=60) as http, anyio.create_task_group() as group:
                    group.start_soon(lambda: http.post(running.url, json=message, headers=headers))
                    await until(waiting, "the call to wait on the lock")
                    group.cancel_scope.cancel()  # the request abandoned, its connection closed
                await until(lambda: recorded(database, tenant), "the cancelled call's usage row")
                assert not await waiting()  # its statement was cancelled, not left waiting
    rows = await usage_rows(database.admin_url, tenant)
    assert [(r["tool"], r["status"], r["error_code"]) for r in rows] == [("create_card", "error", "cancelled")]
    async with superuser(database) as conn:
        written = "SELECT count(*) FROM card_mcp.cards JOIN card_mcp.tenants USING (tenant_id) WHERE name = $1"
        assert await conn.fetchval(written, tenant) == 0


async def recorded(database: TestDatabase, tenant: str) -> bool:
    return bool(await usage_rows(database.admin_url, tenant))


@pytest.mark.parametrize(
    ("body", "stream"),
    [
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_card"}}', False),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progressToken":1}}}', True),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"_meta":{"progress\\u0054oken":1}}}', True),
        (b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"arguments":{"progressToken":1}}}', False),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{"other":"\\u00e9"}}}', False),
        (b'[{"jsonrpc":"2.0","id":1,"method":"ping","params":{"_meta":{"progressToken":1}}}]', True),
        (b'{"progressToken": not json', True),
        (b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}', False),
        (b'{"a":' * 5000 + b'"\\u0041"' + b"}" * 5000, True),
    ],
)
def test_only_a_request_with_a_progress_token_or_no_json_rpc_message_is_answered_as_a_stream(
    body: bytes, stream: bool
) -> None:
    assert http_answers.wants_stream(body) is stream


def run_cli(database: TestDatabase, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CARD_MCP, *args],
        env={
            **os.environ,
            "CARD_MCP_DATABASE_URL": database.app_url,
            "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
            "CARD_MCP_OWNER_DATABASE_URL": database.owner_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_keys_are_shown_once_listed_without_the_key_and_revoked_at_once(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = name()
    assert run_cli(database, "tenants", "create", tenant).returncode == 0
    created = run_cli(database, "keys", "create", "--tenant", tenant, "--label", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n" and key.startswith("cmk_") and len(key) >= 40
    assert "shown only this once" in created.stderr
    listed = json.loads(run_cli(database, "keys", "list", "--tenant", tenant, "--format", "json").stdout)["keys"]
    assert len(listed) == 1 and key not in json.dumps(listed)
    entry = listed[0]
    assert (entry["tenant"], entry["label"], entry["revoked_at"], entry["last_used_at"]) == (tenant, "ci", None, None)
    assert key.startswith(entry["prefix"]) and entry["key_id"] in created.stderr
    async with mcp_client(server.url, key) as client:
        ok(await client.call_tool("search_cards", {}))
        used = json.loads(run_cli(database, "keys", "list", "--tenant", tenant, "--format", "json").stdout)["keys"]
        assert used[0]["last_used_at"] is not None
        assert run_cli(database, "keys", "revoke", entry["key_id"]).returncode == 0
        await refused_within(server.url, key, seconds=5)
        with pytest.raises(MCPError):  # the SDK reports the 401 as an MCPError
            await client.call_tool("search_cards", {})
    missing = run_cli(database, "keys", "create", "--tenant", "no-such-tenant")
    assert missing.returncode == 1 and missing.stdout == "" and "tenants create" in missing.stderr
    assert run_cli(database, "keys", "revoke", "not-a-uuid").returncode == 1
