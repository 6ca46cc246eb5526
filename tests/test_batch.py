"""batch_create_cards and create_card under retries, concurrency, killed backends and cancellation, through the
SDK's in-memory client on a real PostgreSQL: no card is lost or duplicated, and every call leaves one usage row."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import asyncpg
import pytest
from mcp.types import CallToolResult, TextContent
from pydantic import ValidationError

from card_mcp import cards, db
from card_mcp.config import Settings
from card_mcp.models import NewCard
from tests.conftest import TestDatabase
from tests.helpers import connect, error_code, maintenance, ok, until, usage_rows

TYPES = ("company", "audience", "voice", "insight")


def make_cards(count: int, label: str = "card") -> list[dict[str, Any]]:
    return [
        {
            "card_type": TYPES[i % 4],
            "title": f"{label} {i}",
            "content": {"summary": f"{label} number {i}", "points": [i, i + 1], "source": {"page": i}},
            "tags": ["import", f"group-{i % 5}"],
        }
        for i in range(count)
    ]


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def counts(database: TestDatabase, tenant: str) -> tuple[int, int]:
    """(active cards, idempotency entries) of ``tenant``, read through the admin role."""
    conn = await db.connect(database.admin_url)
    try:
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM card_mcp.cards c WHERE c.tenant_id = t.tenant_id AND c.is_active) AS cards,
                   (SELECT count(*) FROM card_mcp.idempotency_store i WHERE i.tenant_id = t.tenant_id) AS keys
              FROM card_mcp.tenants t WHERE t.name = $1
            """,
            tenant,
        )
    finally:
        await conn.close()
    return (row["cards"], row["keys"]) if row else (0, 0)


class Blocker:
    """An open transaction, as the tenant, holding an uncommitted card with the content of a batch's card: the
    batch's INSERT waits on it, so the batch is provably mid-write until the blocker lets go (rolls back)."""

    def __init__(self, conn: Any, transaction: Any) -> None:
        self._conn, self._transaction = conn, transaction

    @classmethod
    @asynccontextmanager
    async def holding(cls, pool: asyncpg.Pool, tenant_id: uuid.UUID, card: dict[str, Any]) -> AsyncIterator[Blocker]:
        async with pool.acquire() as conn:
            transaction = conn.transaction()
            await transaction.start()
            blocker = cls(conn, transaction)
            try:
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_id))
                await cards.create_card(conn, tenant_id, NewCard.model_validate(card))
                yield blocker
            finally:
                await blocker.release()

    async def release(self) -> None:
        if self._transaction is not None:
            await self._transaction.rollback()
            self._transaction = None


async def batch_waiting_on_a_lock(database: TestDatabase) -> int:
    """The pid of the application role's backend that waits on a lock inside a cards INSERT."""

    async def find() -> int | None:
        async with maintenance(database) as conn:
            pid: int | None = await conn.fetchval(
                """
                SELECT pid FROM pg_stat_activity
                 WHERE datname = $1 AND usename = 'card_mcp_app' AND wait_event_type = 'Lock'
                   AND query LIKE '%INSERT INTO card_mcp.cards%'
                """,
                database.name,
            )
        return pid

    pid: int = await until(find, "a batch waiting on the blocker's lock")
    return pid


def without_replayed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "replayed"}


async def test_twenty_concurrent_batches_with_one_key_write_once_and_agree(
    database: TestDatabase, settings: Settings, app_pool: asyncpg.Pool, tenant: str
) -> None:
    assert settings.pool_max_size >= 8
    batch = make_cards(100)
    arguments = {"cards": batch, "idempotency_key": "brand-book-import"}
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    results: dict[int, CallToolResult] = {}
    async with connect(settings, tenant) as client:

        async def call(i: int) -> None:
            results[i] = await client.call_tool("batch_create_cards", arguments)

        async with Blocker.holding(app_pool, tenant_id, batch[0]) as blocker, anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(call, i)
            # Overlap, shown: one call is blocked mid-write inside its INSERT while the other 19 are answered.
            await batch_waiting_on_a_lock(database)

            async def nineteen_answered() -> bool:
                return len(results) == 19

            await until(nineteen_answered, "the other 19 calls to answer")
            assert {error_code(r) for r in results.values()} == {"conflict"}
            await blocker.release()
        assert len(results) == 20
        succeeded = [ok(r) for r in results.values() if not r.is_error]
        assert len(succeeded) == 1 and succeeded[0]["created"] == 100 and succeeded[0]["replayed"] is False

        retried: list[dict[str, Any]] = []

        async def retry() -> None:
            retried.append(ok(await client.call_tool("batch_create_cards", arguments)))

        async with anyio.create_task_group() as tg:
            for _ in range(19):
                tg.start_soon(retry)
    assert all(r["replayed"] is True for r in retried)
    assert all(without_replayed(r) == without_replayed(succeeded[0]) for r in retried)
    assert await counts(database, tenant) == (100, 1)
    rows = await usage_rows(database.admin_url, tenant)
    assert len(rows) == 39  # 20 concurrent calls and 19 retries, replays included
    assert sorted((r["status"], r["error_code"]) for r in rows) == [("error", "conflict")] * 19 + [("ok", None)] * 20


async def test_a_key_reused_with_other_cards_is_refused_and_another_tenants_key_is_its_own(
    database: TestDatabase, settings: Settings, tenant: str
) -> None:
    batch = make_cards(10)
    async with connect(settings, tenant) as client:
        first = ok(await client.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "k-1"}))
        other = await client.call_tool(
            "batch_create_cards", {"cards": make_cards(10, "other"), "idempotency_key": "k-1"}
        )
        assert error_code(other) == "idempotency_conflict"
    assert await counts(database, tenant) == (10, 1)
    tenant_b = f"b-{tenant}"
    async with connect(settings, tenant_b) as client_b:
        theirs = ok(await client_b.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "k-1"}))
    assert theirs["replayed"] is False and theirs["created"] == 10
    assert not {r["card_id"] for r in theirs["results"]} & {r["card_id"] for r in first["results"]}
    assert await counts(database, tenant_b) == (10, 1)
    assert await counts(database, tenant) == (10, 1)


@pytest.mark.parametrize(
    ("bad_card", "where"),
    [
        ({"title": "x" * 201}, "cards.57.title"),  # refused by the arguments' schema, before the tool runs
        ({"content": {"text": "y" * 70_000}}, "cards[57]"),  # refused by the content rules, before any write
        ({"card_type": "slogan"}, "cards.57.card_type"),
    ],
)
async def test_a_batch_with_an_invalid_card_57_writes_nothing_and_names_it(
    database: TestDatabase, settings: Settings, tenant: str, bad_card: dict[str, Any], where: str
) -> None:
    batch = make_cards(100)
    batch[57] = {**batch[57], **bad_card}
    async with connect(settings, tenant) as client:
        result = await client.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "k-57"})
    assert error_code(result) == "invalid_argument"
    message = json.loads(result.content[0].text)["error"]["message"]  # type: ignore[union-attr]
    assert where in message and "yyyy" not in message and "xxxx" not in message
    assert await counts(database, tenant) == (0, 0)
    rows = await usage_rows(database.admin_url, tenant)
    assert [(r["tool"], r["error_code"], r["card_ids"]) for r in rows] == [
        ("batch_create_cards", "invalid_argument", [])
    ]


async def test_a_batch_whose_backend_is_killed_mid_write_leaves_nothing_and_its_retry_succeeds_once(
    database: TestDatabase, settings: Settings, app_pool: asyncpg.Pool, tenant: str
) -> None:
    batch = make_cards(100)
    arguments = {"cards": batch, "idempotency_key": "killed-import"}
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    async with connect(settings, tenant) as client:
        outcome: list[CallToolResult] = []

        async def call() -> None:
            outcome.append(await client.call_tool("batch_create_cards", arguments))

        async with Blocker.holding(app_pool, tenant_id, batch[0]), anyio.create_task_group() as tg:
            tg.start_soon(call)
            pid = await batch_waiting_on_a_lock(database)
            async with maintenance(database) as conn:
                assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)

            async def answered() -> bool:
                return bool(outcome)

            await until(answered, "the killed call to answer")
        assert error_code(outcome[0]) == "unavailable"
        assert await counts(database, tenant) == (0, 0)
        retry = ok(await client.call_tool("batch_create_cards", arguments))
        again = ok(await client.call_tool("batch_create_cards", arguments))
    assert (retry["created"], retry["replayed"]) == (100, False)
    assert again == {**retry, "replayed": True}
    assert await counts(database, tenant) == (100, 1)
    rows = await usage_rows(database.admin_url, tenant)  # one per call, the killed one's after its rollback
    assert [(r["tool"], r["error_code"]) for r in rows] == [
        ("batch_create_cards", "unavailable"),
        ("batch_create_cards", None),
        ("batch_create_cards", None),
    ]


async def test_a_cancelled_batch_rolls_back_and_leaves_its_usage_row(
    database: TestDatabase, settings: Settings, app_pool: asyncpg.Pool, tenant: str
) -> None:
    batch = make_cards(100)
    arguments = {"cards": batch, "idempotency_key": "cancelled-import"}
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    async with connect(settings, tenant) as client:
        async with Blocker.holding(app_pool, tenant_id, batch[0]), anyio.create_task_group() as tg:

            async def call() -> None:
                with anyio.CancelScope() as scope:
                    calling.append(scope)
                    await client.call_tool("batch_create_cards", arguments)

            calling: list[anyio.CancelScope] = []
            tg.start_soon(call)
            pid = await batch_waiting_on_a_lock(database)
            calling[0].cancel()  # the client gives up: the SDK tells the server with notifications/cancelled

            async def backend_left_the_insert() -> bool:
                async with maintenance(database) as conn:
                    query = await conn.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
                return query is None or "INSERT INTO card_mcp.cards" not in query

            await until(backend_left_the_insert, "the server to abandon the cancelled INSERT")

        async def usage_row_written() -> list[asyncpg.Record]:
            return await usage_rows(database.admin_url, tenant)

        rows = await until(usage_row_written, "the cancelled call's usage row")
        assert [(r["tool"], r["status"], r["error_code"]) for r in rows] == [
            ("batch_create_cards", "error", "cancelled")
        ]
        assert await counts(database, tenant) == (0, 0)
        retry = ok(await client.call_tool("batch_create_cards", arguments))
    assert (retry["created"], retry["replayed"]) == (100, False)
    async with maintenance(database) as conn:
        stuck = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND state LIKE 'idle in transaction%'",
            database.name,
        )
    assert stuck == 0


async def test_fifty_concurrent_creates_of_one_content_make_one_card_and_agree_on_its_id(
    database: TestDatabase, settings: Settings, tenant: str
) -> None:
    card = make_cards(1)[0]
    answers: list[dict[str, Any]] = []
    async with connect(settings, tenant) as client:

        async def call() -> None:
            answers.append(ok(await client.call_tool("create_card", card)))

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(call)
    assert len({a["card"]["id"] for a in answers}) == 1 and len(answers) == 50
    assert sorted(a["status"] for a in answers) == ["created"] + ["existing"] * 49
    assert await counts(database, tenant) == (1, 0)
    assert len(await usage_rows(database.admin_url, tenant)) == 50


async def test_concurrent_batches_sharing_cards_in_opposite_orders_never_deadlock(
    database: TestDatabase, settings: Settings, tenant: str
) -> None:
    pool = make_cards(120)
    forward, backward = pool[:80], list(reversed(pool[40:]))
    answers: list[dict[str, Any]] = []
    async with connect(settings, tenant) as client:

        async def call(batch: list[dict[str, Any]]) -> None:
            answers.append(ok(await client.call_tool("batch_create_cards", {"cards": batch})))

        for _ in range(3):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, forward)
                tg.start_soon(call, backward)
    assert await counts(database, tenant) == (120, 0)
    ids = {r["card_id"] for a in answers for r in a["results"]}
    assert len(ids) == 120


async def test_expired_keys_run_afresh_and_the_server_removes_them(
    database: TestDatabase, settings: Settings, tenant: str
) -> None:
    batch = make_cards(3)
    async with connect(settings, tenant) as client:
        ok(await client.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "old-key"}))
        await expire(database, tenant, "old-key")
        fresh = ok(
            await client.call_tool("batch_create_cards", {"cards": make_cards(2, "new"), "idempotency_key": "old-key"})
        )
        assert fresh["replayed"] is False and fresh["created"] == 2
        await expire(database, tenant, "old-key")
        assert await counts(database, tenant) == (5, 1)
    # A server removes expired keys when it starts (and every hour while it runs).
    async with connect(settings, tenant):

        async def removed() -> bool:
            return (await counts(database, tenant))[1] == 0

        await until(removed, "the server's expiry clean-up")


async def expire(database: TestDatabase, tenant: str, key: str) -> None:
    """Make ``key`` of ``tenant`` look 25 hours old, as the owner (the clock cannot be moved)."""
    conn = await db.connect(database.owner_url)
    try:
        await conn.execute(
            """
            UPDATE card_mcp.idempotency_store AS i SET expires_at = now() - interval '1 hour'
              FROM card_mcp.tenants AS t
             WHERE t.tenant_id = i.tenant_id AND t.name = $1 AND i.idempotency_key = $2
            """,
            tenant,
            key,
        )
    finally:
        await conn.close()


async def test_keys_are_kept_as_long_as_configured_and_never_less_than_a_day(
    database: TestDatabase, settings: Settings, tenant: str
) -> None:
    with pytest.raises(ValidationError):
        Settings(idempotency_ttl_hours=23)
    async with connect(settings.model_copy(update={"idempotency_ttl_hours": 72.0}), tenant) as client:
        ok(await client.call_tool("batch_create_cards", {"cards": make_cards(1), "idempotency_key": "long"}))
    conn = await db.connect(database.admin_url)
    try:
        kept = await conn.fetchval(
            "SELECT i.expires_at - i.created_at FROM card_mcp.idempotency_store i"
            " JOIN card_mcp.tenants t USING (tenant_id) WHERE t.name = $1",
            tenant,
        )
    finally:
        await conn.close()
    assert kept == timedelta(hours=72)


async def test_a_retry_spelling_the_same_cards_differently_replays(settings: Settings, tenant: str) -> None:
    batch = make_cards(3)
    # Keys in another order, inside content and out, and titles with spaces around (they are trimmed).
    respelled = [
        {
            "tags": c["tags"],
            "content": dict(reversed(list(c["content"].items()))),
            "title": f"  {c['title']} ",
            "card_type": c["card_type"],
        }
        for c in batch
    ]
    async with connect(settings, tenant) as client:
        first = ok(await client.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "spelled"}))
        again = ok(await client.call_tool("batch_create_cards", {"cards": respelled, "idempotency_key": "spelled"}))
        # Sent exactly as the first time: answered from the key before the cards are validated again, alike.
        exact = await client.call_tool("batch_create_cards", {"cards": batch, "idempotency_key": "spelled"})
    assert again == {**first, "replayed": True}
    assert ok(exact) == again
    assert isinstance(exact.content[0], TextContent) and json.loads(exact.content[0].text) == again
