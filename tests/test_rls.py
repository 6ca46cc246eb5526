"""Row-level security: two tenants never see each other, no tenant sees nothing, and the catalog proves it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from card_mcp import cards, db, search
from card_mcp.db import APP_ROLE
from card_mcp.errors import NotFound
from tests.conftest import TestDatabase
from tests.helpers import tenant_transaction
from tests.test_cards import new_card


@asynccontextmanager
async def raw_tenant(pool: asyncpg.Pool, tenant: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """A tenant transaction that lets asyncpg's own errors through (as a hostile client would see them)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
        yield conn


# The tables the application role may read (api_keys it may not touch at all; see the test below).
TENANT_TABLES = ("tenants", "cards", "idempotency_store", "card_usage", "card_versions")
# Tables without tenant_id: the migrations ledger, and the secret name of the key-revocation channel (readable by
# the admin role only).
NOT_TENANT_TABLES = {"schema_migrations", "notify_channels"}
# Tables of what exists before any tenant is known (OAuth clients and pending sign-ins): forced RLS and a policy all
# the same. Citus: reference tables, like tenants and api_keys.
BEFORE_TENANT_TABLES = {"oauth_clients", "oauth_requests"}
# The audit of erased tenants outlives them, so it belongs to no tenant (no tenant_id: an erase deletes from every
# table that has one); forced RLS and a policy all the same. Citus: a local table of the coordinator.
AUDIT_TABLES = {"tenant_erasures"}
# Looked up before the tenant is known (readers: role name -> tenant; the rest by a secret's hash): reference tables
# too, where any unique index is fine.
REFERENCE_TABLES = (
    "card_mcp.tenants",
    "card_mcp.api_keys",
    "card_mcp.readers",
    "card_mcp.connect_codes",
    "card_mcp.oauth_connections",
    "card_mcp.oauth_codes",
    "card_mcp.oauth_tokens",
    "card_mcp.oauth_clients",
    "card_mcp.oauth_requests",
)


async def test_other_tenant_cannot_get_list_update_or_delete_a_card_through_the_functions(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID, tenant_b: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card())
    async with tenant_transaction(app_pool, tenant_b) as conn:
        with pytest.raises(NotFound):
            await cards.get_card(conn, card.id)
        with pytest.raises(NotFound):
            await cards.update_card(conn, card.id, title="stolen")
        with pytest.raises(NotFound):
            await cards.delete_card(conn, card.id)
        assert (await search.search_cards(conn, limit=50))[0] == []
    async with tenant_transaction(app_pool, tenant_a) as conn:
        assert await cards.get_card(conn, card.id) == card


async def test_other_tenant_cannot_touch_a_card_through_raw_sql_as_the_application_role(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID, tenant_b: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, card = await cards.create_card(conn, tenant_a, new_card())
    async with raw_tenant(app_pool, tenant_b) as conn:
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.cards WHERE id = $1", card.id) == 0
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.tenants WHERE tenant_id = $1", tenant_a) == 0
        assert await conn.execute("UPDATE card_mcp.cards SET title = 'stolen' WHERE id = $1", card.id) == "UPDATE 0"
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # the application role may not DELETE at all
        async with raw_tenant(app_pool, tenant_b) as conn:
            await conn.execute("DELETE FROM card_mcp.cards WHERE id = $1", card.id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # WITH CHECK: no row for another tenant
        async with raw_tenant(app_pool, tenant_b) as conn:
            await conn.execute(
                "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)"
                " VALUES ($1, 'voice', 'planted', '{}', repeat('0', 64))",
                tenant_a,
            )
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with raw_tenant(app_pool, tenant_b) as conn:
            await conn.execute(
                "INSERT INTO card_mcp.card_usage (tenant_id, tool, status, duration_ms, transport)"
                " VALUES ($1, 'get_card', 'ok', 1, 'stdio')",
                tenant_a,
            )
    async with tenant_transaction(app_pool, tenant_a) as conn:
        assert (await cards.get_card(conn, card.id)).title == card.title
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.cards") == 1


async def test_with_no_tenant_set_the_application_role_reads_nothing_and_cannot_write(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        await cards.create_card(conn, tenant_a, new_card())
    async with app_pool.acquire() as conn:
        for table in TENANT_TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM card_mcp.{table}") == 0, table  # noqa: S608 - fixed names
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(
                "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)"
                " VALUES ($1, 'voice', 't', '{}', repeat('0', 64))",
                tenant_a,
            )


async def test_a_pooled_connection_carries_no_tenant_into_its_next_use(
    database: TestDatabase, settings: object, tenant_a: uuid.UUID
) -> None:
    from card_mcp.config import Settings

    assert isinstance(settings, Settings)
    pool = await db.create_pool(database.app_url, settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 1}))
    try:
        async with tenant_transaction(pool, tenant_a) as conn:
            await cards.create_card(conn, tenant_a, new_card())
            first_pid = conn.get_server_pid()
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == first_pid  # the very same connection
            assert await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") in ("", None)
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.cards") == 0
    finally:
        await pool.close()


async def test_the_pool_connects_as_the_application_role_itself(app_pool: asyncpg.Pool) -> None:
    async with app_pool.acquire() as conn:
        row = await conn.fetchrow("SELECT session_user::text AS s, current_user::text AS c")
    assert row is not None and row["s"] == APP_ROLE and row["c"] == APP_ROLE


async def test_every_table_is_a_tenant_table_with_forced_rls_and_a_policy(database: TestDatabase) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        tables = await conn.fetch(
            """
            SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
                   EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id'
                             AND NOT a.attisdropped) AS has_tenant,
                   (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies,
                   c.relispartition AS partition,
                   array(SELECT a.grantee::regrole::text FROM aclexplode(c.relacl) AS a
                          WHERE a.grantee <> c.relowner) AS grantees
              FROM pg_class c
             WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p')
            """
        )
    finally:
        await conn.close()
    names = {row["relname"] for row in tables}
    assert set(TENANT_TABLES) <= names
    assert any(row["partition"] for row in tables), "card_usage has partitions to audit"
    for row in tables:
        if row["relname"] in NOT_TENANT_TABLES:
            continue
        assert row["has_tenant"] or row["relname"] in BEFORE_TENANT_TABLES | AUDIT_TABLES, row["relname"]
        assert row["relrowsecurity"] and row["relforcerowsecurity"], row["relname"]
        if row["partition"]:
            # Reached only through its parent, whose policies apply; reached directly, no role but the owner has
            # any privilege on it, and forced RLS without a policy shows the owner nothing either.
            assert row["grantees"] == [], row["relname"]
        else:
            assert row["policies"] >= 1, row["relname"]


async def test_no_role_but_the_owner_can_read_or_write_a_usage_partition_directly(
    database: TestDatabase, app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with tenant_transaction(app_pool, tenant_a) as conn:
        await conn.execute(
            "INSERT INTO card_mcp.card_usage (tenant_id, tool, status, duration_ms, transport)"
            " VALUES ($1, 'get_card', 'ok', 1, 'stdio')",
            tenant_a,
        )
    owner = await asyncpg.connect(database.owner_url)
    try:
        partitions = await owner.fetch(
            "SELECT c.oid::regclass::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'card_mcp.card_usage'::regclass"
        )
        today = await owner.fetchval(
            "SELECT tableoid::regclass::text FROM card_mcp.card_usage WHERE tenant_id = $1 LIMIT 1", tenant_a
        )
        assert today is not None and today.startswith("card_mcp.card_usage_p")  # through its own erase policy
        assert await owner.fetchval(f"SELECT count(*) FROM {today}") == 0  # noqa: S608 - a catalog name
    finally:
        await owner.close()
    assert len(partitions) > 7  # a week ahead and the default
    for role_url in (database.app_url, database.admin_url, database.url_as(db.ANALYST_ROLE)):
        conn = await asyncpg.connect(role_url)
        try:
            for partition in partitions:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.fetchval(f"SELECT count(*) FROM {partition['name']}")  # noqa: S608 - catalog names
        finally:
            await conn.close()


async def test_every_key_and_foreign_key_of_a_tenant_table_includes_tenant_id(database: TestDatabase) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        rows = await conn.fetch(
            """
            SELECT c.conrelid::regclass::text AS tbl, c.conname, c.contype,
                   bool_or(a.attname = 'tenant_id') AS has_tenant
              FROM pg_constraint c
              JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
             WHERE c.connamespace = 'card_mcp'::regnamespace AND c.contype IN ('p', 'u', 'f')
             GROUP BY 1, 2, 3
            """
        )
        unique_indexes = await conn.fetch(
            """
            SELECT i.indexrelid::regclass::text AS idx, i.indrelid::regclass::text AS tbl,
                   bool_or(a.attname = 'tenant_id') AS has_tenant
              FROM pg_index i
              JOIN pg_class t ON t.oid = i.indrelid
              JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE t.relnamespace = 'card_mcp'::regnamespace AND i.indisunique
             GROUP BY 1, 2
            """
        )
    finally:
        await conn.close()
    assert rows
    for row in rows:
        if row["tbl"].endswith(tuple(NOT_TENANT_TABLES | BEFORE_TENANT_TABLES | AUDIT_TABLES)):
            continue
        if row["conname"] == "oauth_connections_client_fkey":  # between reference tables: Citus allows it
            continue
        assert row["has_tenant"], f"{row['tbl']}.{row['conname']}"
    for row in unique_indexes:
        # tenants and api_keys become Citus reference tables (read before a tenant is known), where any unique
        # index is fine.
        if row["tbl"].endswith(tuple(NOT_TENANT_TABLES | AUDIT_TABLES)) or row["tbl"] in REFERENCE_TABLES:
            continue
        assert row["has_tenant"], row["idx"]


async def test_the_schema_stays_distributable_by_tenant_id(database: TestDatabase) -> None:
    """What Citus needs (docs/scale-out.md): every table with tenant_id is either distributed by it or a named
    reference table; a distributed table's foreign keys point to reference tables or include tenant_id on both
    sides (co-located), no reference table points into a distributed one, and a distributed table draws from no
    sequence but a bigint identity (Citus hands each node its own range: unique, not globally ordered, which no
    key or query here relies on)."""
    conn = await asyncpg.connect(database.owner_url)
    try:
        tables = {
            row["tbl"]
            for row in await conn.fetch(
                "SELECT c.oid::regclass::text AS tbl FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
                " WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p')"
                " AND NOT c.relispartition AND a.attname = 'tenant_id' AND NOT a.attisdropped"
            )
        }
        foreign_keys = await conn.fetch(
            """
            SELECT f.conname, f.conrelid::regclass::text AS child, f.confrelid::regclass::text AS parent,
                   EXISTS (SELECT FROM unnest(f.conkey, f.confkey) AS k(c, p)
                             JOIN pg_attribute ca ON ca.attrelid = f.conrelid AND ca.attnum = k.c
                             JOIN pg_attribute pa ON pa.attrelid = f.confrelid AND pa.attnum = k.p
                            WHERE ca.attname = 'tenant_id' AND pa.attname = 'tenant_id') AS by_tenant
              FROM pg_constraint f
             WHERE f.connamespace = 'card_mcp'::regnamespace AND f.contype = 'f' AND f.conparentid = 0
            """
        )
        sequences = await conn.fetch(
            """
            SELECT c.oid::regclass::text AS tbl, a.attname, a.attidentity <> '' AS attidentity,
                   format_type(a.atttypid, NULL) AS type,
                   coalesce(pg_get_expr(d.adbin, d.adrelid) LIKE '%nextval(%', false) AS nextval
              FROM pg_class c
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
              LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
             WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
            """
        )
    finally:
        await conn.close()
    distributed = tables - set(REFERENCE_TABLES)
    assert {"card_mcp.cards", "card_mcp.card_usage", "card_mcp.idempotency_store"} <= distributed
    for fk in foreign_keys:
        if fk["child"] in distributed and fk["parent"] in distributed:
            assert fk["by_tenant"], f"{fk['child']}.{fk['conname']}: not co-located by tenant_id"
        if fk["child"] in REFERENCE_TABLES:
            assert fk["parent"] not in distributed, f"{fk['child']}.{fk['conname']}: reference -> distributed"
    for column in sequences:
        if column["tbl"] in distributed and (column["attidentity"] or column["nextval"]):
            assert column["attidentity"] and column["type"] == "bigint", f"{column['tbl']}.{column['attname']}"


async def test_every_view_is_security_invoker_and_every_definer_function_has_a_search_path(
    database: TestDatabase,
) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        views = await conn.fetch(
            "SELECT relname, reloptions FROM pg_class WHERE relnamespace = 'card_mcp'::regnamespace AND relkind = 'v'"
        )
        definers = await conn.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = 'card_mcp'::regnamespace AND prosecdef"
        )
    finally:
        await conn.close()
    for view in views:
        assert "security_invoker=true" in (view["reloptions"] or []), view["relname"]
    assert definers, "the schema has SECURITY DEFINER functions to audit"
    for function in definers:
        assert any(c.startswith("search_path=") for c in function["proconfig"] or []), function["proname"]


# Every SECURITY DEFINER function, and exactly who may call it. A new one fails the audit until it is listed here
# (and in docs/security.md).
DEFINERS = {
    "tenant_id_for": {db.ADMIN_ROLE},
    "delete_expired_idempotency_keys": {db.ADMIN_ROLE},
    "api_key_lookup": {db.ADMIN_ROLE},
    "search_lexical": {db.APP_ROLE, db.ADMIN_ROLE},  # a lexical page, with the search indexes usable under RLS (0022)
    "search_typos": {db.APP_ROLE},  # which words look misspelt: reads the postings by index, as search_cards (0014)
    "create_tenant": {db.ADMIN_ROLE},
    "create_api_key": {db.ADMIN_ROLE},
    "revoke_api_key": {db.ADMIN_ROLE},
    "announce_api_key_change": set(),  # a trigger: fires without EXECUTE
    # Card history (schema/0009_card_history.sql): key labels for history entries; retention, for the server.
    "api_key_label": {db.APP_ROLE, db.ADMIN_ROLE},
    "prune_card_versions": {db.ADMIN_ROLE},
    # OAuth (schema/0008_oauth.sql): each step of a sign-in, for the running server; connect codes the owner's only.
    **{
        f"oauth_{step}": {db.ADMIN_ROLE}
        for step in (
            "register_client",
            "request_create",
            "request_get",
            "sign_in",
            "decide",
            "code_lookup",
            "refresh_lookup",
            "issue",
            "access_lookup",
            "revoke_token",
            "revoke_connection",
        )
    },
    "oauth_connect_code_create": set(),
    # Usage partitions (schema/0010_lifecycle.sql): the server keeps them ahead and prunes by retention.
    "usage_partitions_ensure": {db.ADMIN_ROLE},
    "usage_prune": {db.ADMIN_ROLE},
}


async def test_security_definer_functions_are_the_owners_with_a_fixed_search_path_and_listed_grantees(
    database: TestDatabase,
) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        rows = await conn.fetch(
            """
            SELECT p.proname, p.proowner::regrole::text AS owner, p.proconfig,
                   p.proowner = n.nspowner AS schema_owner,
                   has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
                   array(SELECT a.grantee::regrole::text FROM aclexplode(p.proacl) AS a
                          WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner) AS grantees
              FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
             WHERE n.nspname = 'card_mcp' AND p.prosecdef
            """
        )
    finally:
        await conn.close()
    assert {row["proname"] for row in rows} == set(DEFINERS)
    for row in rows:
        name = row["proname"]
        assert row["owner"] == db.OWNER_ROLE and row["schema_owner"], name  # never a role a server holds
        assert row["owner"] not in (db.APP_ROLE, db.ADMIN_ROLE, db.ANALYST_ROLE, db.READER_GROUP), name
        search_path = [c for c in row["proconfig"] or [] if c.startswith("search_path=")]
        assert len(search_path) == 1, name
        schemas = [part.strip() for part in search_path[0].removeprefix("search_path=").split(",")]
        assert schemas[0] == "pg_catalog" and schemas[-1] == "pg_temp", name  # pg_temp last: no temp shadowing
        assert set(schemas) <= {"pg_catalog", "card_mcp", "pg_temp"}, name  # nothing a person can create in
        assert not row["public_exec"], name
        assert set(row["grantees"]) == DEFINERS[name], name


async def test_the_application_role_owns_nothing_and_is_no_member_of_the_owner(
    database: TestDatabase,
) -> None:
    conn = await asyncpg.connect(database.owner_url)
    try:
        row = await conn.fetchrow(
            """
            SELECT r.rolsuper, r.rolbypassrls,
                   pg_has_role('card_mcp_app', 'card_mcp_owner', 'MEMBER') AS member_of_owner,
                   EXISTS (SELECT FROM pg_class WHERE relowner = r.oid) AS owns
              FROM pg_roles r WHERE r.rolname = 'card_mcp_app'
            """
        )
    finally:
        await conn.close()
    assert row is not None
    assert not any(row.values())


async def test_the_admin_role_sees_every_tenant_but_may_not_write_cards(
    app_pool: asyncpg.Pool, admin_conn: asyncpg.Connection, tenant_a: uuid.UUID, tenant_b: uuid.UUID
) -> None:
    for tenant in (tenant_a, tenant_b):
        async with tenant_transaction(app_pool, tenant) as conn:
            await cards.create_card(conn, tenant, new_card())
    seen = await admin_conn.fetchval(
        "SELECT count(DISTINCT tenant_id) FROM card_mcp.cards WHERE tenant_id = ANY($1)", [tenant_a, tenant_b]
    )
    assert seen == 2
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await admin_conn.execute("UPDATE card_mcp.cards SET title = 'x' WHERE tenant_id = $1", tenant_a)


async def test_the_application_role_cannot_map_tenant_names_to_ids_or_purge_keys(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with app_pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT card_mcp.tenant_id_for('default')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetchval("SELECT card_mcp.delete_expired_idempotency_keys()")


async def test_the_application_role_can_neither_read_api_keys_nor_look_one_up(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with app_pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM card_mcp.api_keys")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM card_mcp.api_key_lookup($1)", b"\0" * 32)
