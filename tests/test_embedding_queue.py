"""The embedding queue is shared among tenants: a card one tenant writes is in the next batch while few tenants
have a backlog, and has its turn within a few batches behind any number of them, never after every other tenant's
import; no queued card is taken twice or lost.

Needs pgvector (the queue is 0006's, optional), not the semantic extra: these take batches with the worker's own
statement (semantic.take_batch) through the admin role, as the worker does, on a database of their own (taking a
batch from the suite's shared queue would take other tests' cards)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from card_mcp import cards, db, semantic
from card_mcp.config import Settings
from tests.conftest import TestDatabase, app_pool_for, new_database, settings_for
from tests.helpers import tenant_transaction
from tests.test_cards import new_card

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
async def database(superuser_url: str) -> AsyncIterator[TestDatabase]:
    async with new_database(superuser_url, "card_mcp_queue") as created:
        conn = await db.connect(created.admin_url)
        try:
            if await conn.fetchval("SELECT to_regclass('card_mcp.embedding_queue')") is None:
                pytest.skip("the database has no vector extension: there is no embedding queue")
        finally:
            await conn.close()
        yield created


@pytest.fixture(scope="module")
def settings(database: TestDatabase) -> Settings:
    return settings_for(database)


@pytest.fixture(scope="module")
async def app_pool(database: TestDatabase, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    async with app_pool_for(database, settings) as pool:
        yield pool


@pytest.fixture
async def admin(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(database.admin_url)
    try:
        await conn.execute("DELETE FROM card_mcp.embedding_queue")  # each test its own queue
        yield conn
    finally:
        await conn.close()


async def queue(
    database: TestDatabase, app_pool: asyncpg.Pool, admin: asyncpg.Connection, count: int, minutes: int
) -> list[uuid.UUID]:
    """A new tenant's ``count`` cards, written as tools write them (the trigger queues each), queued ``minutes``
    after EPOCH and a second apart, in the order returned."""
    tenant_id = await db.tenant_id_for(database.admin_url, f"q-{uuid.uuid4().hex[:10]}")
    ids = []
    for _ in range(count):
        async with tenant_transaction(app_pool, tenant_id) as tx:
            _, card = await cards.create_card(tx, tenant_id, new_card(), max_bytes=65536)
        ids.append(card.id)
    await admin.execute(
        "UPDATE card_mcp.embedding_queue AS q SET queued_at = $2::timestamptz + make_interval(secs => s.n)"
        "  FROM unnest($1::uuid[]) WITH ORDINALITY AS s(card_id, n) WHERE q.card_id = s.card_id",
        ids,
        EPOCH + timedelta(minutes=minutes),
    )
    return ids


async def take(admin: asyncpg.Connection, size: int) -> list[uuid.UUID]:
    return [row["card_id"] for row in await semantic.take_batch(admin, size)]


async def test_a_card_written_behind_another_tenants_import_is_in_the_next_batch(
    database: TestDatabase, app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    imported = await queue(database, app_pool, admin, 40, minutes=0)
    written = await queue(database, app_pool, admin, 1, minutes=30)
    batch = await take(admin, 16)
    assert len(batch) == 16 and written[0] in batch  # not after the 40 cards queued before it
    assert set(batch) - set(written) == set(imported[:15])  # the importing tenant's oldest
    rest = [card for _ in range(3) for card in await take(admin, 16)]
    assert sorted(rest) == sorted(imported[15:])  # the import goes on, nothing taken twice, nothing left


async def test_a_batch_goes_round_robin_among_the_tenants_each_ones_oldest_first(
    database: TestDatabase, app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    first = await queue(database, app_pool, admin, 4, minutes=0)
    second = await queue(database, app_pool, admin, 4, minutes=10)
    third = await queue(database, app_pool, admin, 5, minutes=20)
    # Six cards: each tenant's oldest, then each one's second.
    assert set(await take(admin, 6)) == {first[0], second[0], third[0], first[1], second[1], third[1]}
    assert set(await take(admin, 6)) == {first[2], second[2], third[2], first[3], second[3], third[3]}
    assert await take(admin, 6) == [third[4]]
    assert await take(admin, 6) == []


async def test_behind_more_backlogs_than_a_batch_has_cards_a_new_card_has_its_turn_within_a_round(
    database: TestDatabase, app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """30 tenants with 8 cards each queued before it: taken oldest first by tenant (as before 0021's turns), the
    16 tenants with the oldest cards would drain before the new card's tenant came in, in the ninth batch; with half
    of each batch's 16 tenants taken in turn, 8 a batch, all 31 have had a turn by the fourth."""
    backlogs = [await queue(database, app_pool, admin, 8, minutes=minute) for minute in range(30)]
    written = await queue(database, app_pool, admin, 1, minutes=60)
    batches = [await take(admin, 16) for _ in range(4)]
    assert any(written[0] in batch for batch in batches)
    assert all(len(batch) == 16 for batch in batches)
    taken = [card for batch in batches for card in batch]
    assert len(set(taken)) == len(taken)
    for backlog in backlogs:  # each tenant's cards oldest first
        mine = [card for card in taken if card in backlog]
        assert set(mine) == set(backlog[: len(mine)])


async def test_two_workers_taking_at_once_take_different_cards_and_lose_none(
    database: TestDatabase, app_pool: asyncpg.Pool, admin: asyncpg.Connection
) -> None:
    """The first worker's batch stays locked until it commits (here held open; the worker's statement commits at
    once); the second skips what it locked, up to a batch's worth of each tenant's oldest, and takes the rest."""
    one = await queue(database, app_pool, admin, 10, minutes=0)
    other = await queue(database, app_pool, admin, 10, minutes=5)
    second = await db.connect(database.admin_url)
    try:
        async with admin.transaction():
            held = await take(admin, 8)
            meanwhile = await take(second, 8)
        assert len(held) == 8 and meanwhile and not set(held) & set(meanwhile)
        left = await take(second, 20)
    finally:
        await second.close()
    assert sorted(held + meanwhile + left) == sorted(one + other)
