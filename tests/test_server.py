"""The card tools through the SDK's in-memory client, on a real PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest
from mcp import Client, MCPError

from card_mcp import cli, db, server
from card_mcp.config import Settings
from card_mcp.server import build_server
from tests.conftest import TestDatabase
from tests.helpers import CARD, TOOLS, connect, create, error_code, ok, superuser, usage_rows


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(settings: Settings, tenant: str) -> AsyncIterator[Client]:
    """A connected client. It lives in a task of its own: pytest-asyncio sets a fixture up and tears it down
    in different tasks, and the client's cancel scope must be left in the task that entered it."""
    ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
    done = asyncio.Event()

    async def hold() -> None:
        async with connect(settings, tenant) as c:
            ready.set_result(c)
            await done.wait()

    task = asyncio.create_task(hold())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        await task  # raises what went wrong
    yield ready.result()
    done.set()
    await task


async def test_tools_list_names_annotations_and_portable_schemas(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 80
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
        assert tool.annotations.read_only_hint is not None and tool.annotations.idempotent_hint is not None
        for schema in (tool.input_schema, tool.output_schema):
            assert schema is not None and "$schema" not in schema
            jsonschema.Draft7Validator.check_schema(schema)
            jsonschema.Draft202012Validator.check_schema(schema)
        assert tool.input_schema["additionalProperties"] is False
    assert tools["get_card"].annotations.read_only_hint is True  # type: ignore[union-attr]
    assert tools["delete_card"].annotations.destructive_hint is True  # type: ignore[union-attr]
    create_props = tools["create_card"].input_schema["properties"]
    assert create_props["title"]["maxLength"] == 200 and create_props["tags"]["maxItems"] == 20
    assert create_props["card_type"]["enum"] == ["company", "audience", "voice", "insight"]
    search_props = tools["search_cards"].input_schema["properties"]
    assert search_props["limit"]["minimum"] == 1 and search_props["limit"]["maximum"] == 50
    batch_cards = tools["batch_create_cards"].input_schema["properties"]["cards"]
    assert (batch_cards["minItems"], batch_cards["maxItems"]) == (1, 1000)


async def test_every_schema_in_the_tool_list_is_an_object_as_mcp_asks_so_strict_clients_accept_it(
    client: Client,
) -> None:
    """MCP's schema types each property of inputSchema and outputSchema as an object; a JSON Schema ``true`` is
    valid JSON Schema but the MCP Inspector (and any client that checks tools/list against MCP's schema) refuses
    the whole list for it."""

    def not_objects(node: Any, path: str) -> list[str]:
        """Where a schema below ``node`` is not a JSON object: a boolean, a list, a string."""
        if not isinstance(node, dict):
            return [path]
        found: list[str] = []
        for key in ("properties", "$defs"):
            for name, value in (node.get(key) or {}).items():
                found += not_objects(value, f"{path}.{key}.{name}")
        for key in ("items", "additionalProperties"):
            if key in node and not (key == "additionalProperties" and node[key] is False):
                found += not_objects(node[key], f"{path}.{key}")
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            for option in node.get(key, []):
                found += not_objects(option, f"{path}.{key}")
        return found

    for tool in (await client.list_tools()).tools:
        for side, schema in (("inputSchema", tool.input_schema), ("outputSchema", tool.output_schema)):
            assert schema is not None and schema.get("type") == "object", (tool.name, side)
            assert not_objects(schema, f"{tool.name}.{side}") == []


async def test_every_result_has_each_field_its_model_types_though_the_published_schema_names_fields_alone(
    client: Client,
) -> None:
    """tools/list publishes result schemas as field names (registry._names_only: the SDK's client validates every
    typed value on every call); the typing lives in the result models, and each tool's answer must still meet
    their full schema, every field present with its type."""
    from card_mcp.registry import inline_refs
    from card_mcp.tools import TOOLS as REGISTRY

    published = {tool.name: tool.output_schema or {} for tool in (await client.list_tools()).tools}
    card = await create(client, title="Typed results", content={"summary": "every field typed"}, tags=["typed"])
    calls: list[tuple[str, dict[str, Any]]] = [
        ("create_card", {**CARD, "title": "Typed results"}),
        ("get_card", {"card_id": card["id"]}),
        ("search_cards", {"query": "typed results"}),
        ("update_card", {"card_id": card["id"], "expected_version": 1, "title": "Typed results, again"}),
        ("get_card_history", {"card_id": card["id"]}),
        ("restore_card", {"card_id": card["id"], "version": 1}),
        ("batch_create_cards", {"cards": [{**CARD, "title": "Typed batch"}]}),
        ("usage_stats", {"since": "1h"}),
        ("delete_card", {"card_id": card["id"]}),
    ]
    assert {name for name, _ in calls} == TOOLS
    for name, arguments in calls:
        tool = next(t for t in REGISTRY if t.name == name)
        typed = inline_refs(tool.result.model_json_schema(mode="serialization"))
        structured = ok(await client.call_tool(name, arguments))
        jsonschema.Draft202012Validator(typed).validate(structured)
        jsonschema.Draft202012Validator(published[name]).validate(structured)
        assert set(published[name]["properties"]) == set(typed["properties"]) == set(structured)


# What every conversation that loads the server pays for, in bytes of compact JSON: the tools' names, descriptions
# and schemas. tools.py says how a description is written so that a new tool fits.
TOOLS_LIST_BUDGET = 8 * 1024


async def test_tools_list_fits_its_budget_with_every_bound_and_no_indentation(client: Client) -> None:
    tools = (await client.list_tools()).tools

    def compact(value: object) -> int:
        return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())

    sizes = {
        tool.name: len(tool.name.encode())
        + len((tool.description or "").encode())
        + compact(tool.input_schema)
        + compact(tool.output_schema)
        for tool in tools
    }
    listing = sum(compact(tool.model_dump(by_alias=True, exclude_none=True, mode="json")) for tool in tools)
    for name, size in sizes.items():
        print(f"tools/list: {name:<20} {size:>5} bytes")
    print(f"tools/list: names, descriptions and schemas {sum(sizes.values())} bytes of {TOOLS_LIST_BUDGET}")
    print(f"tools/list: the whole listing (titles and annotations too) {listing} bytes")
    assert sum(sizes.values()) <= TOOLS_LIST_BUDGET
    for tool in tools:
        assert tool.description is not None and "\n " not in tool.description and "  " not in tool.description
        assert "Returns" in tool.description  # what comes back, said once
    create = {t.name: t for t in tools}["create_card"].input_schema["properties"]
    assert create["content"]["description"].count("64 KiB") == 1  # a bound no JSON Schema keyword can carry
    assert create["title"]["pattern"] and create["tags"]["items"]["pattern"]  # no control characters


async def test_results_are_compact_json_with_scores_to_3_decimals_and_milliseconds_to_a_tenth(client: Client) -> None:
    for n in range(3):
        await create(client, title=f"Spring launch audience {n}", content={"who": f"coastal parents, wave {n}"})
    found = await client.call_tool("search_cards", {"query": "spring coastal parents"})
    text = found.content[0].text  # type: ignore[union-attr]
    assert text == json.dumps(ok(found), separators=(",", ":"), ensure_ascii=False)  # no indentation, no spaces
    scores = [card["score"] for card in ok(found)["cards"]]
    assert scores and all(0 < score <= 1 and score == round(score, 3) for score in scores)
    rows = ok(await client.call_tool("usage_stats", {"since": "1h"}))["rows"]
    assert rows and all(r["p50_ms"] == round(r["p50_ms"], 1) and r["p95_ms"] == round(r["p95_ms"], 1) for r in rows)


async def cards_of(database: TestDatabase, tenant: str) -> list[tuple[Any, ...]]:
    """Every card row of ``tenant``, deleted ones included, as the database holds them."""
    async with superuser(database) as conn:
        rows = await conn.fetch(
            "SELECT c.id, c.title, c.content, c.tags, c.version, c.is_active, c.deleted_at, c.updated_at"
            "  FROM card_mcp.cards c JOIN card_mcp.tenants t USING (tenant_id) WHERE t.name = $1 ORDER BY c.id",
            tenant,
        )
    return [tuple(row) for row in rows]


def twice_arguments(tool: str, card_id: str) -> dict[str, Any]:
    """Arguments to call ``tool`` with twice, on a tenant holding the card ``card_id``."""
    return {
        "create_card": {**CARD, "content": {"twice": True}},
        "get_card": {"card_id": card_id},
        "search_cards": {"query": "voice"},
        "update_card": {"card_id": card_id, "title": "Renamed", "tags": ["x"], "expected_version": 1},
        "delete_card": {"card_id": card_id},
        "batch_create_cards": {"cards": [{**CARD, "content": {"batch": n}} for n in range(3)]},
        "usage_stats": {"since": "1h", "group_by": "card"},
        "get_card_history": {"card_id": card_id},
        "restore_card": {"card_id": card_id, "version": 1},  # the card as it is: nothing to write, twice
    }[tool]


@pytest.mark.parametrize("tool", sorted(TOOLS))
async def test_every_tools_hints_hold_when_it_is_called_twice(
    database: TestDatabase, client: Client, tenant: str, tool: str
) -> None:
    """readOnlyHint: no card changes. destructiveHint false: no card that existed before changes. idempotentHint:
    the second call with the same arguments changes nothing more, and (but for a stale expected_version, which
    the first call made stale) answers as the first did."""
    listed = {t.name: t for t in (await client.list_tools()).tools}[tool].annotations
    assert listed is not None
    card = await create(client)
    before = await cards_of(database, tenant)
    arguments = twice_arguments(tool, card["id"])
    first = await client.call_tool(tool, arguments)
    after_first = await cards_of(database, tenant)
    second = await client.call_tool(tool, arguments)
    after_second = await cards_of(database, tenant)
    assert not first.is_error, first.content
    if listed.read_only_hint:
        assert before == after_first == after_second
    if not listed.destructive_hint:  # only additions: every card there before is as it was
        assert [row for row in after_second if row[0] in {r[0] for r in before}] == before
    if listed.idempotent_hint:
        assert after_second == after_first
        if tool == "update_card":  # the version the first call read is stale now: refused, nothing written
            assert error_code(second) == "conflict"
        else:
            assert not second.is_error, second.content
            answers = [ok(first), ok(second)]
            if tool == "create_card":
                assert [a["status"] for a in answers] == ["created", "existing"]
                assert answers[0]["card"] == answers[1]["card"]
            elif tool == "batch_create_cards":
                assert [a["created"] for a in answers] == [3, 0] and [a["existing"] for a in answers] == [0, 3]
                assert [r["card_id"] for r in answers[0]["results"]] == [r["card_id"] for r in answers[1]["results"]]
            elif tool != "usage_stats":  # whose figures count the first call
                assert answers[0] == answers[1]
    else:
        assert after_second != after_first


async def test_an_unexpected_argument_is_named_with_the_nearest_valid_one(client: Client) -> None:
    def message(result: Any) -> str:
        assert error_code(result) == "invalid_argument"
        text: str = json.loads(result.content[0].text)["error"]["message"]
        return text

    card_id = str(uuid.uuid4())
    assert message(await client.call_tool("get_card", {"id": card_id})).startswith(
        "arguments: unexpected argument 'id' (did you mean 'card_id'?)"
    )
    batch = {"cards": [{**CARD, "tag": ["x"]}]}
    assert "cards.0: unexpected argument 'tag' (did you mean 'tags'?)" in message(
        await client.call_tool("batch_create_cards", batch)
    )
    nothing_near = message(await client.call_tool("usage_stats", {"zzz": 1}))
    assert nothing_near == "arguments: unexpected argument 'zzz' (allowed: since, until, group_by, limit)"
    assert card_id not in message(await client.call_tool("get_card", {card_id: card_id}))  # a value, not a name


async def test_create_get_search_update_delete_round_trip(client: Client) -> None:
    created = ok(await client.call_tool("create_card", CARD))
    assert created["status"] == "created"
    card = created["card"]
    assert card["version"] == 1 and card["tags"] == ["core"]
    assert ok(await client.call_tool("get_card", {"card_id": card["id"]}))["card"] == card
    found = ok(await client.call_tool("search_cards", {"query": "warm", "card_type": "voice"}))
    assert [c["id"] for c in found["cards"]] == [card["id"]] and found["cards"][0]["score"] > 0
    updated = ok(await client.call_tool("update_card", {"card_id": card["id"], "tags": [], "expected_version": 1}))
    assert updated["card"]["tags"] == [] and updated["card"]["version"] == 2
    deleted = ok(await client.call_tool("delete_card", {"card_id": card["id"]}))
    assert deleted["card_id"] == card["id"] and deleted["deleted_at"]
    assert error_code(await client.call_tool("get_card", {"card_id": card["id"]})) == "not_found"


async def test_create_of_existing_content_returns_the_card_with_status_existing(client: Client) -> None:
    first = ok(await client.call_tool("create_card", CARD))
    again = ok(await client.call_tool("create_card", {**CARD, "title": "Another title"}))
    assert again["status"] == "existing" and again["card"] == first["card"]


async def test_search_without_query_lists_newest_updated_first_and_pages_with_a_cursor(client: Client) -> None:
    ids = [(await create(client, content={"n": i}))["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        args: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = ok(await client.call_tool("search_cards", args))
        assert len(page["cards"]) <= 2
        seen += [c["id"] for c in page["cards"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))


async def test_a_cursor_used_with_other_arguments_is_an_invalid_argument(client: Client) -> None:
    for i in range(3):
        await create(client, content={"n": i})
    page = ok(await client.call_tool("search_cards", {"limit": 1}))
    assert page["next_cursor"]
    result = await client.call_tool(
        "search_cards", {"limit": 1, "card_type": "audience", "cursor": page["next_cursor"]}
    )
    assert error_code(result) == "invalid_argument"


async def test_a_page_stays_near_100_kib_and_says_when_more_exist(client: Client) -> None:
    big = "x" * 60_000
    for i in range(3):
        await create(client, content={"n": i, "text": big})
    page = ok(await client.call_tool("search_cards", {"limit": 50}))
    assert len(page["cards"]) == 1 and page["next_cursor"] is not None


@pytest.mark.parametrize(
    ("tool", "arguments"),
    [
        ("create_card", {**CARD, "title": "SECRET" * 40}),
        ("create_card", {**CARD, "tags": [f"t{i}" for i in range(21)]}),
        ("create_card", {**CARD, "card_type": "persona"}),
        ("create_card", {**CARD, "tenant_id": str(uuid.uuid4())}),
        ("create_card", {**CARD, "content": {"text": "SECRET" * 12_000}}),
        ("create_card", {**CARD, "content": {"text": "nul\x00"}}),
        ("create_card", {"title": "no type", "content": {}}),
        ("get_card", {"card_id": "SECRET-not-a-uuid"}),
        ("search_cards", {"limit": 51}),
        ("search_cards", {"cursor": "SECRET"}),
        ("update_card", {"card_id": str(uuid.uuid4()), "expected_version": 0}),
        ("batch_create_cards", {"cards": []}),
        ("usage_stats", {"group_by": "SECRET"}),
        ("usage_stats", {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}),
    ],
)
async def test_invalid_arguments_answer_invalid_argument_without_echoing_input(
    client: Client, tool: str, arguments: dict[str, Any]
) -> None:
    result = await client.call_tool(tool, arguments)
    assert error_code(result) == "invalid_argument"
    assert "SECRET" not in result.content[0].text  # type: ignore[union-attr]


async def test_get_update_delete_answer_not_found_alike_for_missing_deleted_and_foreign_cards(
    settings: Settings, client: Client
) -> None:
    deleted = await create(client, content={"gone": True})
    first = ok(await client.call_tool("delete_card", {"card_id": deleted["id"]}))
    async with connect(settings, f"other-{uuid.uuid4().hex[:8]}") as other:
        foreign = await create(other, content={"theirs": True})
    for card_id in (str(uuid.uuid4()), deleted["id"], foreign["id"]):
        answers = [
            await client.call_tool("get_card", {"card_id": card_id}),
            await client.call_tool("update_card", {"card_id": card_id, "title": "x"}),
        ]
        if card_id != deleted["id"]:  # deleting a deleted card of one's own again answers the first delete
            answers.append(await client.call_tool("delete_card", {"card_id": card_id}))
        texts = {json.loads(a.content[0].text)["error"]["hint"] for a in answers}  # type: ignore[union-attr]
        assert [error_code(a) for a in answers] == ["not_found"] * len(answers)
        assert card_id not in "".join(texts)
    assert ok(await client.call_tool("delete_card", {"card_id": deleted["id"]})) == first


async def test_tenants_see_nothing_of_each_other_through_the_tools(settings: Settings, client: Client) -> None:
    mine = await create(client, content={"secret": "plan"}, title="Secret plan")
    async with connect(settings, f"other-{uuid.uuid4().hex[:8]}") as other:
        assert ok(await other.call_tool("search_cards", {"query": "secret plan"}))["cards"] == []
        assert ok(await other.call_tool("search_cards", {}))["cards"] == []
        theirs = ok(await other.call_tool("create_card", {**CARD, "content": {"secret": "plan"}}))
        assert theirs["status"] == "created" and theirs["card"]["id"] != mine["id"]
        stats = ok(await other.call_tool("usage_stats", {"group_by": "card"}))
        assert mine["id"] not in {row["key"] for row in stats["rows"]}


async def test_stale_expected_version_is_a_conflict_and_changes_nothing(client: Client) -> None:
    card = await create(client)
    ok(await client.call_tool("update_card", {"card_id": card["id"], "title": "v2"}))
    stale = await client.call_tool("update_card", {"card_id": card["id"], "title": "v3", "expected_version": 1})
    assert error_code(stale) == "conflict"
    assert ok(await client.call_tool("get_card", {"card_id": card["id"]}))["card"]["title"] == "v2"


async def test_update_to_another_cards_content_is_duplicate_content_naming_it(client: Client) -> None:
    one = await create(client, content={"n": 1})
    two = await create(client, content={"n": 2})
    result = await client.call_tool("update_card", {"card_id": two["id"], "content": {"n": 1}})
    assert error_code(result) == "duplicate_content"
    assert one["id"] in json.loads(result.content[0].text)["error"]["message"]  # type: ignore[union-attr]


async def test_update_that_changes_nothing_returns_the_card_without_a_new_version(client: Client) -> None:
    card = await create(client)
    same = ok(
        await client.call_tool("update_card", {"card_id": card["id"], "title": card["title"], "tags": card["tags"]})
    )
    assert same["card"] == card


async def test_batch_is_atomic_and_marks_duplicates_by_index(client: Client) -> None:
    existing = await create(client, content={"n": "old"})
    cards = [
        {"card_type": "insight", "title": "a", "content": {"n": 1}},
        {"card_type": "voice", "title": "dup of stored", "content": {"n": "old"}},
        {"card_type": "insight", "title": "a again", "content": {"n": 1}},
    ]
    result = ok(await client.call_tool("batch_create_cards", {"cards": cards}))
    assert [r["status"] for r in result["results"]] == ["created", "existing", "existing"]
    assert result["results"][1]["card_id"] == existing["id"]
    assert result["results"][2]["card_id"] == result["results"][0]["card_id"]
    assert (result["created"], result["existing"], result["replayed"]) == (1, 2, False)
    bad = [*cards, {"card_type": "insight", "title": "huge", "content": {"x": "y" * 70_000}}]
    before = ok(await client.call_tool("search_cards", {"limit": 50}))["cards"]
    failed = await client.call_tool(
        "batch_create_cards", {"cards": [{"card_type": "company", "title": "new", "content": {"q": 1}}, *bad]}
    )
    assert error_code(failed) == "invalid_argument"
    assert "cards[4]" in json.loads(failed.content[0].text)["error"]["message"]  # type: ignore[union-attr]
    assert ok(await client.call_tool("search_cards", {"limit": 50}))["cards"] == before


async def test_batch_with_an_idempotency_key_replays_and_refuses_other_cards(client: Client) -> None:
    cards = [{"card_type": "insight", "title": f"i{i}", "content": {"i": i}} for i in range(3)]
    first = ok(await client.call_tool("batch_create_cards", {"cards": cards, "idempotency_key": "import-1"}))
    again = ok(await client.call_tool("batch_create_cards", {"cards": cards, "idempotency_key": "import-1"}))
    assert again == {**first, "replayed": True}
    other = await client.call_tool("batch_create_cards", {"cards": cards[:2], "idempotency_key": "import-1"})
    assert error_code(other) == "idempotency_conflict"
    listed = ok(await client.call_tool("search_cards", {"limit": 50}))["cards"]
    assert len(listed) == 3


async def test_batch_reports_progress_when_the_client_asks(client: Client) -> None:
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    cards = [{"card_type": "insight", "title": f"p{i}", "content": {"p": i}} for i in range(600)]
    result = await client.call_tool("batch_create_cards", {"cards": cards}, progress_callback=on_progress)
    assert ok(result)["created"] == 600
    assert seen and seen[-1] == (600, 600)


async def test_unknown_tool_is_a_json_rpc_error(client: Client) -> None:
    with pytest.raises(MCPError):
        await client.call_tool("drop_all_cards", {})


async def test_every_call_writes_exactly_one_usage_row_with_status_code_and_client(
    database: Any, settings: Settings, tenant: str
) -> None:
    async with connect(settings, tenant, client_name="usage-probe") as client:
        card = await create(client)
        calls = [
            ("get_card", {"card_id": card["id"]}, None),
            ("get_card", {"card_id": str(uuid.uuid4())}, "not_found"),
            ("create_card", {**CARD, "title": ""}, "invalid_argument"),
            ("search_cards", {"query": "warm"}, None),
            ("update_card", {"card_id": card["id"], "title": "t", "expected_version": 7}, "conflict"),
            ("usage_stats", {}, None),
        ]
        for tool, arguments, expected in calls:
            result = await client.call_tool(tool, arguments)
            assert (error_code(result) if expected else None) == expected
    rows = await usage_rows(database.admin_url, tenant)
    assert [r["tool"] for r in rows] == ["create_card"] + [c[0] for c in calls]
    assert [r["error_code"] for r in rows] == [None] + [c[2] for c in calls]
    assert [r["status"] for r in rows] == ["ok"] + ["error" if c[2] else "ok" for c in calls]
    assert {r["client_name"] for r in rows} == {"usage-probe"}
    assert {r["client_version"] for r in rows} == {"1.2.3"}
    assert {r["transport"] for r in rows} == {"stdio"}
    assert rows[0]["card_ids"] == [uuid.UUID(card["id"])] and rows[1]["card_ids"] == [uuid.UUID(card["id"])]
    assert all(r["duration_ms"] > 0 for r in rows)


async def test_a_successful_writes_usage_row_commits_in_the_same_transaction_as_the_card(
    database: Any, client: Client, tenant: str
) -> None:
    card = await create(client)
    conn = await db.connect(database.admin_url)
    try:
        card_xmin = await conn.fetchval("SELECT xmin::text FROM card_mcp.cards WHERE id = $1", uuid.UUID(card["id"]))
        usage_xmin = await conn.fetchval(
            "SELECT xmin::text FROM card_mcp.card_usage WHERE $1 = ANY(card_ids) AND tool = 'create_card'",
            uuid.UUID(card["id"]),
        )
    finally:
        await conn.close()
    assert card_xmin == usage_xmin


async def test_a_failed_call_leaves_no_trace_but_its_usage_row(database: Any, client: Client, tenant: str) -> None:
    card = await create(client)
    conn = await db.connect(database.admin_url)
    try:
        before = await conn.fetchrow(
            "SELECT count(*) AS n, max(c.xmin::text::bigint) AS x FROM card_mcp.cards c JOIN card_mcp.tenants t"
            " USING (tenant_id) WHERE t.name = $1",
            tenant,
        )
        result = await client.call_tool("update_card", {"card_id": card["id"], "title": "new", "expected_version": 9})
        assert error_code(result) == "conflict"
        after = await conn.fetchrow(
            "SELECT count(*) AS n, max(c.xmin::text::bigint) AS x FROM card_mcp.cards c JOIN card_mcp.tenants t"
            " USING (tenant_id) WHERE t.name = $1",
            tenant,
        )
    finally:
        await conn.close()
    assert before == after
    rows = await usage_rows(database.admin_url, tenant)
    assert rows[-1]["error_code"] == "conflict" and rows[-1]["card_ids"] == []


async def test_usage_stats_counts_calls_and_errors_per_tool(client: Client) -> None:
    card = await create(client)
    await client.call_tool("get_card", {"card_id": card["id"]})
    await client.call_tool("get_card", {"card_id": str(uuid.uuid4())})
    rows = {r["key"]: r for r in ok(await client.call_tool("usage_stats", {"group_by": "tool"}))["rows"]}
    assert (rows["get_card"]["calls"], rows["get_card"]["errors"]) == (2, 1)
    assert (rows["create_card"]["calls"], rows["create_card"]["errors"]) == (1, 0)
    by_card = ok(await client.call_tool("usage_stats", {"group_by": "card"}))["rows"]
    assert by_card[0]["key"] == card["id"] and by_card[0]["calls"] == 2
    by_client = ok(await client.call_tool("usage_stats", {"group_by": "client"}))["rows"]
    assert by_client[0]["key"] == "pytest"


async def test_a_server_that_owns_its_process_keeps_its_start_up_objects_out_of_the_collector_a_library_one_not(
    settings: Settings, tenant: str
) -> None:
    """`card-mcp serve` freezes what start-up built, so that a full collection walks only what calls left behind
    (server._settle_heap); a server built by a library user or a test leaves the collector to them."""
    assert gc.get_freeze_count() == 0
    async with connect(settings, tenant) as client:
        ok(await client.call_tool("create_card", CARD))
        assert gc.get_freeze_count() == 0
    owner = build_server(settings.model_copy(update={"tenant": tenant}), owns_process=True)
    try:
        async with Client(owner, mode="legacy") as client:
            frozen = gc.get_freeze_count()
            assert frozen > 50_000  # the modules, the SDK's and card-mcp's, the pools
            assert len(gc.get_objects()) < frozen // 5  # what a full collection still walks
            found = ok(await client.call_tool("search_cards", {"query": "brand voice"}))
            assert [card["title"] for card in found["cards"]] == ["Brand voice"]
    finally:
        gc.unfreeze()


class _Built(Exception):
    """Raised by a stand-in for build_server: how `card-mcp serve` asked for its server, before anything serves."""


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_card_mcp_serve_asks_for_a_server_that_owns_its_process(
    settings: Settings, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(settings: Settings, **options: Any) -> server.CardServer:
        raise _Built(options)

    monkeypatch.setattr(server, "build_server", build)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # serve cleans its handlers' lines: not pytest's
    serving = settings.model_copy(update={"transport": transport, "port": 0, "host": "127.0.0.1"})
    with pytest.raises(_Built) as built:
        await cli._serve(argparse.Namespace(tenant=None), serving)
    assert built.value.args == ({"owns_process": True},)
