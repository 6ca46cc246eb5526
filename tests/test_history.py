"""Card history and restore: every change kept as a version with who made it, read by get_card_history, the
card://{card_id}/history resource and `card-mcp history`, and undone by restore_card."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp import Client, MCPError
from mcp.types import EmbeddedResource, TextResourceContents

from card_mcp import cards, db, history
from card_mcp.config import Settings
from card_mcp.errors import NotFound
from tests.conftest import TestDatabase
from tests.helpers import CARD, connect, create, error_code, ok, superuser, tenant_transaction, usage_rows
from tests.test_cards import new_card
from tests.test_http import http_server, mcp_client, new_key, run_cli


def tenant_name() -> str:
    return f"hist-{uuid.uuid4().hex[:10]}"


async def versions_of(client: Client, card_id: str, **arguments: Any) -> list[dict[str, Any]]:
    """Every version of the card, newest first, page by page."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = ok(await client.call_tool("get_card_history", {"card_id": card_id, "cursor": cursor, **arguments}))
        found += page["versions"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found


async def version_rows(database: TestDatabase, card_id: str) -> int:
    conn = await db.connect(database.admin_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM card_mcp.card_versions WHERE card_id = $1", uuid.UUID(card_id)
        )
        return count
    finally:
        await conn.close()


async def test_a_card_created_updated_three_times_by_two_clients_deleted_and_restored_has_exactly_that_history(
    database: TestDatabase, settings: Settings
) -> None:
    tenant = tenant_name()
    async with connect(settings, tenant, "writer-a") as a, connect(settings, tenant, "writer-b") as b:
        card = await create(a)
        ok(await b.call_tool("update_card", {"card_id": card["id"], "title": "Voice, sharper"}))
        ok(await a.call_tool("update_card", {"card_id": card["id"], "content": {"tone": "dry"}, "tags": ["x"]}))
        ok(await b.call_tool("update_card", {"card_id": card["id"], "tags": []}))
        ok(await a.call_tool("delete_card", {"card_id": card["id"]}))
        restored = ok(await b.call_tool("restore_card", {"card_id": card["id"]}))["card"]
        versions = await versions_of(a, card["id"], limit=2)
    assert restored["version"] == 6 and restored["title"] == "Voice, sharper" and restored["tags"] == []
    assert [(v["version"], v["op"], v["changed_by"]["client_name"], v["changed_fields"]) for v in versions] == [
        (6, "restore", "writer-b", []),
        (5, "delete", "writer-a", []),
        (4, "update", "writer-b", ["tags"]),
        (3, "update", "writer-a", ["content", "tags"]),
        (2, "update", "writer-b", ["title"]),
        (1, "create", "writer-a", ["title", "content", "tags"]),
    ]
    for v in versions:
        assert v["changed_by"] == {
            "transport": "stdio",
            "api_key_id": None,
            "api_key_label": None,
            "connection_id": None,
            "client_name": v["changed_by"]["client_name"],
            "client_version": "1.2.3",
        }
    assert (versions[3]["title"], versions[3]["content"], versions[3]["tags"]) == (
        "Voice, sharper",
        {"tone": "dry"},
        ["x"],
    )
    assert versions[-1]["content"] == CARD["content"] and versions[-1]["content_hash"] == card["content_hash"]
    assert [v["changed_at"] for v in versions] == sorted((v["changed_at"] for v in versions), reverse=True)


async def test_restore_to_version_2_makes_version_6_equal_to_version_2(settings: Settings) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client)
        ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Two", "tags": ["two"]}))
        ok(await client.call_tool("update_card", {"card_id": card["id"], "content": {"three": 3}}))
        ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Four"}))
        ok(await client.call_tool("delete_card", {"card_id": card["id"]}))
        arguments = {"card_id": card["id"], "version": 2, "expected_version": 5}
        restored = ok(await client.call_tool("restore_card", arguments))["card"]
        again = ok(await client.call_tool("restore_card", arguments))["card"]  # a replay: nothing more
        read = ok(await client.call_tool("get_card", {"card_id": card["id"]}))["card"]
        versions = await versions_of(client, card["id"])
    two = next(v for v in versions if v["version"] == 2)
    six = versions[0]
    assert restored["version"] == 6 and again == restored == read
    assert (six["title"], six["content"], six["tags"], six["content_hash"]) == (
        two["title"],
        two["content"],
        two["tags"],
        two["content_hash"],
    )
    assert (six["op"], six["changed_fields"]) == ("restore", ["title", "content"])
    assert len(versions) == 6


async def test_restore_refuses_a_stale_expected_version_and_a_version_that_does_not_exist(settings: Settings) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client)
        ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Two"}))
        stale = await client.call_tool("restore_card", {"card_id": card["id"], "version": 1, "expected_version": 1})
        missing = await client.call_tool("restore_card", {"card_id": card["id"], "version": 9})
        # Undeleting a card that is not deleted changes nothing, and writes no version.
        active = ok(await client.call_tool("restore_card", {"card_id": card["id"]}))["card"]
        versions = await versions_of(client, card["id"])
    assert (error_code(stale), error_code(missing)) == ("conflict", "invalid_argument")
    assert active["version"] == 2 and [v["version"] for v in versions] == [2, 1]


async def test_restore_of_a_card_whose_content_was_created_again_answers_duplicate_content_naming_it(
    settings: Settings,
) -> None:
    async with connect(settings, tenant_name()) as client:
        first = await create(client)
        ok(await client.call_tool("delete_card", {"card_id": first["id"]}))
        second = await create(client, title="The same voice, saved again")
        undelete = await client.call_tool("restore_card", {"card_id": first["id"]})
        # And a version whose content another active card holds now.
        ok(await client.call_tool("update_card", {"card_id": second["id"], "content": {"tone": "other"}}))
        third = await create(client, title="Third")
        back = await client.call_tool("restore_card", {"card_id": second["id"], "version": 1})
        versions = await versions_of(client, first["id"])
    assert error_code(undelete) == "duplicate_content" and second["id"] in undelete.content[0].text  # type: ignore[union-attr]
    assert error_code(back) == "duplicate_content" and third["id"] in back.content[0].text  # type: ignore[union-attr]
    assert [v["op"] for v in versions] == ["delete", "create"]


async def test_another_tenants_card_has_no_history_and_cannot_be_restored(
    database: TestDatabase, settings: Settings
) -> None:
    async with connect(settings, tenant_name()) as owner, connect(settings, tenant_name()) as other:
        card = await create(owner)
        ok(await owner.call_tool("delete_card", {"card_id": card["id"]}))
        for card_id in (card["id"], str(uuid.uuid4())):
            assert error_code(await other.call_tool("get_card_history", {"card_id": card_id})) == "not_found"
            assert error_code(await other.call_tool("restore_card", {"card_id": card_id})) == "not_found"
            restore = {"card_id": card_id, "version": 1}
            assert error_code(await other.call_tool("restore_card", restore)) == "not_found"
            with pytest.raises(MCPError) as failed:
                await other.read_resource(f"card://{card_id}/history")
            assert failed.value.error.data["error"]["code"] == "not_found"  # type: ignore[index]
        assert [v["op"] for v in await versions_of(owner, card["id"])] == ["delete", "create"]
    assert await version_rows(database, card["id"]) == 2


async def test_a_failed_or_rolled_back_update_leaves_no_version_row(
    database: TestDatabase, settings: Settings, app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client)
        other = await create(client, content={"tone": "other"})
        stale = {"card_id": card["id"], "title": "Late", "expected_version": 7}
        assert error_code(await client.call_tool("update_card", stale)) == "conflict"
        taken = {"card_id": card["id"], "content": other["content"]}
        assert error_code(await client.call_tool("update_card", taken)) == "duplicate_content"
        same = ok(await client.call_tool("update_card", {"card_id": card["id"], "title": card["title"]}))
    assert same["card"]["version"] == 1
    assert await version_rows(database, card["id"]) == 1
    # A transaction that updated the card and then failed: its version row goes with it.
    async with tenant_transaction(app_pool, tenant_a) as conn:
        _, made = await cards.create_card(conn, tenant_a, new_card())
    with pytest.raises(NotFound):
        async with tenant_transaction(app_pool, tenant_a) as conn:
            await cards.update_card(conn, made.id, title="Rolled back")
            await cards.get_card(conn, uuid.uuid4())  # fails: the call rolls back
    assert await version_rows(database, str(made.id)) == 1


async def test_deleted_cards_are_seen_by_history_and_restore_alone(settings: Settings) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client, card_type="company", title="Osprey Outfitters", content={"about": "osprey kit"})
        ok(await client.call_tool("delete_card", {"card_id": card["id"]}))
        assert error_code(await client.call_tool("get_card", {"card_id": card["id"]})) == "not_found"
        assert ok(await client.call_tool("search_cards", {"query": "osprey"}))["cards"] == []
        assert ok(await client.call_tool("search_cards", {}))["cards"] == []
        with pytest.raises(MCPError):
            await client.read_resource(f"card://{card['id']}")
        assert json.loads((await client.read_resource("cards://company")).contents[0].text) == []  # type: ignore[union-attr]
        brief = await client.get_prompt("brand_brief", {})
        assert not [m for m in brief.messages if isinstance(m.content, EmbeddedResource)]
        read = await client.read_resource(f"card://{card['id']}/history")
        contents = read.contents[0]
        assert isinstance(contents, TextResourceContents) and contents.mime_type == "application/json"
        assert [(v["version"], v["op"]) for v in json.loads(contents.text)] == [(2, "delete"), (1, "create")]
        ok(await client.call_tool("restore_card", {"card_id": card["id"]}))
        assert ok(await client.call_tool("get_card", {"card_id": card["id"]}))["card"]["version"] == 3
        assert [c["id"] for c in ok(await client.call_tool("search_cards", {"query": "osprey"}))["cards"]] == [
            card["id"]
        ]


async def test_history_pages_are_bounded_and_their_cursor_belongs_to_one_card(settings: Settings) -> None:
    big = {"text": "x" * 60_000}
    async with connect(settings, tenant_name()) as client:
        card = await create(client, content={**big, "n": 0})
        for n in range(1, 4):
            ok(await client.call_tool("update_card", {"card_id": card["id"], "content": {**big, "n": n}}))
        first = ok(await client.call_tool("get_card_history", {"card_id": card["id"], "limit": 50}))
        rest = await versions_of(client, card["id"], limit=50)
        other = await create(client, content={"other": True})
        foreign = {"card_id": other["id"], "cursor": first["next_cursor"]}
        assert error_code(await client.call_tool("get_card_history", foreign)) == "invalid_argument"
        garbage = {"card_id": card["id"], "cursor": "not-a-cursor"}
        assert error_code(await client.call_tool("get_card_history", garbage)) == "invalid_argument"
    assert len(first["versions"]) == 1 and first["next_cursor"]  # two 60 KB versions pass 100 KiB
    assert [v["version"] for v in rest] == [4, 3, 2, 1]


async def test_a_batch_writes_one_version_per_card_it_creates_and_none_for_existing_ones(settings: Settings) -> None:
    async with connect(settings, tenant_name()) as client:
        held = await create(client)
        batch = [CARD, {**CARD, "content": {"new": 1}}, {**CARD, "content": {"new": 1}}]
        results = ok(await client.call_tool("batch_create_cards", {"cards": batch}))["results"]
        assert [r["status"] for r in results] == ["existing", "created", "existing"]
        assert len(await versions_of(client, held["id"])) == 1
        made = await versions_of(client, results[1]["card_id"])
    assert [(v["version"], v["op"], v["content"]) for v in made] == [(1, "create", {"new": 1})]


async def test_the_history_tools_leave_usage_rows_naming_the_card(database: TestDatabase, settings: Settings) -> None:
    tenant = tenant_name()
    async with connect(settings, tenant) as client:
        card = await create(client)
        ok(await client.call_tool("get_card_history", {"card_id": card["id"]}))
        ok(await client.call_tool("restore_card", {"card_id": card["id"]}))
        await client.call_tool("restore_card", {"card_id": str(uuid.uuid4())})
    rows = [
        (r["tool"], r["status"], r["error_code"], r["card_ids"]) for r in await usage_rows(database.admin_url, tenant)
    ]
    card_id = uuid.UUID(card["id"])
    assert rows[1:] == [
        ("get_card_history", "ok", None, [card_id]),
        ("restore_card", "ok", None, [card_id]),
        ("restore_card", "error", "not_found", []),
    ]


async def test_over_http_a_version_names_the_api_key_and_card_mcp_history_prints_it(database: TestDatabase) -> None:
    tenant = tenant_name()
    key_id, key = await new_key(database, tenant)  # labelled "test"
    with http_server(database) as server:
        async with mcp_client(server.url, key, client_name="agent-x") as client:
            card = await create(client)
            ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Changed over HTTP"}))
            versions = await versions_of(client, card["id"])
    assert versions[0]["changed_by"] == {
        "transport": "http",
        "api_key_id": str(key_id),
        "api_key_label": "test",
        "connection_id": None,
        "client_name": "agent-x",
        "client_version": "9.9",
    }
    printed = run_cli(database, "history", card["id"], "--format", "json")
    assert printed.returncode == 0, printed.stderr
    listed = json.loads(printed.stdout)["versions"]
    assert [(v["tenant"], v["version"], v["op"]) for v in listed] == [(tenant, 2, "update"), (tenant, 1, "create")]
    assert listed[0]["changed_by"]["api_key_label"] == "test"
    table = run_cli(database, "history", card["id"], "--tenant", tenant)
    assert table.returncode == 0 and f"http: key test {key_id}" in table.stdout and "title" in table.stdout
    assert run_cli(database, "history", card["id"], "--tenant", "no-such-tenant").returncode == 1
    missing = run_cli(database, "history", str(uuid.uuid4()))
    assert missing.returncode == 1 and missing.stdout == "" and "no card" in missing.stderr


async def test_a_change_made_outside_the_tools_is_kept_too_naming_the_database_role(
    database: TestDatabase, app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    async with app_pool.acquire() as conn, conn.transaction():  # no actor set: a script of the application role
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant_a))
        card_id = await conn.fetchval(
            "INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)"
            " VALUES ($1, 'voice', 'Scripted', '{}', repeat('a', 64)) RETURNING id",
            tenant_a,
        )
        with pytest.raises(asyncpg.UniqueViolationError):  # a change that does not count the version up
            async with conn.transaction():
                await conn.execute("UPDATE card_mcp.cards SET title = 'Sneaky' WHERE id = $1", card_id)
        versions, _, _ = await history.card_history(conn, card_id)
    assert [(v.version, v.op, v.title) for v in versions] == [(1, "create", "Scripted")]
    assert versions[0].changed_by.model_dump() == {
        "transport": "database",
        "api_key_id": None,
        "api_key_label": None,
        "connection_id": None,
        "client_name": db.APP_ROLE,
        "client_version": None,
    }


async def test_retention_keeps_the_newest_versions_of_each_card(database: TestDatabase, settings: Settings) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client)
        for n in range(4):
            ok(await client.call_tool("update_card", {"card_id": card["id"], "title": f"Title {n}"}))
        await history.prune(database.admin_url, 2)
        versions = await versions_of(client, card["id"])
        pruned = await client.call_tool("restore_card", {"card_id": card["id"], "version": 1})
    assert [v["version"] for v in versions] == [5, 4]
    assert versions[-1]["changed_fields"] == ["title", "content", "tags"]  # the oldest kept: nothing before it
    assert error_code(pruned) == "invalid_argument"


async def test_a_command_names_itself_and_an_import_as_the_operation_of_its_changes(
    app_pool: asyncpg.Pool, tenant_a: uuid.UUID
) -> None:
    """The contract for card-mcp's own commands that write cards (an import): the actor and the operation are
    transaction-local settings; the versions follow by themselves."""
    async with tenant_transaction(app_pool, tenant_a) as conn:
        await conn.execute(history.SET_ACTOR, history.CLI_ACTOR)
        await conn.execute("SELECT set_config('card_mcp.version_op', 'import', true)")
        items = await cards.insert_cards(conn, tenant_a, [new_card(), new_card()])
        versions, _, _ = await history.card_history(conn, items[0].card_id)
    assert [(v.version, v.op, v.changed_fields) for v in versions] == [(1, "import", ["title", "content", "tags"])]
    assert (versions[0].changed_by.transport, versions[0].changed_by.client_name) == ("cli", "card-mcp")


async def test_an_undeleted_card_is_queued_for_its_embedding_again(database: TestDatabase, settings: Settings) -> None:
    conn = await db.connect(database.admin_url)
    try:
        if await conn.fetchval("SELECT to_regclass('card_mcp.embedding_queue')") is None:
            pytest.skip("this PostgreSQL has no pgvector: no embedding queue")
        async with connect(settings, tenant_name()) as client:
            card = await create(client)
            ok(await client.call_tool("delete_card", {"card_id": card["id"]}))
            await conn.execute("DELETE FROM card_mcp.embedding_queue WHERE card_id = $1", uuid.UUID(card["id"]))
            ok(await client.call_tool("restore_card", {"card_id": card["id"]}))
        queued = await conn.fetchval(
            "SELECT count(*) FROM card_mcp.embedding_queue WHERE card_id = $1", uuid.UUID(card["id"])
        )
    finally:
        await conn.close()
    assert queued == 1


# Content that PostgreSQL stores and Python cannot read exactly (jsonb.LossyContent): nested deeper than its parser
# goes.
DEEP_CONTENT = '{"a": ' + "[" * 3000 + "]" * 3000 + "}"


async def test_restoring_a_card_whose_stored_content_python_cannot_read_keeps_that_content(
    database: TestDatabase, settings: Settings
) -> None:
    async with connect(settings, tenant_name()) as client:
        card = await create(client)
        card_id = uuid.UUID(card["id"])
        async with superuser(database) as conn:  # written by something other than the tools, as PostgreSQL allows
            await conn.execute(
                "UPDATE card_mcp.cards SET content = $1::text::jsonb, content_hash = repeat('d', 64),"
                " version = version + 1 WHERE id = $2",
                DEEP_CONTENT,
                card_id,
            )
            stored = await conn.fetchval("SELECT content::text FROM card_mcp.cards WHERE id = $1", card_id)
        ok(await client.call_tool("delete_card", {"card_id": card["id"]}))
        ok(await client.call_tool("restore_card", {"card_id": card["id"]}))  # undelete
        async with superuser(database) as conn:
            undeleted = await conn.fetchrow(
                "SELECT content::text, content_hash FROM card_mcp.cards WHERE id = $1", card_id
            )
        ok(await client.call_tool("update_card", {"card_id": card["id"], "content": {"tone": "new"}}))
        ok(await client.call_tool("restore_card", {"card_id": card["id"], "version": 2}))  # back to the deep one
        async with superuser(database) as conn:
            restored = await conn.fetchrow(
                "SELECT content::text, content_hash FROM card_mcp.cards WHERE id = $1", card_id
            )
    assert tuple(undeleted) == (stored, "d" * 64)
    assert tuple(restored) == (stored, "d" * 64)


async def test_card_mcp_history_of_a_card_id_two_tenants_hold_after_an_import_shows_one_tenants_versions(
    database: TestDatabase, settings: Settings, tmp_path: Path
) -> None:
    """An export imported into another tenant keeps the cards' ids (the key is (tenant_id, id)), so one id can name a
    card in two tenants: `card-mcp history ID` across tenants must not list the two cards' versions as one."""
    source, target = tenant_name(), tenant_name()
    async with connect(settings, source) as client:
        card = await create(client, content={"only": "source"})
        ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Source's second title"}))
    exported = tmp_path / "source.jsonl"
    assert run_cli(database, "export", "--tenant", source, "--output", str(exported)).returncode == 0
    async with connect(settings, target):
        pass  # the tenant exists
    assert run_cli(database, "import", str(exported), "--tenant", target).returncode == 0
    async with connect(settings, target) as client:
        ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "Target's own title"}))
    mixed = run_cli(database, "history", card["id"], "--format", "json")
    assert mixed.returncode == 1 and mixed.stdout == "", mixed.stdout
    assert source in mixed.stderr and target in mixed.stderr and "--tenant" in mixed.stderr
    one = run_cli(database, "history", card["id"], "--tenant", target, "--format", "json")
    assert one.returncode == 0, one.stderr
    listed = json.loads(one.stdout)["versions"]
    assert [(v["tenant"], v["version"], v["title"]) for v in listed] == [
        (target, 3, "Target's own title"),
        (target, 2, "Source's second title"),
    ]
