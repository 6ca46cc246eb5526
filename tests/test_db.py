"""The data layer's guards: the start-up refusal of unsafe roles, and every query prepared on the schema."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

import card_mcp
from card_mcp import db, semantic
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


_SQL_WORDS = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH"}
# Who runs each module's queries; the rest of the package runs its queries as the application role.
_ADMIN_MODULES = {"tenants", "keys", "auth", "semantic", "oauth", "issuer", "connections", "signin", "retention"}
_ADMIN_QUERIES = {"idempotency._DELETE_EXPIRED"}
_OWNER_MODULES = {"migrate", "readers"}
# Connect codes are made, and tenants erased, with the owner's URL only.
_OWNER_QUERIES = {"connections._CREATE_CODE", "tenants._ERASE"}
# Semantic search's queries need its tables, which exist only where pgvector does (migration 0006).
_VECTOR_QUERIES = {"search._HYBRID", "search._NEAREST_SETTINGS"}
# Export and import of card history need card_versions (schema/0009, issue #21): prepared wherever it exists.
_HISTORY_QUERIES = {"transfer._CARDS_WITH_HISTORY", "transfer._INSERT_VERSIONS"}


def _package_queries() -> dict[str, str]:
    """Every SQL text of the package: each module's upper-case string constants that are one statement."""
    found = {}
    for info in pkgutil.iter_modules(card_mcp.__path__):
        module = importlib.import_module(f"card_mcp.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, str) and name.lstrip("_").isupper():
                text = value.strip()
                if text and text.split(None, 1)[0].upper() in _SQL_WORDS and ";" not in text:
                    found[f"{info.name}.{name}"] = text
    return found


def test_no_query_is_written_inline_where_it_runs() -> None:
    """Queries are named constants (so the test below prepares every one): no execute/fetch call takes a literal,
    except transaction control."""
    inline = []
    for path in Path(card_mcp.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"execute", "fetch", "fetchrow", "fetchval", "prepare", "executemany"}
                and node.args
                and isinstance(node.args[0], ast.Constant | ast.JoinedStr)
                and not (
                    isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in {"BEGIN READ WRITE", "COMMIT", "ROLLBACK"}
                )
            ):
                inline.append(f"{path.name}:{node.lineno}")
    assert inline == []


async def test_every_query_of_the_package_prepares_against_the_migrated_schema_as_its_role(
    database: TestDatabase, app_pool: asyncpg.Pool, admin_conn: asyncpg.Connection
) -> None:
    queries = _package_queries()
    assert len(queries) >= 40
    vectors = await semantic.database_ready(admin_conn)
    history = await admin_conn.fetchval("SELECT to_regclass('card_mcp.card_versions') IS NOT NULL")
    owner = await db.connect(database.owner_url)
    failures = []
    try:
        async with app_pool.acquire() as app:
            for name, text in queries.items():
                module = name.split(".", 1)[0]
                if (name in _VECTOR_QUERIES and not vectors) or (name in _HISTORY_QUERIES and not history):
                    continue
                if module in _OWNER_MODULES or name in _OWNER_QUERIES:
                    conn = owner
                elif module in _ADMIN_MODULES or name in _ADMIN_QUERIES:
                    if module == "semantic" and not vectors:
                        continue
                    conn = admin_conn
                else:
                    conn = app
                try:
                    await conn.prepare(text)
                except asyncpg.PostgresError as exc:
                    failures.append(f"{name}: {exc}")
    finally:
        await owner.close()
    assert failures == []
