"""Faults, and the ledger after each: every acknowledged card exists exactly once, no part of a failed batch exists,
and the usage rows are exactly the calls that were answered.

- the database stops in the middle of a batch and comes back: the calls answer `unavailable` meanwhile, and the
  same server serves again without a restart (on a PostgreSQL cluster this module creates and stops itself, never
  the shared server);
- the server is killed with SIGKILL in the middle of a batch and started again;
- PostgreSQL's answer to a COMMIT is lost with its connection: the server asks PostgreSQL what became of the
  transaction and answers accordingly;
- an answer is lost on its way to the client after the batch committed, and the client retries with its
  idempotency key;
- a call that is one statement (get_card, search_cards) waits past the statement timeout: it is cancelled, answers
  as a transaction's statement over the timeout does, and leaves one usage row (directly and through pgbouncer).

A backend killed mid-batch is in tests/test_batch.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import anyio
import asyncpg
import httpx2
import pytest
from mcp.types import CallToolResult

from card_mcp import cards, db
from card_mcp.config import Settings
from card_mcp.embedded import SUPERUSER, EmbeddedPostgres
from card_mcp.models import NewCard
from tests.conftest import TestDatabase, create_migrated_database, make_tempdir, with_user
from tests.helpers import connect, create, error_code, ok, superuser, until, usage_rows
from tests.test_batch import Blocker, batch_waiting_on_a_lock, counts, make_cards
from tests.test_hosted import PGBOUNCER_URL, via_pooler
from tests.test_http import http_server, mcp_client, new_key
from tests.wire import TurnCounter


def outcomes(rows: list[asyncpg.Record]) -> Counter[tuple[str, str | None]]:
    return Counter((r["tool"], r["error_code"]) for r in rows)


async def active_cards(admin_url: str, tenant: str) -> Counter[str]:
    """How many active cards of ``tenant`` carry each id (each must be 1), read as the admin role."""
    conn = await db.connect(admin_url)
    try:
        ids = await conn.fetch(
            "SELECT c.id FROM card_mcp.cards c JOIN card_mcp.tenants t USING (tenant_id)"
            " WHERE t.name = $1 AND c.is_active",
            tenant,
        )
    finally:
        await conn.close()
    return Counter(str(r["id"]) for r in ids)


# -- the database stops mid-call and comes back ---------------------------------------------------------------


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL cluster of this module's own, in a temporary folder: the only one a test here stops."""
    folder = make_tempdir("card-mcp-faults-")
    cluster = EmbeddedPostgres(folder)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@asynccontextmanager
async def holding(app_url: str, tenant_id: uuid.UUID, card: dict[str, Any]) -> AsyncIterator[None]:
    """An open transaction holding an uncommitted card with ``card``'s content: a batch with that card waits on
    it. The connection may die with the database; leaving is quiet then."""
    conn = await db.connect(app_url)  # with card-mcp's JSON codecs
    try:
        await conn.execute("BEGIN")
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_id))
        await cards.create_card(conn, tenant_id, NewCard.model_validate(card))
        yield
    finally:
        with suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await conn.close(timeout=5)


async def test_while_the_database_is_down_calls_answer_unavailable_and_the_same_server_recovers(
    own_cluster: EmbeddedPostgres,
) -> None:
    superuser_url = own_cluster.url(SUPERUSER, "postgres")
    name = f"card_mcp_faults_{uuid.uuid4().hex[:8]}"
    await create_migrated_database(superuser_url, name)
    app_url, admin_url = with_user(superuser_url, db.APP_ROLE, name), with_user(superuser_url, db.ADMIN_ROLE, name)
    settings = Settings(database_url=app_url, admin_database_url=admin_url)
    tenant = "faults"
    tenant_id = await db.tenant_id_for(admin_url, tenant)
    answered: Counter[tuple[str, str | None]] = Counter()  # the calls that got an answer other than unavailable
    batch = make_cards(40, "stopped")
    arguments = {"cards": batch, "idempotency_key": "stopped-mid-batch"}

    async def waiting_batch() -> int | None:
        conn = await asyncpg.connect(superuser_url)
        try:
            pid: int | None = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND usename = $2 AND wait_event_type = 'Lock'",
                name,
                db.APP_ROLE,
            )
            return pid
        finally:
            await conn.close()

    async with connect(settings, tenant) as client:
        acknowledged = [ok(await client.call_tool("create_card", card))["card"] for card in make_cards(5, "before")]
        answered[("create_card", None)] += 5

        outcome: list[CallToolResult] = []

        async def call() -> None:
            outcome.append(await client.call_tool("batch_create_cards", arguments))

        async with holding(app_url, tenant_id, batch[0]), anyio.create_task_group() as tg:
            tg.start_soon(call)
            await until(waiting_batch, "the batch to wait inside its INSERT")
            await anyio.to_thread.run_sync(own_cluster.stop)

            async def done() -> bool:
                return bool(outcome)

            await until(done, "the batch to answer")
        assert error_code(outcome[0]) == "unavailable"

        down = [
            ("get_card", {"card_id": acknowledged[0]["id"]}),
            ("create_card", make_cards(1, "while down")[0]),
            ("search_cards", {"query": "before"}),
            ("batch_create_cards", arguments),
            ("usage_stats", {}),
        ]
        for tool, args in down:
            assert error_code(await client.call_tool(tool, args)) == "unavailable", tool

        await anyio.to_thread.run_sync(own_cluster.start)
        # The same server, not restarted, serves again.
        for card in acknowledged:
            assert ok(await client.call_tool("get_card", {"card_id": card["id"]}))["card"] == card
        answered[("get_card", None)] += len(acknowledged)
        created = ok(await client.call_tool("batch_create_cards", arguments))
        assert (created["created"], created["replayed"]) == (40, False)
        answered[("batch_create_cards", None)] += 1
        after = ok(await client.call_tool("create_card", make_cards(1, "after")[0]))["card"]
        answered[("create_card", None)] += 1

    expected = {c["id"] for c in acknowledged} | {r["card_id"] for r in created["results"]} | {after["id"]}
    assert await active_cards(admin_url, tenant) == Counter(expected)  # each exactly once, nothing else
    rows = await usage_rows(admin_url, tenant)
    assert outcomes(rows) == answered  # no row for the calls that could not reach the database


# -- the server is killed mid-batch -------------------------------------------------------------------------


async def test_a_server_killed_mid_batch_leaves_none_of_it_and_the_restarted_server_writes_it_once(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant = f"k-{uuid.uuid4().hex[:10]}"
    _, key = await new_key(database, tenant)
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    batch = make_cards(200, "killed")
    arguments = {"cards": batch, "idempotency_key": "killed-server"}

    with http_server(database, exit_code=-signal.SIGKILL) as first:
        async with mcp_client(first.url, key) as client:
            acknowledged = [ok(await client.call_tool("create_card", c))["card"] for c in make_cards(3, "kept")]
        failures: list[BaseException] = []

        async def call() -> None:
            try:
                async with mcp_client(first.url, key) as doomed:
                    await doomed.call_tool("batch_create_cards", arguments)
            except Exception as exc:  # the server died under it: no answer
                failures.append(exc)

        async with Blocker.holding(app_pool, tenant_id, batch[0]), anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await batch_waiting_on_a_lock(database)
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(30)
        assert failures  # the batch was never acknowledged

    async def gone() -> bool:  # the orphaned backend runs on, finds its client gone and rolls back
        conn = await asyncpg.connect(database.superuser_url)
        try:
            return not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        finally:
            await conn.close()

    await until(gone, "the killed server's backend to end")
    assert await counts(database, tenant) == (3, 0)  # none of the batch, no stored answer

    with http_server(database) as second:
        async with mcp_client(second.url, key) as client:
            retry = ok(await client.call_tool("batch_create_cards", arguments))
            again = ok(await client.call_tool("batch_create_cards", arguments))
    assert (retry["created"], retry["replayed"]) == (200, False)
    assert again == {**retry, "replayed": True}
    expected = {c["id"] for c in acknowledged} | {r["card_id"] for r in retry["results"]}
    assert await active_cards(database.admin_url, tenant) == Counter(expected)
    rows = await usage_rows(database.admin_url, tenant)
    assert outcomes(rows) == {("create_card", None): 3, ("batch_create_cards", None): 2}


# -- PostgreSQL's answer to COMMIT is lost -------------------------------------------------------------------


async def test_when_the_answer_to_commit_is_lost_the_server_learns_the_call_committed_and_says_so(
    database: TestDatabase, settings: Settings
) -> None:
    tenant = f"c-{uuid.uuid4().hex[:10]}"
    arguments = {"cards": make_cards(50, "lost commit"), "idempotency_key": "lost-commit"}
    card = make_cards(1, "lost single")[0]
    async with TurnCounter(database.app_url) as proxy:
        cut = settings.model_copy(update={"database_url": proxy.url(db.APP_ROLE, database.name)})
        async with connect(cut, tenant) as client:
            proxy.cut_after_commit = 1
            first = ok(await client.call_tool("batch_create_cards", arguments))
            assert proxy.cut_after_commit == 0  # the answer to its COMMIT was dropped
            retry = ok(await client.call_tool("batch_create_cards", arguments))
            proxy.cut_after_commit = 1
            made = ok(await client.call_tool("create_card", card))
            assert proxy.cut_after_commit == 0
            remade = ok(await client.call_tool("create_card", card))
    assert (first["created"], first["replayed"]) == (50, False)
    assert retry == {**first, "replayed": True}
    assert (made["status"], remade["status"], remade["card"]) == ("created", "existing", made["card"])
    assert await counts(database, tenant) == (51, 1)
    rows = await usage_rows(database.admin_url, tenant)
    assert outcomes(rows) == {("batch_create_cards", None): 2, ("create_card", None): 2}  # one row per call


# -- a one-statement call over the statement timeout -----------------------------------------------------------


def error_payload(result: CallToolResult) -> dict[str, str]:
    error_code(result)  # the fixed shape
    payload: dict[str, str] = json.loads(result.content[0].text)["error"]  # type: ignore[union-attr]
    return payload


@pytest.mark.parametrize(
    "through",
    [
        "direct",
        pytest.param(
            "pgbouncer",
            marks=pytest.mark.skipif(not PGBOUNCER_URL, reason="CARD_MCP_TEST_PGBOUNCER_URL is set by .ci/run"),
        ),
    ],
)
async def test_a_one_statement_call_over_the_statement_timeout_is_cancelled_answered_and_recorded_once(
    database: TestDatabase, settings: Settings, through: str
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    app_url = via_pooler(database.app_url) if through == "pgbouncer" else database.app_url
    # command_timeout, asyncpg's own bound on every statement, well above the statement timeout: the answer
    # comes from the statement timeout, and a call it does not reach fails this test on its usage rows.
    slow = settings.model_copy(
        update={
            "database_url": app_url,
            "statement_timeout_ms": 300,
            "command_timeout": 15.0,
            "statement_cache_size": 0 if through == "pgbouncer" else settings.statement_cache_size,
        }
    )
    async with connect(slow, tenant) as client:
        card = await create(client)
        one_statement = {
            "get_card": {"card_id": card["id"]},
            "search_cards": {"query": card["title"]},
        }
        # A lock that every read of the cards waits on, held by another connection for as long as the calls take.
        async with superuser(database) as conn, conn.transaction():
            await conn.execute("LOCK TABLE card_mcp.cards IN ACCESS EXCLUSIVE MODE")
            # A call that is a transaction of several statements: cancelled by its transaction-local timeout.
            in_transaction = error_payload(await client.call_tool("update_card", {"card_id": card["id"], "title": "X"}))
            answers = {tool: error_payload(await client.call_tool(tool, args)) for tool, args in one_statement.items()}
        assert in_transaction["code"] == "unavailable"
        assert answers == {tool: in_transaction for tool in one_statement}  # code, message and hint alike
        # The same server serves again, on the connections whose statements were cancelled.
        assert ok(await client.call_tool("get_card", one_statement["get_card"]))["card"]["id"] == card["id"]
        found = ok(await client.call_tool("search_cards", one_statement["search_cards"]))["cards"]
        assert [hit["id"] for hit in found] == [card["id"]]
    rows = await usage_rows(database.admin_url, tenant)
    assert [(r["tool"], r["error_code"]) for r in rows] == [
        ("create_card", None),
        ("update_card", "unavailable"),
        ("get_card", "unavailable"),
        ("search_cards", "unavailable"),
        ("get_card", None),
        ("search_cards", None),
    ]


# -- the answer is lost on its way to the client -------------------------------------------------------------


class AnswerDropper:
    """A TCP proxy in front of the HTTP server that, while armed, closes the client's connection as soon as the
    server sends bytes holding ``marker``: the call is done, its answer never arrives."""

    def __init__(self, target_port: int, marker: bytes) -> None:
        self.target_port, self.marker = target_port, marker
        self.armed = False
        self.dropped = 0
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> AnswerDropper:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter, answers: bool) -> None:
            try:
                while data := await source.read(1 << 16):
                    if answers and self.armed and self.marker in data:
                        self.armed = False
                        self.dropped += 1
                        client_w.close()
                        server_w.close()
                        return
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(client_r, server_w, False), pump(server_r, client_w, True))


async def post_call(http: httpx2.AsyncClient, url: str, key: str, tool: str, arguments: dict[str, Any]) -> Any:
    """One tools/call as a bare JSON-RPC POST (a stateless server needs no session): the result, parsed."""
    message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    response = await http.post(
        url,
        json=message,
        headers={"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"},
    )
    response.raise_for_status()
    body = response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        body = next(line[5:] for line in body.splitlines() if line.startswith("data:") and '"result"' in line)
    result = json.loads(body)["result"]
    assert not result.get("isError"), result
    return result["structuredContent"]


async def test_an_answer_lost_on_its_way_to_the_client_is_replayed_by_a_retry_with_its_key(
    database: TestDatabase,
) -> None:
    tenant = f"l-{uuid.uuid4().hex[:10]}"
    _, key = await new_key(database, tenant)
    arguments = {"cards": make_cards(100, "lost answer"), "idempotency_key": "lost-answer"}
    with http_server(database, CARD_MCP_STATELESS="true") as running:
        port = int(running.url.rsplit(":", 1)[1].split("/")[0])
        async with AnswerDropper(port, b'"replayed"') as dropper, httpx2.AsyncClient(timeout=60) as http:
            url = f"http://127.0.0.1:{dropper.port}/mcp"
            dropper.armed = True
            with pytest.raises(httpx2.TransportError):
                await post_call(http, url, key, "batch_create_cards", arguments)
            assert dropper.dropped == 1
            retry = await post_call(http, url, key, "batch_create_cards", arguments)
            again = await post_call(http, url, key, "batch_create_cards", arguments)
    assert (retry["created"], retry["replayed"]) == (100, True)  # the lost answer, replayed: written once
    assert again == retry
    assert await counts(database, tenant) == (100, 1)
    assert len({r["card_id"] for r in retry["results"]}) == 100
    rows = await usage_rows(database.admin_url, tenant)
    assert outcomes(rows) == {("batch_create_cards", None): 3}  # the server did the first call; its row stays
