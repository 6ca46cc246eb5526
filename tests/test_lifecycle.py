"""A tenant's data from arrival to erasure: export and import, `tenants delete`, and usage retention by partition."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from card_mcp import cards, db, keys, migrate, retention, transfer
from card_mcp.bootstrap import ROLES_SQL
from card_mcp.config import Settings
from card_mcp.models import NewCard, content_hash
from tests.conftest import TestDatabase, drop_database, new_database, with_user
from tests.helpers import superuser, tenant_transaction
from tests.test_http import CARD_MCP, HttpServer, mcp_client, name, refused_within, run_cli, server  # noqa: F401 - fixture

CARD_FIELDS = ("id", "card_type", "title", "content", "tags", "version", "content_hash", "created_at", "updated_at")


async def make_cards(pool: asyncpg.Pool, tenant: uuid.UUID, count: int, *, prefix: str = "card") -> list[uuid.UUID]:
    ids = []
    async with tenant_transaction(pool, tenant) as conn:
        for i in range(count):
            new = NewCard(
                card_type="voice", title=f"{prefix} {i}", content={"n": i, "text": f"é {prefix}"}, tags=["a", f"t{i}"]
            )
            ids.append((await cards.create_card(conn, tenant, new))[1].id)
    return ids


async def stored(database: TestDatabase, tenant: uuid.UUID) -> dict[uuid.UUID, dict[str, Any]]:
    """The tenant's cards as stored, every one, read past row-level security."""
    async with superuser(database) as conn:
        await db._init_connection(conn)
        rows = await conn.fetch(
            f"SELECT {', '.join(CARD_FIELDS)}, deleted_at FROM card_mcp.cards WHERE tenant_id = $1",  # noqa: S608
            tenant,
        )
    return {row["id"]: dict(row) for row in rows}


async def new_tenant(database: TestDatabase) -> tuple[str, uuid.UUID]:
    tenant = name()
    return tenant, await db.tenant_id_for(database.admin_url, tenant)


# -- export and import --------------------------------------------------------------------------------------------


async def test_export_then_import_into_a_fresh_tenant_gives_equal_cards_deleted_and_edited_ones_too(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    source, source_id = await new_tenant(database)
    ids = await make_cards(app_pool, source_id, 5)
    async with tenant_transaction(app_pool, source_id) as conn:
        await cards.update_card(conn, ids[0], title="edited", tags=["x"])
        await cards.delete_card(conn, ids[1])
    exported = run_cli(
        database, "export", "--tenant", source, "--include-deleted", "--output", str(tmp_path / "out.jsonl")
    )
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert (header["format"], header["version"], header["cards"]) == ("card-mcp-export", 2, 5)
    assert not (tmp_path / "out.jsonl.partial").exists()

    target, target_id = await new_tenant(database)
    imported = run_cli(database, "import", str(tmp_path / "out.jsonl"), "--tenant", target)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "created 5, existing 0 (of 5 cards in " + str(tmp_path / "out.jsonl") + ")"
    assert await stored(database, target_id) == await stored(database, source_id)
    assert (await stored(database, target_id))[ids[0]]["version"] == 2


async def test_an_export_and_its_import_keep_the_order_each_cards_keys_were_written_in(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """jsonb forgets it (shortest key first) and a card is embedded in it (schema/0023_key_order.sql): a tenant moved
    by export and import ranks as it did. A line written by hand keeps the order of its own text."""
    source, source_id = await new_tenant(database)
    content = {
        "summary": "Warm, direct.",
        "do": ["say we"],
        "dont": ["jargon"],
        "facts": {"tagline": "t", "founded": 9},
    }
    async with tenant_transaction(app_pool, source_id) as conn:
        await cards.create_card(conn, source_id, NewCard(card_type="voice", title="Voice", content=content, tags=[]))
    exported = run_cli(database, "export", "--tenant", source, "--output", str(tmp_path / "out.jsonl"))
    assert exported.returncode == 0, exported.stderr
    header, line = (json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines())
    written = [["summary"], ["do"], ["dont"], ["facts"], ["facts", "tagline"], ["facts", "founded"]]
    assert (header["version"], list(line["content"]), line["key_order"]) == (
        2,
        ["do", "dont", "facts", "summary"],
        written,
    )
    by_hand = tmp_path / "by_hand.jsonl"
    plain = {"card_type": "audience", "title": "Buyers", "content": {"who": "w", "wants": ["x"], "age": 3}, "tags": []}
    by_hand.write_text(json.dumps(plain) + "\n")

    target, target_id = await new_tenant(database)
    for path in (tmp_path / "out.jsonl", by_hand):
        imported = run_cli(database, "import", str(path), "--tenant", target)
        assert imported.returncode == 0, imported.stderr
    async with superuser(database) as conn:
        rows = await conn.fetch("SELECT title, key_order::text FROM card_mcp.cards WHERE tenant_id = $1", target_id)
    assert {row["title"]: json.loads(row["key_order"]) for row in rows} == {
        "Voice": written,
        "Buyers": [["who"], ["wants"], ["age"]],
    }


async def test_export_without_deleted_cards_leaves_them_out_and_writes_to_stdout(
    database: TestDatabase, app_pool: asyncpg.Pool
) -> None:
    tenant, tenant_id = await new_tenant(database)
    ids = await make_cards(app_pool, tenant_id, 3)
    async with tenant_transaction(app_pool, tenant_id) as conn:
        await cards.delete_card(conn, ids[2])
    exported = run_cli(database, "export", "--tenant", tenant)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert lines[0]["cards"] == 2 and {line["id"] for line in lines[1:]} == {str(i) for i in ids[:2]}
    assert "exporting cards" in exported.stderr  # progress on stderr


async def test_importing_the_same_file_twice_creates_nothing_the_second_time(
    database: TestDatabase, tmp_path: Path
) -> None:
    tenant, tenant_id = await new_tenant(database)
    plain = tmp_path / "plain.jsonl"
    rows = [{"card_type": "company", "title": f"t{i}", "content": {"i": i}, "tags": ["x"]} for i in range(7)]
    rows.append(dict(rows[0], title="same content as the first"))  # dedup as create_card: the same card
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = run_cli(database, "import", str(plain), "--tenant", tenant)
    second = run_cli(database, "import", str(plain), "--tenant", tenant)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.startswith("created 7, existing 1 ")
    assert second.stdout.startswith("created 0, existing 8 ")
    assert len(await stored(database, tenant_id)) == 7


async def test_a_file_with_bad_lines_in_the_middle_writes_nothing_and_names_every_line(
    database: TestDatabase, tmp_path: Path
) -> None:
    tenant, tenant_id = await new_tenant(database)
    good = {"card_type": "voice", "title": "fine", "content": {"a": 1}}
    lines = [
        json.dumps(good),
        json.dumps(dict(good, title="also fine")),
        json.dumps(dict(good, card_type="poem")),  # line 3
        "{not json",  # line 4
        json.dumps(dict(good, title="ok", content_hash="0" * 64)),  # line 5: a hash that is not the content's
        json.dumps(dict(good, title="order", key_order=[[]])),  # line 6: a key's path with no key
        json.dumps(dict(good, title="long", key_order=[["k" * 9000], ["k" * 9000]])),  # line 7: over 16 KiB of paths
        json.dumps(dict(good, title="nul", key_order=[["a\x00"]])),  # line 8: a key PostgreSQL cannot store
        json.dumps(dict(good, title="last")),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(database, "import", str(path), "--tenant", tenant)
    assert result.returncode == 1 and result.stdout == ""
    assert [f"line {n}:" in result.stderr for n in (3, 4, 5, 6, 7, 8)] == [True] * 6
    assert "line 1:" not in result.stderr and "line 9:" not in result.stderr
    assert "nothing was imported" in result.stderr
    assert await stored(database, tenant_id) == {}


async def test_an_import_interrupted_midway_and_run_again_leaves_each_card_once(
    database: TestDatabase, tmp_path: Path
) -> None:
    _, tenant_id = await new_tenant(database)
    path = tmp_path / "many.jsonl"
    path.write_text(
        "".join(json.dumps({"card_type": "insight", "title": f"c{i}", "content": {"i": i}}) + "\n" for i in range(25))
    )

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise KeyboardInterrupt  # as Ctrl-C between two chunks

    conn = await db.connect(database.app_url)
    try:
        with pytest.raises(KeyboardInterrupt):
            await transfer.import_cards(conn, tenant_id, path, chunk=10, progress=stop_after_first_chunk)
        assert len(await stored(database, tenant_id)) == 10
        report = await transfer.import_cards(conn, tenant_id, path, chunk=10)
    finally:
        await conn.close()
    assert (report.created, report.existing) == (15, 10)
    titles = sorted(card["title"] for card in (await stored(database, tenant_id)).values())
    assert titles == sorted(f"c{i}" for i in range(25))


async def test_import_into_a_tenant_that_does_not_exist_is_refused(database: TestDatabase, tmp_path: Path) -> None:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"card_type": "voice", "title": "t", "content": {}}) + "\n")
    result = run_cli(database, "import", str(path), "--tenant", "no-such-tenant-here")
    assert result.returncode == 1 and "no tenant" in result.stderr


# -- tenants delete -------------------------------------------------------------------------------------------------


async def tenant_rows(database: TestDatabase, tenant: uuid.UUID) -> dict[str, int]:
    """Rows of ``tenant`` in every table with a tenant_id column, found from the catalog (so no table is missed)."""
    async with superuser(database) as conn:
        tables = await conn.fetch(
            "SELECT c.oid::regclass::text AS t FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
            " WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
            " AND a.attname = 'tenant_id' AND NOT a.attisdropped"
        )
        return {
            row["t"]: await conn.fetchval(f"SELECT count(*) FROM {row['t']} WHERE tenant_id = $1", tenant)  # noqa: S608
            for row in tables
        }


async def populate(database: TestDatabase, app_pool: asyncpg.Pool, tenant: str, tenant_id: uuid.UUID) -> str:
    """A card, usage rows, an idempotency entry, an API key and a reader: a row in most tenant tables."""
    await make_cards(app_pool, tenant_id, 2, prefix=tenant)
    async with tenant_transaction(app_pool, tenant_id) as conn:
        await conn.execute(
            "INSERT INTO card_mcp.idempotency_store (tenant_id, idempotency_key, tool, request_hash, response,"
            " expires_at) VALUES ($1, 'k', 'batch_create_cards', 'h', '{}', now() + interval '1 day')",
            tenant_id,
        )
    admin = await db.connect(database.admin_url)
    try:
        _, key = await keys.create_key(admin, tenant, "erase test")
    finally:
        await admin.close()
    reader = f"r_{uuid.uuid4().hex[:10]}"
    assert run_cli(database, "readers", "create", "--tenant", tenant, "--no-password", reader).returncode == 0
    return key


async def test_tenants_delete_leaves_no_row_of_the_tenant_in_any_table_and_other_tenants_untouched(
    database: TestDatabase,
    app_pool: asyncpg.Pool,
    server: HttpServer,  # noqa: F811 - the fixture
) -> None:
    doomed, doomed_id = await new_tenant(database)
    kept, kept_id = await new_tenant(database)
    key = await populate(database, app_pool, doomed, doomed_id)
    await populate(database, app_pool, kept, kept_id)
    async with mcp_client(server.url, key) as client:
        await client.call_tool("search_cards", {})  # the key works, and the server has it in its cache
        before = await tenant_rows(database, doomed_id)
        kept_before = await tenant_rows(database, kept_id)
        assert all(before[t] > 0 for t in ("card_mcp.cards", "card_mcp.card_usage", "card_mcp.api_keys"))

        result = run_cli(database, "tenants", "delete", doomed, "--yes", "--format", "json")
        assert result.returncode == 0, result.stderr
        await refused_within(server.url, key, seconds=5)
    removed = {row["table"]: row["rows_removed"] for row in json.loads(result.stdout)["removed"]}
    assert list(removed)[-1] == "tenants"
    assert {f"card_mcp.{t}": n for t, n in removed.items() if n} == {t: n for t, n in before.items() if n}
    assert set(removed.values()) >= {1} and "reader role" in result.stderr
    assert set((await tenant_rows(database, doomed_id)).values()) == {0}
    assert await tenant_rows(database, kept_id) == kept_before
    async with superuser(database) as conn:
        audit = await conn.fetchrow("SELECT * FROM card_mcp.tenant_erasures WHERE erased_tenant = $1", doomed_id)
    assert audit is not None and audit["tenant_name"] == doomed and audit["erased_by"] == db.OWNER_ROLE
    assert json.loads(audit["removed"])["cards"] == 2


def typed(database: TestDatabase, line: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``card-mcp ARGS`` with ``line`` typed on its standard input."""
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_OWNER_DATABASE_URL": database.owner_url,
    }
    return subprocess.run(
        [CARD_MCP, *args], input=line + "\n", env=env, capture_output=True, text=True, timeout=60, check=False
    )


async def test_tenants_delete_erases_nothing_unless_the_name_is_typed(database: TestDatabase) -> None:
    tenant, tenant_id = await new_tenant(database)
    wrong = typed(database, "other", "tenants", "delete", tenant)
    assert wrong.returncode == 1 and "nothing was erased" in wrong.stderr
    assert (await tenant_rows(database, tenant_id))["card_mcp.tenants"] == 1
    right = typed(database, tenant, "tenants", "delete", tenant)
    assert right.returncode == 0, right.stderr
    assert (await tenant_rows(database, tenant_id))["card_mcp.tenants"] == 0
    missing = run_cli(database, "tenants", "delete", tenant, "--yes")
    assert missing.returncode == 1 and "no tenant" in missing.stderr


async def test_tenants_delete_erases_a_tenant_table_added_after_it_was_written(superuser_url: str) -> None:
    """A migration of tomorrow adds a table with tenant_id and forgets the erase: the erase still finds it."""
    async with new_database(superuser_url, "card_mcp_erase") as database:
        tenant = await db.tenant_id_for(database.admin_url, "leaving")
        owner = await asyncpg.connect(database.owner_url)
        try:
            await owner.execute(
                "CREATE TABLE card_mcp.future_notes (tenant_id uuid NOT NULL REFERENCES card_mcp.tenants,"
                " note text NOT NULL, PRIMARY KEY (tenant_id, note));"
                " ALTER TABLE card_mcp.future_notes ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY"
            )
        finally:
            await owner.close()
        async with superuser(database) as conn:
            await conn.execute("INSERT INTO card_mcp.future_notes VALUES ($1, 'kept?')", tenant)
        result = run_cli(database, "tenants", "delete", "leaving", "--yes", "--format", "json")
        assert result.returncode == 0, result.stderr
        removed = {row["table"]: row["rows_removed"] for row in json.loads(result.stdout)["removed"]}
        assert removed["future_notes"] == 1
        assert set((await tenant_rows(database, tenant)).values()) == {0}


# -- usage partitions and retention ---------------------------------------------------------------------------------


def midnight(days_ago: int) -> datetime:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=days_ago)


async def insert_usage(conn: asyncpg.Connection, tenant: uuid.UUID, moments: list[datetime]) -> None:
    await conn.executemany(
        "INSERT INTO card_mcp.card_usage (tenant_id, tool, status, duration_ms, transport, called_at)"
        " VALUES ($1, 'get_card', 'ok', 1, 'stdio', $2)",
        [(tenant, moment) for moment in moments],
    )


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'card_mcp.card_usage'::regclass"
    )
    return {row["relname"] for row in rows}


async def test_retention_drops_only_the_partitions_wholly_before_the_cut_off(superuser_url: str) -> None:
    async with new_database(superuser_url, "card_mcp_retention") as database:
        tenant = await db.tenant_id_for(database.admin_url, "retained")
        day = [midnight(n) for n in (400, 399, 398)]
        async with superuser(database) as conn:
            # Days long before any partition: the rows land in the default partition (an insert never fails).
            await insert_usage(conn, tenant, [day[0] + timedelta(seconds=1), day[1] + timedelta(hours=12), day[2]])
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.card_usage_default") == 3
        admin = await db.connect(database.admin_url)
        try:
            made = await retention.ensure_partitions(admin)  # moves them into their days' partitions
            cut = day[1] + timedelta(hours=6)  # in the middle of the second day
            dropped = await retention.prune(admin, cut)
        finally:
            await admin.close()
        names = [f"card_usage_p{d:%Y%m%d}" for d in day]
        assert set(names) <= set(made)
        assert [d.partition for d in dropped] == [names[0]]  # the day that straddles the cut-off stays whole
        async with superuser(database) as conn:
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.card_usage_default") == 0
            left = sorted(r["called_at"] for r in await conn.fetch("SELECT called_at FROM card_mcp.card_usage"))
            assert left == [day[1] + timedelta(hours=12), day[2]]
            remaining = await partitions(conn)
        assert names[0] not in remaining and {names[1], names[2]} <= remaining


async def test_partitions_stay_a_week_ahead_and_the_server_turn_applies_the_retention(superuser_url: str) -> None:
    async with new_database(superuser_url, "card_mcp_retention") as database:
        async with superuser(database) as conn:
            ahead = {f"card_usage_p{midnight(-n):%Y%m%d}" for n in range(8)}
            assert ahead <= await partitions(conn)  # made by migrate
            tenant = await db.tenant_id_for(database.admin_url, "old")
            await insert_usage(conn, tenant, [midnight(100), midnight(20)])
        await retention.maintain(database.admin_url, None)  # no retention: keeps everything
        async with superuser(database) as conn:
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.card_usage") == 2
        await retention.maintain(database.admin_url, 30)
        async with superuser(database) as conn:
            assert [r["called_at"] for r in await conn.fetch("SELECT called_at FROM card_mcp.card_usage")] == [
                midnight(20)
            ]
        result = run_cli(database, "usage", "prune", "--before", f"{midnight(10):%Y-%m-%d}")
        assert result.returncode == 0, result.stderr
        assert f"card_usage_p{midnight(20):%Y%m%d}" in result.stdout
        async with superuser(database) as conn:
            assert await conn.fetchval("SELECT count(*) FROM card_mcp.card_usage") == 0
        assert run_cli(database, "usage", "prune").returncode == 1  # no --before and no retention set


async def test_the_migration_keeps_every_usage_row_and_its_id_and_new_ids_go_on(superuser_url: str) -> None:
    name = f"card_mcp_premigration_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(ROLES_SQL)
        await conn.execute(f'CREATE DATABASE "{name}" OWNER card_mcp_owner')
    finally:
        await conn.close()
    try:
        owner = await db.connect(with_user(superuser_url, db.OWNER_ROLE, name))
        try:
            before = [m for m in migrate.load_migrations() if m.version < "0010" and not m.requires]
            await migrate.migrate(owner, before)
            su = await asyncpg.connect(with_user(superuser_url, "postgres", name))
            try:
                tenant = await su.fetchval("INSERT INTO card_mcp.tenants (name) VALUES ('old') RETURNING tenant_id")
                moments = [midnight(70) + timedelta(hours=3), midnight(2), datetime.now(UTC)]
                await insert_usage(su, tenant, moments)
                old = {r["usage_id"]: r["called_at"] for r in await su.fetch("SELECT * FROM card_mcp.card_usage")}
                await migrate.migrate(owner)
                new = {r["usage_id"]: r["called_at"] for r in await su.fetch("SELECT * FROM card_mcp.card_usage")}
                assert new == old
                assert await su.fetchval("SELECT count(*) FROM card_mcp.card_usage_default") == 0
                assert (
                    await su.fetchval("SELECT relkind FROM pg_class WHERE oid = 'card_mcp.card_usage'::regclass")
                    == b"p"
                )
                await insert_usage(su, tenant, [datetime.now(UTC)])
                assert await su.fetchval("SELECT max(usage_id) FROM card_mcp.card_usage") == max(old) + 1
                month = f"card_usage_m{midnight(70):%Y%m}"
                assert month in await partitions(su) or midnight(70).month == datetime.now(UTC).month
            finally:
                await su.close()
        finally:
            await owner.close()
    finally:
        await drop_database(superuser_url, name)


def test_settings_read_the_retention_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARD_MCP_USAGE_RETENTION_DAYS", "90")
    assert Settings().usage_retention_days == 90
    monkeypatch.delenv("CARD_MCP_USAGE_RETENTION_DAYS")
    assert Settings().usage_retention_days is None


# -- card history (schema/0009, issue #21) --------------------------------------------------------------------------


async def versions(database: TestDatabase, tenant: uuid.UUID) -> dict[uuid.UUID, list[tuple[Any, ...]]]:
    async with superuser(database) as conn:
        rows = await conn.fetch(
            "SELECT card_id, version, title, tags, content_hash, is_active FROM card_mcp.card_versions"
            " WHERE tenant_id = $1 ORDER BY card_id, version",
            tenant,
        )
    found: dict[uuid.UUID, list[tuple[Any, ...]]] = {}
    for row in rows:
        found.setdefault(row["card_id"], []).append(tuple(row)[1:])
    return found


async def test_export_with_history_then_import_gives_equal_versions(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    source, source_id = await new_tenant(database)
    ids = await make_cards(app_pool, source_id, 3)
    async with tenant_transaction(app_pool, source_id) as conn:
        await cards.update_card(conn, ids[0], title="second")
        await cards.update_card(conn, ids[0], tags=["third"])
    out = tmp_path / "history.jsonl"
    exported = run_cli(database, "export", "--tenant", source, "--include-history", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert {line["id"]: len(line["versions"]) for line in lines[1:]}[str(ids[0])] == 3
    target, target_id = await new_tenant(database)
    imported = run_cli(database, "import", str(out), "--tenant", target)
    assert imported.returncode == 0, imported.stderr
    assert await versions(database, target_id) == await versions(database, source_id)
    again = run_cli(database, "import", str(out), "--tenant", target)
    assert again.stdout.startswith("created 0, existing 3 ")
    assert await versions(database, target_id) == await versions(database, source_id)


# Content PostgreSQL stores and Python reads only in part (jsonb.LossyContent): nested deeper than its parser goes, and
# an integer longer than it converts.
UNREADABLE_CONTENTS = ('{"a": ' + "[" * 3000 + "]" * 3000 + "}", '{"n": ' + "7" * 5000 + "}")


async def test_export_writes_stored_content_python_cannot_read_exactly_and_import_names_its_lines(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tenant, tenant_id = await new_tenant(database)
    ids = await make_cards(app_pool, tenant_id, 3)
    async with superuser(database) as conn:  # written by something other than the tools, as PostgreSQL allows
        for card_id, content in zip(ids[1:], UNREADABLE_CONTENTS, strict=True):
            await conn.execute(
                "UPDATE card_mcp.cards SET content = $1::text::jsonb, version = version + 1 WHERE id = $2",
                content,
                card_id,
            )
    out = tmp_path / "out.jsonl"
    exported = run_cli(database, "export", "--tenant", tenant, "--include-history", "--output", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 4
    async with superuser(database) as conn:
        for line in lines[1:]:  # each card's content and versions as stored, compared by PostgreSQL
            same = await conn.fetchval(
                "SELECT c.content = ($1::text::jsonb -> 'content')"
                "   AND (SELECT jsonb_agg(v.content ORDER BY v.version) FROM card_mcp.card_versions AS v"
                "         WHERE v.tenant_id = c.tenant_id AND v.card_id = c.id)"
                "       = (SELECT jsonb_agg(e -> 'content') FROM jsonb_array_elements($1::text::jsonb -> 'versions') e)"
                "  FROM card_mcp.cards AS c WHERE c.tenant_id = $2 AND c.id = ($1::text::jsonb ->> 'id')::uuid",
                line,
                tenant_id,
            )
            assert same is True
    target, target_id = await new_tenant(database)
    imported = run_cli(database, "import", str(out), "--tenant", target)
    assert imported.returncode == 1 and "unexpected" not in imported.stderr
    unreadable = sorted(lines.index(line) + 1 for line in lines if any(str(i) in line for i in ids[1:]))
    assert [f"line {n}:" in imported.stderr for n in unreadable] == [True, True]
    assert await stored(database, target_id) == {}


async def test_an_import_refuses_a_version_whose_content_does_not_match_its_content_hash(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """Restoring a version writes its content and content_hash as they are: a version changed in the file would give
    an active card a hash of other content, and create_card's dedup would then let its content be saved twice."""
    source, source_id = await new_tenant(database)
    ids = await make_cards(app_pool, source_id, 1)
    async with tenant_transaction(app_pool, source_id) as conn:
        await cards.update_card(conn, ids[0], content={"second": True})
    out = tmp_path / "history.jsonl"
    assert run_cli(database, "export", "--tenant", source, "--include-history", "--output", str(out)).returncode == 0
    header, line = out.read_text().splitlines()
    card = json.loads(line)
    card["versions"][0]["content"] = {"changed": "in the file"}  # its content_hash left as it was
    out.write_text(header + "\n" + json.dumps(card) + "\n")
    target, target_id = await new_tenant(database)
    imported = run_cli(database, "import", str(out), "--tenant", target)
    assert imported.returncode == 1
    assert "line 2: " in imported.stderr and "content_hash" in imported.stderr
    assert await stored(database, target_id) == {}


async def test_the_admin_role_cannot_prune_the_usage_of_today_or_of_the_days_ahead(superuser_url: str) -> None:
    """usage_prune runs as the owner for the admin role, which may delete no usage row itself: a cut-off in the future
    (a bug, or whoever holds the server's admin URL) must not drop today's calls or the partitions made ahead."""
    async with new_database(superuser_url, "card_mcp_prune_floor") as database:
        tenant = await db.tenant_id_for(database.admin_url, "kept")
        calls = [datetime.now(UTC), midnight(-2) + timedelta(hours=1)]  # one now, one two days ahead
        async with superuser(database) as conn:
            await insert_usage(conn, tenant, calls)
            ahead = {name for name in await partitions(conn) if name >= f"card_usage_p{midnight(0):%Y%m%d}"}
        admin = await db.connect(database.admin_url)
        try:
            dropped = await retention.prune(admin, datetime.now(UTC) + timedelta(days=30))
        finally:
            await admin.close()
        async with superuser(database) as conn:
            left = sorted(r["called_at"] for r in await conn.fetch("SELECT called_at FROM card_mcp.card_usage"))
            remaining = await partitions(conn)
    assert all(d.range_to <= midnight(0) for d in dropped)
    assert left == calls
    assert len(ahead) == 8 and ahead <= remaining


async def test_an_import_refuses_versions_after_the_cards_own_version_which_would_block_its_next_change(
    database: TestDatabase, app_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """A card's next change is written as version + 1: a kept version already there refused every update and delete
    of the card (reported as duplicate_content or internal), so such a line is invalid, as a changed hash is."""
    source, source_id = await new_tenant(database)
    out = tmp_path / "history.jsonl"
    await make_cards(app_pool, source_id, 1)
    assert run_cli(database, "export", "--tenant", source, "--include-history", "--output", str(out)).returncode == 0
    header, line = out.read_text().splitlines()
    card = json.loads(line)
    card["versions"].append(dict(card["versions"][0], version=2, title="From the future"))
    out.write_text(header + "\n" + json.dumps(card) + "\n")
    target, target_id = await new_tenant(database)
    imported = run_cli(database, "import", str(out), "--tenant", target)
    assert imported.returncode == 1
    assert "line 2: " in imported.stderr and "version 2" in imported.stderr
    assert await stored(database, target_id) == {}


async def test_an_import_refuses_a_card_id_given_on_two_lines(database: TestDatabase, tmp_path: Path) -> None:
    """The second line of an id was counted as existing, yet its versions went into the first line's card's history
    (a version 2 the card never had, holding the other line's content), so the card's next change then collided."""
    card_id = str(uuid.uuid4())

    def line(title: str, content: dict[str, Any], version: int) -> dict[str, Any]:
        kept = [
            {
                "version": n,
                "op": "create" if n == 1 else "update",
                "card_type": "voice",
                "title": title,
                "content": content,
                "tags": [],
                "content_hash": content_hash(content),
                "is_active": True,
                "changed_at": "2026-01-01T00:00:00+00:00",
                "transport": "stdio",
            }
            for n in range(1, version + 1)
        ]
        return {
            "id": card_id,
            "card_type": "voice",
            "title": title,
            "content": content,
            "tags": [],
            "version": version,
            "versions": kept,
        }

    path = tmp_path / "twice.jsonl"
    path.write_text(json.dumps(line("First", {"a": 1}, 1)) + "\n" + json.dumps(line("Second", {"b": 2}, 2)) + "\n")
    tenant, tenant_id = await new_tenant(database)
    imported = run_cli(database, "import", str(path), "--tenant", tenant)
    assert imported.returncode == 1
    assert "line 2: " in imported.stderr and "line 1" in imported.stderr
    assert await stored(database, tenant_id) == {}


async def test_a_file_that_is_not_utf8_or_an_output_that_cannot_be_written_is_one_line_naming_it(
    database: TestDatabase, tmp_path: Path
) -> None:
    """User errors, told as such: not 'please report it' (a bug), nor 'the card store is unreachable' (retry)."""
    tenant, tenant_id = await new_tenant(database)
    latin1 = tmp_path / "latin1.jsonl"
    good = json.dumps({"card_type": "voice", "title": "Fine", "content": {}, "tags": []})
    latin1.write_bytes((good + "\n").encode() + '{"card_type":"voice","title":"Café","content":{}}\n'.encode("latin-1"))
    imported = run_cli(database, "import", str(latin1), "--tenant", tenant)
    assert imported.returncode == 1
    assert "line 2: " in imported.stderr and "UTF-8" in imported.stderr and "report" not in imported.stderr
    assert await stored(database, tenant_id) == {}
    nowhere = tmp_path / "no" / "such" / "folder" / "out.jsonl"
    exported = run_cli(database, "export", "--tenant", tenant, "--output", str(nowhere))
    assert exported.returncode == 1 and "unreachable" not in exported.stderr
    assert str(nowhere) in exported.stderr and len(exported.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("before", ["99999999999d", "1000000d"])
def test_usage_prune_with_a_cut_off_beyond_the_calendar_is_a_one_line_user_error(
    database: TestDatabase, before: str
) -> None:
    result = run_cli(database, "usage", "prune", "--before", before)
    assert result.returncode == 1 and "report" not in result.stderr and before in result.stderr
