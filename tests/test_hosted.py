"""Hosted PostgreSQL as it really is (Supabase and the like): the migrating role is no superuser but has CREATEROLE
and owns the database; pg_trgm, btree_gin (and vector, where the server has it) were created by a superuser in a
schema of their own, ``extensions``; the server reaches the database through a transaction-mode pooler (pgbouncer,
when .ci/run provides one: CARD_MCP_TEST_PGBOUNCER_URL). migrate says exactly what the administrator must run;
once it has run, migrate, readers and a server all work."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from card_mcp import db, keys, migrate, readers
from card_mcp.errors import SetupError
from tests.conftest import TestDatabase, with_user
from tests.helpers import ok
from tests.test_http import http_server, mcp_client

PGBOUNCER_URL = os.environ.get("CARD_MCP_TEST_PGBOUNCER_URL")
_MOVE = re.compile(r"ALTER EXTENSION [a-z_]+ SET SCHEMA card_mcp;")


def via_pooler(url: str) -> str:
    """``url`` through pgbouncer (same user and database), when .ci/run started one; else ``url`` itself."""
    if not PGBOUNCER_URL:
        return url
    parts, bouncer = urlsplit(url), urlsplit(PGBOUNCER_URL)
    return urlunsplit((parts.scheme, f"{parts.username}@{bouncer.netloc.split('@')[-1]}", parts.path, "", ""))


@asynccontextmanager
async def hosted_database(superuser_url: str) -> AsyncIterator[tuple[str, str, bool]]:
    """A database owned by a CREATEROLE, non-superuser role, with the extensions in schema ``extensions``: (its
    name, the owner's URL, whether vector is there). Dropped afterwards, with the role."""
    suffix = uuid.uuid4().hex[:10]
    owner, name = f"hosted_owner_{suffix}", f"card_mcp_hosted_{suffix}"
    su = await asyncpg.connect(superuser_url)
    try:
        await su.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS")
        if su.get_server_version().major >= 16:
            # What creating them would have given it on 16+ (the roles are cluster-wide and exist already here).
            await su.execute(
                f"GRANT card_mcp_app, card_mcp_admin, card_mcp_analyst, card_mcp_reader TO {owner}"
                " WITH ADMIN OPTION, INHERIT FALSE, SET FALSE"
            )
        await su.execute(f"CREATE DATABASE {name} OWNER {owner}")
    finally:
        await su.close()
    su_here = with_user(superuser_url, urlsplit(superuser_url).username or "postgres", name)
    conn = await asyncpg.connect(su_here)
    try:
        await conn.execute("CREATE SCHEMA extensions")
        await conn.execute("CREATE EXTENSION pg_trgm WITH SCHEMA extensions")
        await conn.execute("CREATE EXTENSION btree_gin WITH SCHEMA extensions")
        vector = await conn.fetchval("SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector')")
        if vector:
            await conn.execute("CREATE EXTENSION vector WITH SCHEMA extensions")
    finally:
        await conn.close()
    try:
        yield name, with_user(superuser_url, owner, name), vector
    finally:
        su = await asyncpg.connect(superuser_url)
        try:
            await su.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await su.execute(f"DROP OWNED BY {owner}")  # role grants it made (16+ records their grantor)
            await su.execute(f"DROP ROLE IF EXISTS {owner}")
        finally:
            await su.close()


async def run_as_superuser(superuser_url: str, name: str, statements: list[str]) -> None:
    conn = await asyncpg.connect(with_user(superuser_url, urlsplit(superuser_url).username or "postgres", name))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_on_hosted_postgresql_migrate_says_what_to_run_then_migrate_readers_and_a_pooled_server_work(
    database: TestDatabase, superuser_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with hosted_database(superuser_url) as (name, owner_url, vector):
        conn = await db.connect(owner_url)
        try:
            with pytest.raises(SetupError) as refused:
                await migrate.migrate(conn)
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.schema_migrations") == 0  # nothing applied
        finally:
            await conn.close()
        told = _MOVE.findall(refused.value.message)
        assert sorted(told) == [
            "ALTER EXTENSION btree_gin SET SCHEMA card_mcp;",
            "ALTER EXTENSION pg_trgm SET SCHEMA card_mcp;",
        ]
        assert f"in database {name}" in refused.value.message
        await run_as_superuser(superuser_url, name, told)

        conn = await db.connect(owner_url)
        try:
            with caplog.at_level(logging.WARNING, logger="card_mcp.migrate"):
                applied = await migrate.migrate(conn)
            required = [m.version for m in migrate.load_migrations() if not m.requires]
            assert [v for v in applied if v in required] == required
            if vector:  # the optional migrations say the same, in the log, and run once it has been done
                optional = [m.version for m in migrate.load_migrations() if m.requires]
                assert optional and not set(optional) & set(applied)
                assert "ALTER EXTENSION vector SET SCHEMA card_mcp;" in caplog.text
                await run_as_superuser(superuser_url, name, ["ALTER EXTENSION vector SET SCHEMA card_mcp;"])
                assert await migrate.migrate(conn) == optional
            assert await migrate.pending(conn) == []
            # A reader, made by the CREATEROLE owner, bound to its tenant.
            tenant = f"hosted-{uuid.uuid4().hex[:8]}"
            admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
            tenant_id = await db.tenant_id_for(admin_url, tenant)
            other_id = await db.tenant_id_for(admin_url, f"other-{uuid.uuid4().hex[:8]}")
            reader = f"r_{uuid.uuid4().hex[:16]}"
            assert await readers.create_reader(conn, tenant, reader) is not None
        finally:
            await conn.close()
        try:
            hosted = TestDatabase(
                superuser_url=superuser_url,
                name=name,
                owner_url=owner_url,
                app_url=with_user(superuser_url, db.APP_ROLE, name),
                admin_url=admin_url,
                embedded=database.embedded,
            )
            admin = await db.connect(admin_url)
            try:
                _, key = await keys.create_key(admin, tenant, "hosted")
                _, other_key = await keys.create_key(
                    admin, await admin.fetchval("SELECT name FROM card_mcp.tenants WHERE tenant_id = $1", other_id)
                )
            finally:
                await admin.close()
            with http_server(
                hosted,
                app_url=via_pooler(hosted.app_url),
                CARD_MCP_ADMIN_DATABASE_URL=via_pooler(admin_url),
                CARD_MCP_STATEMENT_CACHE_SIZE="0" if PGBOUNCER_URL else "100",
            ) as running:
                async with mcp_client(running.url, key) as client:
                    created = ok(
                        await client.call_tool(
                            "create_card",
                            {"card_type": "voice", "title": "Hosted voice", "content": {"tone": "calm"}},
                        )
                    )
                    found = ok(await client.call_tool("search_cards", {"query": "hosted voice"}))
                    assert [c["id"] for c in found["cards"]] == [created["card"]["id"]]
                async with mcp_client(running.url, other_key) as client:
                    assert ok(await client.call_tool("search_cards", {}))["cards"] == []
            conn = await asyncpg.connect(with_user(superuser_url, reader, name))
            try:
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, false)", str(other_id))
                seen = await conn.fetch("SELECT DISTINCT tenant_id FROM card_mcp.cards")
                assert [r["tenant_id"] for r in seen] == [tenant_id]
            finally:
                await conn.close()
        finally:
            conn = await db.connect(owner_url)
            try:
                await readers.revoke_reader(conn, reader)
            finally:
                await conn.close()
