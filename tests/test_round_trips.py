"""Database round trips per call, counted on the wire (tests/wire.py): what a call costs, kept from regressing."""

from __future__ import annotations

import uuid
from typing import Any

from mcp import Client

from card_mcp import db
from card_mcp.config import Settings
from card_mcp.server import build_server
from tests.wire import TurnCounter

CARD = {"card_type": "voice", "title": "Warm and plain", "content": {"summary": "Short sentences."}, "tags": ["tone"]}


async def test_get_card_is_one_round_trip_and_other_calls_two_plus_their_queries(
    database: Any, settings: Settings
) -> None:
    async with TurnCounter(database.app_url) as wire:
        routed = settings.model_copy(
            update={"database_url": wire.url(db.APP_ROLE, database.name), "tenant": f"t-{uuid.uuid4().hex[:12]}"}
        )
        async with Client(build_server(routed), mode="legacy") as client:
            made = await client.call_tool("create_card", CARD)
            card_id = made.structured_content["card"]["id"] if made.structured_content else ""
            batch = [{**CARD, "content": {"summary": f"batch {i}"}} for i in range(3)]
            respelled = [{**card, "title": f" {card['title']} "} for card in batch]  # the same, once trimmed
            calls: dict[str, tuple[str, dict[str, Any]]] = {
                "get_card": ("get_card", {"card_id": card_id}),
                "get_card of no card": ("get_card", {"card_id": str(uuid.uuid4())}),
                "search_cards": ("search_cards", {"query": "plain"}),
                "create_card": ("create_card", {**CARD, "content": {"summary": "new"}}),
                "create_card of invalid arguments": ("create_card", {**CARD, "title": ""}),
                "update_card": ("update_card", {"card_id": card_id, "title": "Changed"}),
                "get_card_history": ("get_card_history", {"card_id": card_id}),
                "restore_card of an active card": ("restore_card", {"card_id": card_id, "version": 1}),
                "batch retried exactly": ("batch_create_cards", {"cards": batch, "idempotency_key": "k"}),
                "batch retried respelled": ("batch_create_cards", {"cards": respelled, "idempotency_key": "k"}),
            }
            for tool, arguments in calls.values():  # every statement prepared on the pooled connection
                await client.call_tool(tool, arguments)
            counted = {}
            for what, (tool, arguments) in calls.items():
                if tool == "create_card" and "summary" in arguments["content"]:
                    arguments = {**arguments, "content": {"summary": uuid.uuid4().hex}}  # a new card each time
                if tool == "update_card":
                    arguments = {**arguments, "title": uuid.uuid4().hex}  # a real change, with its version row
                before = wire.turns
                result = await client.call_tool(tool, arguments)
                counted[what] = wire.turns - before
                if tool == "batch_create_cards":
                    assert result.structured_content and result.structured_content["replayed"] is True
    assert counted == {
        "get_card": 1,  # one statement: tenant, read, usage row, commit
        "get_card of no card": 1,
        "search_cards": 1,  # one statement: tenant, search, usage row, commit
        "create_card": 5,  # the same, with the insert
        "create_card of invalid arguments": 1,  # nothing read or written: the usage row in one statement
        "update_card": 6,  # BEGIN; settings and actor; lock; update (and its version, by trigger); usage; COMMIT
        "get_card_history": 5,  # BEGIN; the settings; the page; the usage row; COMMIT
        "restore_card of an active card": 7,  # BEGIN; settings; lock; the version read; the restore; usage; COMMIT
        "batch retried exactly": 5,  # answered from the key and the arguments' hash, before validation
        "batch retried respelled": 6,  # validated, then found by the hash of the validated cards
    }
