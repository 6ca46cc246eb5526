"""The data layer's guards: the start-up refusal of unsafe roles, and every query prepared on the schema."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from card_mcp import cards, db, migrate, semantic, tenants
from card_mcp.config import Settings
from card_mcp.errors import UnsafeRoleError
from tests.conftest import TestDatabase


@pytest.fixture
async def superuser_conn(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database.url_as(_superuser_name(database)))
    try:
        yield conn
    finally:
        await conn.close()


def _superuser_name(database: TestDatabase) -> str:
    from urllib.parse import urlsplit

    return urlsplit(database.superuser_url).username or "postgres"


@pytest.fixture
async def hostile_role(
    superuser_conn: asyncpg.Connection,
) -> AsyncIterator[Callable[[str], str]]:
    """Makes a login role with the given attributes; drops it afterwards."""
    made: list[str] = []

    def make(name: str) -> str:
        role = f"hostile_{name}_{uuid.uuid4().hex[:8]}"
        made.append(role)
        return role

    yield make
    for role in made:
        await superuser_conn.execute(f'DROP OWNED BY "{role}"')
        await superuser_conn.execute(f'DROP ROLE "{role}"')


async def refused(database: TestDatabase, settings: Settings, role: str) -> UnsafeRoleError:
    with pytest.raises(UnsafeRoleError) as caught:
        await db.create_pool(database.url_as(role), settings)
    return caught.value


async def test_start_up_refuses_a_superuser_application_role(
    database: TestDatabase,
    settings: Settings,
    superuser_conn: asyncpg.Connection,
    hostile_role: Callable[[str], str],
) -> None:
    role = hostile_role("super")
    await superuser_conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    assert "superuser" in (await refused(database, settings, role)).message


async def test_start_up_refuses_a_bypassrls_application_role(
    database: TestDatabase,
    settings: Settings,
    superuser_conn: asyncpg.Connection,
    hostile_role: Callable[[str], str],
) -> None:
    role = hostile_role("bypass")
    await superuser_conn.execute(f'CREATE ROLE "{role}" LOGIN BYPASSRLS')
    assert "BYPASSRLS" in (await refused(database, settings, role)).message


async def test_start_up_refuses_an_application_role_that_owns_a_table(
    database: TestDatabase,
    settings: Settings,
    superuser_conn: asyncpg.Connection,
    hostile_role: Callable[[str], str],
) -> None:
    role = hostile_role("owner")
    await superuser_conn.execute(f'CREATE ROLE "{role}" LOGIN')
    await superuser_conn.execute(f'CREATE TABLE public."{role}_t" (x int)')
    await superuser_conn.execute(f'ALTER TABLE public."{role}_t" OWNER TO "{role}"')
    assert "owns tables" in (await refused(database, settings, role)).message


async def test_start_up_refuses_a_member_of_the_schema_owner(
    database: TestDatabase,
    settings: Settings,
    superuser_conn: asyncpg.Connection,
    hostile_role: Callable[[str], str],
) -> None:
    role = hostile_role("member")
    await superuser_conn.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE card_mcp_owner')
    assert "card_mcp_owner" in (await refused(database, settings, role)).message


async def test_start_up_refuses_a_member_of_the_admin_role(
    database: TestDatabase, settings: Settings, superuser_conn: asyncpg.Connection, hostile_role: Callable[[str], str]
) -> None:
    role = hostile_role("admin_member")
    await superuser_conn.execute(f'CREATE ROLE "{role}" LOGIN IN ROLE card_mcp_admin')
    assert "card_mcp_admin" in (await refused(database, settings, role)).message


async def test_start_up_accepts_the_application_role(database: TestDatabase, settings: Settings) -> None:
    pool = await db.create_pool(database.app_url, settings)
    await pool.close()


def _queries(module: object) -> list[tuple[str, str]]:
    found = []
    for name, value in vars(module).items():
        if isinstance(value, str) and name.startswith("_") and name.isupper():
            text = value.strip()
            if text.split(None, 1)[0].upper() in {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH"} and ";" not in text:
                found.append((f"{module.__name__}.{name}", text))  # type: ignore[attr-defined]
    return found


async def test_every_query_prepares_against_the_migrated_schema(
    database: TestDatabase, app_pool: asyncpg.Pool, admin_conn: asyncpg.Connection
) -> None:
    app_queries = _queries(cards) + _queries(db) + _queries(migrate)
    admin_queries = _queries(tenants)
    assert len(app_queries) >= 10 and len(admin_queries) >= 2
    # Semantic search's queries need its tables, which exist only where pgvector does (migration 0006).
    if await semantic.database_ready(admin_conn):
        admin_queries += _queries(semantic)
    else:
        app_queries = [
            (name, text) for name, text in app_queries if name.rsplit(".", 1)[1] not in {"_HYBRID", "_NEAREST_SETTINGS"}
        ]
    failures = []
    async with app_pool.acquire() as conn:
        for name, text in app_queries:
            try:
                await conn.prepare(text)
            except asyncpg.PostgresError as exc:
                failures.append(f"{name}: {exc}")
    for name, text in admin_queries:
        try:
            await admin_conn.prepare(text)
        except asyncpg.PostgresError as exc:
            failures.append(f"{name}: {exc}")
    assert failures == []
