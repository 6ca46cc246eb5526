"""card-mcp migrate: each file once, in order, atomically, safely in parallel."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from card_mcp import db, migrate
from card_mcp.bootstrap import ROLES_SQL, VECTOR_SQL
from card_mcp.errors import SetupError
from tests.conftest import drop_database, with_user


@pytest.fixture
async def fresh_owner_url(superuser_url: str) -> AsyncIterator[str]:
    """An empty database owned by card_mcp_owner, nothing migrated."""
    name = f"card_mcp_fresh_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(ROLES_SQL)
        await conn.execute(f'CREATE DATABASE "{name}" OWNER card_mcp_owner')
    finally:
        await conn.close()
    try:
        yield with_user(superuser_url, db.OWNER_ROLE, name)
    finally:
        await drop_database(superuser_url, name)


def required() -> list[str]:
    """Every migration but the optional ones, whose extension a fresh database does not have installed."""
    return [m.version for m in migrate.load_migrations() if m.requires is None]


async def test_migrate_applies_every_file_once_and_then_nothing(fresh_owner_url: str) -> None:
    conn = await db.connect(fresh_owner_url)
    try:
        everything = required()
        assert [m.version for m in await migrate.pending(conn)] == everything
        assert await migrate.migrate(conn) == everything
        assert await migrate.migrate(conn) == []
        assert await migrate.pending(conn) == []
    finally:
        await conn.close()


async def test_concurrent_migrate_runs_apply_each_file_exactly_once(fresh_owner_url: str) -> None:
    applied: list[list[str]] = []

    async def run() -> None:
        conn = await db.connect(fresh_owner_url)
        try:
            applied.append(await migrate.migrate(conn))
        finally:
            await conn.close()

    async with anyio.create_task_group() as group:
        for _ in range(4):
            group.start_soon(run)
    everything = required()
    assert sorted(v for run_ in applied for v in run_) == sorted(everything)
    conn = await asyncpg.connect(fresh_owner_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.schema_migrations") == len(everything)
    finally:
        await conn.close()


async def test_a_failing_migration_leaves_nothing_of_itself(fresh_owner_url: str) -> None:
    broken = [
        *migrate.load_migrations(),
        migrate.Migration("9999_broken", "CREATE TABLE card_mcp.half_made (x int); SELECT 1 / 0;"),
    ]
    conn = await db.connect(fresh_owner_url)
    try:
        with pytest.raises(SetupError):
            await migrate.migrate(conn, broken)
        assert await conn.fetchval("SELECT to_regclass('card_mcp.half_made')") is None
        assert [m.version for m in await migrate.pending(conn, broken)] == ["9999_broken"]
    finally:
        await conn.close()


def test_migrations_are_numbered_without_gaps() -> None:
    versions = [m.version for m in migrate.load_migrations()]
    assert [int(v.split("_", 1)[0]) for v in versions] == list(range(1, len(versions) + 1))


async def test_an_optional_migration_waits_for_its_extension_and_is_applied_on_a_later_run(
    superuser_url: str, fresh_owner_url: str
) -> None:
    """0006_semantic (and 0020 and 0021, its queue's index and turns) needs pgvector 0.8, which only a superuser may
    create: without it the database is up to date and none is recorded; once a superuser has created the extension,
    the next run applies them all, in order."""
    optional = [m.version for m in migrate.load_migrations() if m.requires == "vector"]
    assert optional == ["0006_semantic", "0020_embedding_queue_fair", "0021_embedding_turns"]
    conn = await db.connect(fresh_owner_url)
    try:
        assert await migrate.migrate(conn) == required()
        assert await migrate.pending(conn) == []  # up to date without it: servers start
        recorded = "SELECT count(*) FROM card_mcp.schema_migrations WHERE version = '0006_semantic'"
        assert not await conn.fetchval(recorded)
        name = fresh_owner_url.rsplit("/", 1)[1].split("?")[0]
        available = await conn.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'")
        if not available:
            pytest.skip("this PostgreSQL has no pgvector: the rest needs it")
        su = urlsplit(superuser_url).username or "postgres"
        superuser = await asyncpg.connect(with_user(superuser_url, su, name))
        try:
            await superuser.execute(VECTOR_SQL)
        finally:
            await superuser.close()
        assert await migrate.pending(conn) == []  # never pending: a server starts with or without it
        assert await migrate.migrate(conn) == optional  # now it can be applied, and is
        assert await migrate.migrate(conn) == []
    finally:
        await conn.close()


async def test_pgvector_in_another_schema_leaves_the_optional_migration_out_without_failing(
    superuser_url: str, fresh_owner_url: str
) -> None:
    """A database whose pgvector another application installed in public: card-mcp cannot use it (its types are
    looked up in card_mcp), so the migration is left out with a log line; nothing fails and servers start."""
    name = fresh_owner_url.rsplit("/", 1)[1].split("?")[0]
    su = urlsplit(superuser_url).username or "postgres"
    superuser = await asyncpg.connect(with_user(superuser_url, su, name))
    try:
        if not await superuser.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"):
            pytest.skip("this PostgreSQL has no pgvector")
        await superuser.execute("CREATE EXTENSION vector")  # in public
    finally:
        await superuser.close()
    conn = await db.connect(fresh_owner_url)
    try:
        assert await migrate.migrate(conn) == required()
        assert await migrate.pending(conn) == []
    finally:
        await conn.close()


async def test_upgrading_a_database_that_holds_cards_indexes_them_for_search(fresh_owner_url: str) -> None:
    """Migrations that derive rows from existing cards (0011's vocabulary, 0014's postings) run on a database with
    cards in it, as a user's upgrade does, and search finds those cards afterwards."""
    owner = await db.connect(fresh_owner_url)
    try:
        before = [m for m in migrate.load_migrations() if m.requires is None and m.version < "0011"]
        await migrate.migrate(owner, before)
        admin_url = with_user(fresh_owner_url, db.ADMIN_ROLE, urlsplit(fresh_owner_url).path.lstrip("/"))
        app_url = with_user(fresh_owner_url, db.APP_ROLE, urlsplit(fresh_owner_url).path.lstrip("/"))
        tenant = await db.tenant_id_for(admin_url, "upgraded")
        app = await db.connect(app_url)
        try:
            async with app.transaction():
                await app.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
                await app.execute(
                    "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash)"
                    " SELECT $1, 'voice', 'Onboarding voice ' || g, jsonb_build_object('tone', 'dry'), '{}',"
                    " md5(g::text) || md5('x' || g) FROM generate_series(1, 3) AS g",
                    tenant,
                )
            assert await migrate.migrate(owner) == [m for m in required() if m >= "0011"]
            async with app.transaction():
                await app.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
                search = "SELECT id FROM card_mcp.search_cards($1, NULL, NULL, NULL, NULL, 10)"
                found = await app.fetch(search, "onboarding tone")
                typo = await app.fetch(search, "onbording")
                postings = await app.fetchval("SELECT count(*) FROM card_mcp.search_postings")
        finally:
            await app.close()
    finally:
        await owner.close()
    assert len(found) == 3 and len(typo) == 3 and postings > 0
