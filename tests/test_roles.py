"""Roles by who holds them (issue #17): each attack that worked with the URLs once handed to people, tried again
with the roles people now hold (the analyst, a per-tenant reader) and the server's runtime admin role; and the
catalog audit of every role's privileges, mirrored in docs/security.md."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import asyncpg
import pytest

from card_mcp import cards, db, keys, readers
from card_mcp.config import Settings
from card_mcp.errors import UnsafeRoleError
from tests.conftest import TestDatabase, with_user
from tests.helpers import tenant_transaction
from tests.test_cards import new_card
from tests.test_http import CARD_MCP

SUPERUSER_NAME = "postgres"


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


def superuser_here(database: TestDatabase) -> str:
    """A superuser's URL of the test database itself (not the maintenance database)."""
    return with_user(database.superuser_url, urlsplit(database.superuser_url).username or SUPERUSER_NAME, database.name)


async def tenant_with_card(database: TestDatabase, app_pool: asyncpg.Pool, prefix: str) -> tuple[str, uuid.UUID]:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    tenant_id = await db.tenant_id_for(database.admin_url, name)
    async with tenant_transaction(app_pool, tenant_id) as conn:
        await cards.create_card(conn, tenant_id, new_card())
        await conn.execute(
            "SELECT card_mcp.record_call($1, 'get_card', 'ok', NULL, '{}', 1, 'pytest', NULL, 'stdio', NULL)",
            tenant_id,
        )
    return name, tenant_id


@asynccontextmanager
async def reader_of(database: TestDatabase, tenant: str) -> AsyncIterator[str]:
    """A reader of ``tenant`` with a name of its own (roles are cluster-wide: other test runs share the server),
    dropped afterwards."""
    name = f"r_{uuid.uuid4().hex[:16]}"
    async with connected(database.owner_url) as owner:
        await db._init_connection(owner)
        await readers.create_reader(owner, tenant, name, password=False)
    try:
        yield name
    finally:
        async with connected(database.owner_url) as owner:
            await owner.execute("DELETE FROM card_mcp.readers WHERE role_name = $1", name)
            await owner.execute(await owner.fetchval("SELECT format('DROP ROLE IF EXISTS %I', $1::text)", name))


# -- a reader is bound to its tenant -----------------------------------------------------------------------------


async def test_a_reader_that_sets_another_tenants_id_sees_and_writes_nothing_of_it(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    mine, mine_id = await tenant_with_card(database, app_pool, "dash")
    _, other_id = await tenant_with_card(database, app_pool, "victim")
    async with reader_of(database, mine) as name, connected(database.url_as(name)) as conn:
        for scope in ("false", "true"):  # session-level, then transaction-local, as the server does
            async with conn.transaction():
                await conn.execute(f"SELECT set_config('app.current_tenant_id', $1, {scope})", str(other_id))
                for table in ("cards", "card_usage", "tenants", "usage_daily", "usage_by_client"):
                    seen = await conn.fetch(f"SELECT DISTINCT tenant_id FROM card_mcp.{table}")  # noqa: S608 - fixed
                    assert [r["tenant_id"] for r in seen] == [mine_id], table
        writes = [
            (
                "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)"
                " VALUES ($1, 'voice', 'planted', '{}', repeat('0', 64))",
                other_id,
            ),
            ("UPDATE card_mcp.cards SET title = 'stolen' WHERE tenant_id = $1", other_id),
            ("DELETE FROM card_mcp.card_usage WHERE tenant_id = $1", other_id),
            ("UPDATE card_mcp.readers SET tenant_id = $1", other_id),  # rebinding itself
            ("INSERT INTO card_mcp.readers (tenant_id, role_name) VALUES ($1, current_user)", other_id),
        ]
        for statement, argument in writes:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(other_id))
                    await conn.execute(statement, argument)
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.readers") == 1  # its own row, nobody else's


async def test_a_revoked_reader_reads_nothing_from_its_next_statement(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    mine, _ = await tenant_with_card(database, app_pool, "gone")
    async with reader_of(database, mine) as name, connected(database.url_as(name)) as conn:
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.cards") == 1
        async with connected(database.owner_url) as owner:
            assert await readers.revoke_reader(owner, name) is True
        with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the group's SELECT went with the role
            await conn.fetchval("SELECT count(*) FROM card_mcp.cards")


# -- the analyst reads every tenant and does nothing else ---------------------------------------------------------


async def test_the_analyst_reads_every_tenant_but_cannot_write_lock_or_create(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    _, a = await tenant_with_card(database, app_pool, "an-a")
    _, b = await tenant_with_card(database, app_pool, "an-b")
    async with connected(database.url_as(db.ANALYST_ROLE)) as conn:
        assert (
            await conn.fetchval(
                "SELECT count(DISTINCT tenant_id) FROM card_mcp.cards WHERE tenant_id = ANY($1)", [a, b]
            )
            == 2
        )
        daily = "SELECT count(DISTINCT tenant_id) FROM card_mcp.usage_daily WHERE tenant_id = ANY($1)"
        assert await conn.fetchval(daily, [a, b]) == 2
        refused = [
            "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)"
            " VALUES ($1, 'voice', 'planted', '{}', repeat('0', 64))",
            "UPDATE card_mcp.cards SET title = 'x' WHERE tenant_id = $1",
            "DELETE FROM card_mcp.card_usage WHERE tenant_id = $1",
            "TRUNCATE card_mcp.card_usage",
            "INSERT INTO card_mcp.tenants (name) VALUES ('planted')",
            "LOCK TABLE card_mcp.cards",  # ACCESS EXCLUSIVE: every tenant's calls would wait
            "LOCK TABLE card_mcp.cards IN SHARE MODE",  # blocks every write
            "LOCK TABLE card_mcp.card_usage IN ROW EXCLUSIVE MODE",
            "SELECT * FROM card_mcp.cards FOR UPDATE",  # row locks stall updates
            "SELECT * FROM card_mcp.cards FOR KEY SHARE",
            "CREATE TABLE card_mcp.planted (x int)",
            "CREATE TABLE public.planted (x int)",
            "CREATE FUNCTION card_mcp.planted() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "CREATE VIEW card_mcp.planted AS SELECT 1",
            "SELECT * FROM card_mcp.api_keys",
            "SELECT * FROM card_mcp.idempotency_store",
            "SELECT * FROM card_mcp.notify_channels",
            "SELECT card_mcp.tenant_id_for('planted')",
            "SELECT * FROM card_mcp.create_tenant('planted')",
            "SELECT * FROM card_mcp.create_api_key('planted', NULL)",
            "SELECT card_mcp.revoke_api_key(gen_random_uuid())",
            "SELECT card_mcp.delete_expired_idempotency_keys()",
            "SELECT card_mcp.record_call_alone($1, 'x', 'ok', NULL, '{}', 1, 'x', NULL, 'stdio', NULL)",
        ]
        for statement in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():
                    await conn.execute(statement, *((a,) if "$1" in statement else ()))
        async with conn.transaction():  # what a SELECT takes anyway is all it may take
            await conn.execute("LOCK TABLE card_mcp.cards IN ACCESS SHARE MODE")


async def test_people_hear_no_key_revocation_and_cannot_learn_the_servers_channel(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant, _ = await tenant_with_card(database, app_pool, "chan")
    async with connected(database.admin_url) as admin:
        key_id, _ = await keys.create_key(admin, tenant, "revoked soon")
        channel = await admin.fetchval("SELECT channel FROM card_mcp.notify_channels WHERE purpose = 'api_keys'")
    heard: dict[str, list[str]] = {}
    markers, server_heard = anyio.Event(), anyio.Event()

    def hear(_conn: object, _pid: int, channel_name: str, payload: str) -> None:
        heard.setdefault(channel_name, []).append(payload)
        if len(heard.get("card_mcp_test_marker", [])) == 2:  # both people's sessions have it
            markers.set()
        if channel_name == channel:
            server_heard.set()

    async with (
        reader_of(database, tenant) as name,
        connected(database.url_as(db.ANALYST_ROLE)) as analyst,
        connected(database.url_as(name)) as reader,
        connected(database.admin_url) as server,
    ):
        for person in (analyst, reader):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await person.fetchval("SELECT channel FROM card_mcp.notify_channels")
            await person.add_listener("card_mcp_api_keys", hear)  # the channel before this issue, in the source
            await person.add_listener("card_mcp_test_marker", hear)
        await server.add_listener(channel, hear)
        async with connected(database.admin_url) as admin:
            await keys.revoke_key(admin, str(key_id))
            # Notifications arrive in commit order: once the marker sent after the revocation has arrived at
            # both, anything the revocation announced to them would have arrived before it.
            await admin.execute("NOTIFY card_mcp_test_marker, 'after'")
        with anyio.fail_after(30):  # a bound on a hang, not a timing assertion
            await markers.wait()
            await server_heard.wait()
    assert heard[channel] == [str(key_id)]  # the server hears it on the secret channel
    assert "card_mcp_api_keys" not in heard  # people, on the channel they can name, hear nothing


# -- the runtime admin role cannot become a tenant ----------------------------------------------------------------


async def test_the_runtime_admin_cannot_insert_a_key_row_unrevoke_or_replace_a_function(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant, tenant_id = await tenant_with_card(database, app_pool, "adm")
    async with connected(database.admin_url) as admin:
        await db._init_connection(admin)
        key_id, key = await keys.create_key(admin, tenant, "made by the function")
        assert await admin.fetchval("SELECT count(*) FROM card_mcp.api_key_lookup($1)", keys.key_hash(key)) == 1
        await keys.revoke_key(admin, str(key_id))
        refused = [
            (
                "INSERT INTO card_mcp.api_keys (tenant_id, prefix, key_hash, label)"
                " VALUES ($1, 'cmk_planted', sha256('chosen'), 'planted')",
                (tenant_id,),
            ),
            ("UPDATE card_mcp.api_keys SET revoked_at = NULL WHERE key_id = $1", (key_id,)),
            ("DELETE FROM card_mcp.api_keys WHERE key_id = $1", (key_id,)),
            ("INSERT INTO card_mcp.tenants (name) VALUES ($1)", (f"planted-{uuid.uuid4().hex[:8]}",)),
            ("UPDATE card_mcp.tenants SET name = name WHERE tenant_id = $1", (tenant_id,)),
            ("UPDATE card_mcp.cards SET title = 'x' WHERE tenant_id = $1", (tenant_id,)),
            ("DELETE FROM card_mcp.idempotency_store WHERE tenant_id = $1", (tenant_id,)),
            ("INSERT INTO card_mcp.readers (tenant_id, role_name) VALUES ($1, 'card_mcp_admin')", (tenant_id,)),
            (
                "CREATE OR REPLACE FUNCTION card_mcp.api_key_lookup(p_key_hash bytea)"
                " RETURNS TABLE (tenant_id uuid, key_id uuid) LANGUAGE sql SECURITY DEFINER"
                " AS 'SELECT NULL::uuid, NULL::uuid'",
                (),
            ),
            ("DROP FUNCTION card_mcp.revoke_api_key(uuid)", ()),
            ("ALTER FUNCTION card_mcp.create_api_key(text, text) OWNER TO card_mcp_admin", ()),
            ("ALTER FUNCTION card_mcp.create_api_key(text, text) SET search_path = public", ()),
            ("ALTER TABLE card_mcp.api_keys NO FORCE ROW LEVEL SECURITY", ()),
        ]
        for statement, arguments in refused:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with admin.transaction():
                    await admin.execute(statement, *arguments)
        async with admin.transaction():  # without grant option PostgreSQL only warns; nothing is granted
            await admin.execute("GRANT EXECUTE ON FUNCTION card_mcp.create_api_key(text, text) TO PUBLIC")
        assert not await admin.fetchval(
            "SELECT has_function_privilege('public', 'card_mcp.create_api_key(text, text)', 'EXECUTE')"
        )
        await keys.revoke_key(admin, str(key_id))  # revoking again keeps it revoked
        assert await admin.fetchval("SELECT count(*) FROM card_mcp.api_key_lookup($1)", keys.key_hash(key)) == 0


async def test_serve_refuses_an_owner_or_superuser_admin_connection(database: TestDatabase, settings: Settings) -> None:
    for url in (database.owner_url, superuser_here(database)):
        with pytest.raises(UnsafeRoleError):
            pool = await db.create_admin_pool(url, settings)
            await pool.close()
    with anyio.fail_after(60):
        result = await anyio.run_process(
            [CARD_MCP, "serve", "--transport", "http", "--port", "0"],
            env={
                "PATH": "/usr/bin:/bin",
                "CARD_MCP_DATABASE_URL": database.app_url,
                "CARD_MCP_ADMIN_DATABASE_URL": database.owner_url,
            },
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "refusing to serve: the admin role 'card_mcp_owner'" in result.stderr.decode()
    with anyio.fail_after(60):  # over stdio too, where the admin role maps --tenant to its id
        result = await anyio.run_process(
            [CARD_MCP, "serve", "--tenant", "refused"],
            env={
                "PATH": "/usr/bin:/bin",
                "CARD_MCP_DATABASE_URL": database.app_url,
                "CARD_MCP_ADMIN_DATABASE_URL": superuser_here(database),
            },
            check=False,
        )
    assert result.returncode == 1, result.stderr
    assert "refusing to serve: the admin role" in result.stderr.decode()
    assert result.stdout == b""  # stdout is the protocol's


# -- nobody a person can be changes the server's sessions ---------------------------------------------------------


async def test_no_role_a_person_holds_can_alter_the_server_roles_defaults(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant, _ = await tenant_with_card(database, app_pool, "defaults")
    async with reader_of(database, tenant) as name:
        for person in (db.ANALYST_ROLE, name):
            async with connected(database.url_as(person)) as conn:
                for statement in (
                    f"ALTER ROLE {db.APP_ROLE} SET default_transaction_read_only = on",
                    f"ALTER ROLE {db.ADMIN_ROLE} SET statement_timeout = 1",
                    f"ALTER ROLE {db.APP_ROLE} IN DATABASE {database.name} SET lock_timeout = 1",
                    f"ALTER DATABASE {database.name} SET default_transaction_read_only = on",
                    f"GRANT {db.APP_ROLE} TO {person}",
                    f"ALTER ROLE {person} CONNECTION LIMIT -1",
                ):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(statement)


async def test_a_read_only_default_on_the_application_role_does_not_stop_a_tenant_transaction(
    database: TestDatabase, settings: Settings, app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with connected(superuser_here(database)) as su:
        await su.execute(f"ALTER ROLE {db.APP_ROLE} IN DATABASE {database.name} SET default_transaction_read_only = on")
        try:
            pool = await db.create_pool(database.app_url, settings.model_copy(update={"pool_min_size": 1}))
            try:
                async with tenant_transaction(pool, tenant_a) as conn:
                    assert await conn.fetchval("SHOW default_transaction_read_only") == "on"
                    _, card = await cards.create_card(conn, tenant_a, new_card())
            finally:
                await pool.close()
        finally:
            await su.execute(
                f"ALTER ROLE {db.APP_ROLE} IN DATABASE {database.name} RESET default_transaction_read_only"
            )
    async with tenant_transaction(app_pool, tenant_a) as conn:
        assert (await cards.get_card(conn, card.id)).id == card.id


# -- the catalog: what each role may do, as docs/security.md lists it ----------------------------------------------

S, INS, U, D = "SELECT", "INSERT", "UPDATE", "DELETE"
PEOPLE_READ = {"tenants": {S}, "cards": {S}, "card_versions": {S}, "card_usage": {S}, "usage_daily": {S}}
PEOPLE_READ["usage_by_card"] = {S}
PEOPLE_READ["usage_by_client"] = {S}
PRIVILEGES = {
    db.APP_ROLE: {
        "schema_migrations": {S},
        "tenants": {S},
        "cards": {S, INS, U},
        "card_versions": {S, INS},  # versions are added (by trigger) and read, never changed
        "idempotency_store": {S, INS, U, D},
        "card_usage": {S, INS},
        "usage_daily": {S},
        "usage_by_card": {S},
        "usage_by_client": {S},
        "card_vectors": {S},
        "embedding_queue": {S, INS},
        "search_vocabulary": {S, INS},  # the words of the cards it writes (schema/0011_search_exact.sql)
        "search_postings": {S, INS, D},  # its cards' postings, kept as they are written (0014_search_postings.sql)
    },
    db.ADMIN_ROLE: {
        "schema_migrations": {S},
        "tenants": {S},
        "cards": {S},
        "card_versions": {S},  # retention only through card_mcp.prune_card_versions
        "idempotency_store": {S},
        "card_usage": {S},
        "api_keys": {S},
        "notify_channels": {S},
        "oauth_clients": {S},  # OAuth (schema/0008_oauth.sql): every write through the owner's functions
        "oauth_connections": {S},
        "usage_daily": {S},
        "usage_by_card": {S},
        "usage_by_client": {S},
        "card_vectors": {S, INS, U, D},
        "embedding_queue": {S, INS, U, D},
        "search_vocabulary": {S},
        "search_postings": {S},
    },
    db.ANALYST_ROLE: {**PEOPLE_READ, "tenant_erasures": {S}},  # who erased which tenant, when (0010)
    db.READER_GROUP: {**PEOPLE_READ, "readers": {S}},
}


async def test_every_roles_privileges_are_exactly_those_listed(database: TestDatabase) -> None:
    async with connected(database.owner_url) as conn:
        rows = await conn.fetch(
            """
            SELECT r.rolname, c.relname, p.privilege
              FROM pg_roles AS r
             CROSS JOIN pg_class AS c
             CROSS JOIN unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER'])
                        AS p(privilege)
             WHERE r.rolname = ANY($1) AND c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'v', 'p')
               AND has_table_privilege(r.oid, c.oid, p.privilege)
            """,
            list(PRIVILEGES),
        )
        roles = await conn.fetch(
            """
            SELECT r.rolname, r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolbypassrls OR r.rolreplication
                   AS powerful,
                   pg_has_role(r.oid, n.nspowner, 'MEMBER') AS member_of_owner,
                   EXISTS (SELECT FROM pg_class WHERE relowner = r.oid)
                   OR EXISTS (SELECT FROM pg_proc WHERE proowner = r.oid) AS owns
              FROM pg_roles AS r, pg_namespace AS n
             WHERE r.rolname = ANY($1) AND n.nspname = 'card_mcp'
            """,
            list(PRIVILEGES),
        )
        functions = await conn.fetch(
            """
            SELECT r.rolname, p.proname
              FROM pg_roles AS r CROSS JOIN pg_proc AS p
             WHERE r.rolname = ANY($1) AND p.pronamespace = 'card_mcp'::regnamespace
               AND p.prorettype <> 'trigger'::regtype
               AND NOT EXISTS (SELECT FROM pg_depend AS d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid
                                  AND d.deptype = 'e')  -- pg_trgm's, btree_gin's, vector's own functions
               AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
            """,
            [db.ANALYST_ROLE, db.READER_GROUP],
        )
        vectors = await conn.fetchval("SELECT to_regclass('card_mcp.card_vectors') IS NOT NULL")
    found: dict[str, dict[str, set[str]]] = {role: {} for role in PRIVILEGES}
    for row in rows:
        found[row["rolname"]].setdefault(row["relname"], set()).add(row["privilege"])
    for role, expected in PRIVILEGES.items():
        optional = set() if vectors else {"card_vectors", "embedding_queue"}  # 0006 needs pgvector
        assert found[role] == {t: p for t, p in expected.items() if t not in optional}, role
    for row in roles:
        assert not row["powerful"] and not row["member_of_owner"] and not row["owns"], row["rolname"]
    # People may call no function of card-mcp's own but the immutable join_words (used by a generated column).
    assert {row["proname"] for row in functions} <= {"join_words"}


# -- the readers commands and the URLs people get -----------------------------------------------------------------


async def cli(database: TestDatabase, *args: str, owner: bool = True) -> tuple[int, str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        **({"CARD_MCP_OWNER_DATABASE_URL": database.owner_url} if owner else {}),
    }
    with anyio.fail_after(60):
        done = await anyio.run_process([CARD_MCP, *args], env=env, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_readers_create_prints_a_password_once_lists_and_revokes(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant, tenant_id = await tenant_with_card(database, app_pool, "cli")
    name = f"r_{uuid.uuid4().hex[:16]}"
    try:
        code, out, err = await cli(database, "readers", "create", "--tenant", tenant, name)
        assert code == 0, err
        password = out.strip()
        assert len(password) >= 32 and "\n" not in password
        async with connected(superuser_here(database)) as su:
            stored = await su.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", name)
        # PostgreSQL kept the verifier card-mcp sent (it would have hashed anything else itself, with its own salt),
        # and the verifier is the password's: recomputed from its salt, it matches.
        salt = base64.b64decode(stored.split("$")[1].split(":")[1])
        assert stored == readers.scram_verifier(password, salt=salt)

        code, out, err = await cli(database, "readers", "list", "--format", "json")
        assert code == 0, err
        listed = [r for r in json.loads(out)["readers"] if r["reader"] == name]
        assert listed == [{"reader": name, "tenant": tenant, "created_at": listed[0]["created_at"], "can_login": True}]

        code, out, err = await cli(database, "db", "url", "--role", "reader", "--name", name)
        assert code == 0, err
        url = out.strip()
        assert urlsplit(url).username == name and urlsplit(url).password is None
        async with connected(database.url_as(name)) as conn:
            assert [r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM card_mcp.cards")] == [tenant_id]

        assert (await cli(database, "readers", "create", "--tenant", tenant, name))[0] == 1  # exists already
        assert (await cli(database, "readers", "revoke", name))[0] == 0
        assert (await cli(database, "readers", "revoke", name))[0] == 1  # no such reader any more
        async with connected(superuser_here(database)) as su:
            assert not await su.fetchval("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)", name)
    finally:
        async with connected(superuser_here(database)) as su:
            await su.execute(await su.fetchval("SELECT format('DROP ROLE IF EXISTS %I', $1::text)", name))


async def test_readers_commands_refuse_bad_names_unknown_tenants_and_a_missing_owner_url(
    database: TestDatabase,
) -> None:
    code, _, err = await cli(database, "readers", "create", "--tenant", "nobody-" + uuid.uuid4().hex, "r_nobody")
    assert code == 1 and len(err.strip().splitlines()) == 1
    for bad in ("card_mcp_app", "pg_x", "Robert", "a-b", "x" * 64):
        assert (await cli(database, "readers", "create", "--tenant", "default", bad))[0] == 1, bad
    code, _, err = await cli(database, "readers", "list", owner=False)
    assert code == 1 and "CARD_MCP_OWNER_DATABASE_URL" in err
    assert (await cli(database, "db", "url", "--role", "reader"))[0] == 2  # --name missing: bad usage
    assert (await cli(database, "db", "url", "--name", "r_x"))[0] == 2


async def test_db_url_gives_people_the_analyst_by_default_never_a_server_role(database: TestDatabase) -> None:
    code, out, err = await cli(database, "db", "url")
    assert code == 0, err
    assert urlsplit(out.strip()).username == db.ANALYST_ROLE
    async with connected(out.strip()) as conn:
        assert await conn.fetchval("SELECT current_user") == db.ANALYST_ROLE
