"""Hostile input for every tool: every call with bad arguments is answered with an ``isError`` result in the shape
of SPEC section 4 (a JSON-RPC error only for what is not a tool call at all), writes nothing but its one usage
row, never answers ``internal``, never echoes the rejected value, and leaves the server ready for the next call.

Three layers. Arguments drawn by hypothesis from each tool's published ``inputSchema``: valid ones succeed or fail
with a domain code, and mutants of them (a wrong type, a broken bound, an unknown or a missing property) answer
``invalid_argument``. Hand-made arguments no schema generator makes (NUL, lone surrogates, deep nesting, megabytes).
And raw bytes on the stdin of a real ``card-mcp serve``, for what the SDK's client cannot send (garbage lines,
invalid UTF-8, NaN as a bare token). Every rejected value the tests make carries MARK, so an echo is easy to see.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import queue
import shutil
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema
from mcp import Client
from mcp.types import CallToolResult, TextContent

from card_mcp import db, usage
from card_mcp.config import Settings
from card_mcp.errors import InvalidArgument
from card_mcp.registry import NAMEABLE
from tests.conftest import TestDatabase, make_tempdir
from tests.helpers import CARD, TOOLS, connect, error_code, ok
from tests.test_stdio import CARD_MCP

MARK = "HOSTILE"
CODES = {"invalid_argument", "not_found", "conflict", "duplicate_content", "idempotency_conflict", "limit_exceeded"}
# What a call with arguments valid under the schema may answer besides success, when they break no rule of SPEC
# section 2 that a schema cannot express (those may also answer invalid_argument).
DOMAIN_CODES = {
    "create_card": set(),
    "get_card": {"not_found"},
    "search_cards": set(),
    "update_card": {"not_found", "conflict", "duplicate_content"},
    "delete_card": {"not_found"},
    "batch_create_cards": {"idempotency_conflict"},
    "usage_stats": set(),
    "get_card_history": {"not_found"},
    # invalid_argument: a version number the card does not have (its versions are known only to the server).
    "restore_card": {"not_found", "conflict", "duplicate_content", "invalid_argument"},
}
EXAMPLES = 100  # per tool, for valid and for invalid arguments alike
# delete_card last: the cards the others are given must still be there.
ORDER = [*sorted(TOOLS - {"delete_card"}), "delete_card"]

# One row of counts per tenant: the usage rows and the last of them, and a fingerprint of the cards and the
# idempotency keys that changes with any write (every new row version has a newer xmin).
_TALLY = """
SELECT (SELECT count(*) FROM card_mcp.card_usage WHERE tenant_id = $1) AS usage,
       (SELECT array[tool, status, error_code] FROM card_mcp.card_usage
         WHERE tenant_id = $1 ORDER BY usage_id DESC LIMIT 1) AS last,
       (SELECT array[count(*), coalesce(sum(xmin::text::bigint), 0)] FROM card_mcp.cards
         WHERE tenant_id = $1) AS cards,
       (SELECT array[count(*), coalesce(sum(xmin::text::bigint), 0)] FROM card_mcp.idempotency_store
         WHERE tenant_id = $1) AS keys,
       (SELECT array[count(*)] FROM card_mcp.card_versions WHERE tenant_id = $1) AS versions
"""


@dataclass(frozen=True)
class Tally:
    usage: int
    last: tuple[str | None, ...]
    writes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


async def tally(conn: asyncpg.Connection, tenant_id: uuid.UUID) -> Tally:
    row = await conn.fetchrow(_TALLY, tenant_id)
    assert row is not None
    return Tally(
        row["usage"], tuple(row["last"] or ()), (tuple(row["cards"]), tuple(row["keys"]), tuple(row["versions"]))
    )


def spec_error(result: CallToolResult) -> tuple[str, str]:
    """The code and the text of an error result in the shape of SPEC section 4, never ``internal``."""
    assert result.is_error
    assert len(result.content) == 1 and isinstance(result.content[0], TextContent)
    code = error_code(result)
    text = result.content[0].text
    message = json.loads(text)["error"]["message"]
    assert code in CODES, text
    assert message and "\n" not in message
    return code, text


@asynccontextmanager
async def admin_connection(url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(url)
    try:
        yield conn
    finally:
        await conn.close()


async def tenant_id_of(conn: asyncpg.Connection, name: str) -> uuid.UUID:
    tenant_id: uuid.UUID = await conn.fetchval("SELECT tenant_id FROM card_mcp.tenants WHERE name = $1", name)
    return tenant_id


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    """An event loop in a thread of its own: hypothesis's tests are plain functions and call through it."""
    with start_blocking_portal() as loop:
        yield loop


@pytest.fixture(scope="module")
def admin(portal: BlockingPortal, database: TestDatabase) -> Iterator[asyncpg.Connection]:
    with portal.wrap_async_context_manager(admin_connection(database.admin_url)) as conn:
        yield conn


class Caller:
    """One tenant's in-memory client, and the checks every call must pass."""

    def __init__(self, portal: BlockingPortal, client: Client, admin: asyncpg.Connection, tenant_id: uuid.UUID):
        self.portal, self.client, self.admin, self.tenant_id = portal, client, admin, tenant_id
        self.tally = portal.call(tally, admin, tenant_id)
        self.schemas = {tool.name: tool.input_schema for tool in portal.call(client.list_tools).tools}
        self.card_ids = [self.ok("create_card", {**CARD, "content": {"n": n}})["card"]["id"] for n in range(8)]
        self.anchor = self.ok("create_card", {**CARD, "content": {"anchor": True}})["card"]["id"]  # never drawn
        self.valid = {tool: valid_arguments(schema, self.card_ids) for tool, schema in self.schemas.items()}
        self.names = frozenset(name for schema in self.schemas.values() for name in property_names(schema))

    def call(self, tool: str, arguments: dict[str, Any]) -> tuple[str | None, str]:
        """Call ``tool``: the error code (None on success) and the answer's text. Checks that the call added
        exactly one usage row, saying what it answered, and that a failed call wrote nothing else."""
        result = self.portal.call(self.client.call_tool, tool, arguments)
        before, self.tally = self.tally, self.portal.call(tally, self.admin, self.tenant_id)
        assert self.tally.usage == before.usage + 1, "not exactly one usage row"
        if not result.is_error:
            ok(result)
            assert self.tally.last == (tool, "ok", None)
            return None, result.content[0].text  # type: ignore[union-attr]  # the one block is TextContent
        code, text = spec_error(result)
        assert self.tally.last == (tool, "error", code)
        assert self.tally.writes == before.writes, f"{tool} failed with {code} but wrote"
        return code, text

    def ok(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        code, text = self.call(tool, arguments)
        assert code is None, text
        answer: dict[str, Any] = json.loads(text)
        return answer

    def refused(self, tool: str, arguments: dict[str, Any]) -> str:
        """The code of a call that must fail without echoing what it sent (but the names of unexpected keys),
        after which a valid call succeeds."""
        code, text = self.call(tool, arguments)
        assert code is not None, f"{tool} accepted hostile arguments"
        text = without_named_keys(text, arguments, self.names)
        assert MARK not in text, f"{tool} echoed the rejected input: {text}"
        self.ok("search_cards", {"limit": 1})  # the server still serves
        return code


@pytest.fixture(scope="module")
def caller(
    portal: BlockingPortal, admin: asyncpg.Connection, settings: Settings, database: TestDatabase
) -> Iterator[Caller]:
    tenant = f"hostile-{uuid.uuid4().hex[:10]}"
    with portal.wrap_async_context_manager(connect(settings, tenant, client_name="hostile")) as client:
        yield Caller(portal, client, admin, portal.call(tenant_id_of, admin, tenant))


# ---------------------------------------------------------------------------------------------------------------
# 1. Arguments drawn from the published inputSchema.

_FORMATS = {"uuid": st.uuids().map(str)}
# The one pattern of these schemas, "no control characters", is the Unicode category Cc: drawn directly, as the
# regex strategy draws it a character at a time, which took a third of the time of these tests.
_NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


def instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Instances of ``schema``, narrowed to what a test can afford (small contents, batches of at most 5).

    hypothesis-jsonschema draws the strings, numbers and lists of them; objects are built here from their
    properties, because its object strategy fails on this version of hypothesis (``many`` lost ``more()``)."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _INSTANCES:
        _INSTANCES[key] = _instances(schema)
    return _INSTANCES[key]


_INSTANCES: dict[str, st.SearchStrategy[Any]] = {}


def _instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "anyOf" in schema:
        return st.one_of([instances(branch) for branch in schema["anyOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):  # a nullable argument: {"type": ["string", "null"], ...}
        return st.one_of([instances(branch) for branch in branches(schema)])
    if kind == "object" and "properties" not in schema:  # a card's content: any JSON object
        return st.dictionaries(st.text(), _JSON, max_size=4)
    if kind == "object":
        properties: dict[str, Any] = schema["properties"]
        required = set(schema.get("required", ()))
        return st.fixed_dictionaries(
            {name: instances(properties[name]) for name in sorted(required)},
            optional={name: instances(sub) for name, sub in properties.items() if name not in required},
        )
    if kind == "array" and schema["items"].get("type") == "object":
        low, high = schema.get("minItems", 0), min(schema.get("maxItems", 5), 5)
        return st.lists(instances(schema["items"]), min_size=low, max_size=high)
    if kind == "string" and schema.get("pattern") == _NO_CONTROL:
        no_control = st.characters(codec="utf-8", exclude_categories=["Cc"])
        return st.text(no_control, min_size=schema.get("minLength", 0), max_size=schema.get("maxLength"))
    return from_schema(schema, custom_formats=_FORMATS)


def valid_arguments(schema: dict[str, Any], card_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Instances of ``schema`` (card ids: random ones, or ids of this tenant's cards half the time)."""
    strategy: st.SearchStrategy[dict[str, Any]] = instances(schema)
    if "card_id" in schema["properties"]:
        known = st.none() | st.sampled_from(card_ids)
        strategy = st.tuples(strategy, known).map(lambda pair: {**pair[0], "card_id": pair[1] or pair[0]["card_id"]})
    return strategy


def property_names(schema: Any) -> Iterator[str]:
    """The names of the properties ``schema`` declares, at any depth."""
    if isinstance(schema, list):
        for item in schema:
            yield from property_names(item)
    elif isinstance(schema, dict):
        yield from schema.get("properties", {})
        for sub in schema.values():
            yield from property_names(sub)


def _nested(value: Any, depth: int = 1) -> tuple[int, bool]:
    """The nesting depth of ``value`` and whether a NUL appears in any key or string."""
    if isinstance(value, dict):
        inner = [_nested(v, depth + 1) for v in value.values()]
        return max([depth, *(d for d, _ in inner)]), any("\x00" in k for k in value) or any(n for _, n in inner)
    if isinstance(value, list):
        inner = [_nested(v, depth + 1) for v in value]
        return max([depth, *(d for d, _ in inner)]), any(n for _, n in inner)
    return depth, isinstance(value, str) and "\x00" in value


def _bad_card(card: dict[str, Any]) -> bool:
    """Whether a card breaks a rule of SPEC section 2 that its schema cannot express."""
    title, tags, content = card.get("title"), card.get("tags") or [], card.get("content")
    if title is not None and not title.strip():
        return True
    if any(not tag.strip() for tag in tags):
        return True
    if content is None:
        return False
    depth, nul = _nested(content)
    size = len(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    return depth > 32 or nul or size > 64 * 1024


def _impossible_window(arguments: dict[str, Any]) -> bool:
    """Whether usage_stats' window is empty, or a moment of it is outside what the server can represent."""
    try:
        usage.window(arguments.get("since"), arguments.get("until"), now=datetime.now(UTC))
    except InvalidArgument:
        return True
    return False


def breaks_an_unwritten_rule(tool: str, arguments: dict[str, Any]) -> bool:
    """Whether ``arguments``, valid under the schema, break a rule it cannot express (so invalid_argument)."""
    if tool == "batch_create_cards":
        return any(_bad_card(card) for card in arguments["cards"]) or "\x00" in (arguments.get("idempotency_key") or "")
    if tool == "search_cards":  # any cursor a test makes up is not one this server made ("" is none at all)
        return bool(arguments.get("cursor")) or _bad_card({"tags": arguments.get("tags")})
    if tool == "get_card_history":
        return bool(arguments.get("cursor"))
    if tool == "usage_stats":
        return _impossible_window(arguments)
    return _bad_card(arguments)


@pytest.mark.parametrize("tool", ORDER)
@hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_arguments_valid_under_the_schema_succeed_or_fail_with_a_domain_code(
    caller: Caller, tool: str, data: st.DataObject
) -> None:
    arguments = data.draw(caller.valid[tool], label="arguments")
    code, text = caller.call(tool, arguments)
    if breaks_an_unwritten_rule(tool, arguments):
        assert code in DOMAIN_CODES[tool] | {"invalid_argument"}, text
    else:
        assert code is None or code in DOMAIN_CODES[tool], text


_JSON_TYPES = ("string", "integer", "number", "boolean", "null", "array", "object")


def branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives ``schema`` allows: its anyOf, or one schema per type of a nullable ``type`` list."""
    if "anyOf" in schema:
        return list(schema["anyOf"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return [{**schema, "type": one} if one != "null" else {"type": "null"} for one in kind]
    return [schema]


def _types(schema: dict[str, Any]) -> set[str]:
    return {branch.get("type", "any") for branch in branches(schema)}


def _marked_text(min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(max_size=8).map(lambda s: (MARK + s) * (min_size // len(MARK) + 1))


@st.composite
def wrong_type(draw: st.DrawFn, schema: dict[str, Any], value: Any) -> Any:
    """A value of a JSON type ``schema`` does not allow; numbers in a string are among them. (An object or a list
    sent as JSON text where no string is allowed is read as what it spells, as Claude Desktop sends them: see
    test_objects_and_lists_sent_as_json_text_are_read_as_such_and_strings_stay_strings.)"""
    allowed = _types(schema)
    candidates = {
        "string": _marked_text(),
        "integer": st.integers(),
        "number": st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
        "boolean": st.booleans(),
        "null": st.none(),
        "array": st.lists(st.integers() | _marked_text(), max_size=3),
        "object": st.dictionaries(_marked_text(), st.integers(), max_size=3),
    }
    wrong = [candidates[t] for t in _JSON_TYPES if t not in allowed and not (t == "number" and "number" in allowed)]
    if "string" not in allowed and "integer" in allowed:
        wrong.append(st.integers(-100, 100).map(str))  # "10" for 10
    return draw(st.one_of(wrong))


@st.composite
def broken(draw: st.DrawFn, schema: dict[str, Any], value: Any) -> Any:
    """``value`` (valid under ``schema``, or None where it is absent) changed once so that it breaks ``schema``."""
    options: list[st.SearchStrategy[Any]] = [wrong_type(schema, value)]
    for branch in branches(schema):
        kind = branch.get("type")
        current = value if value is not None and kind != "null" else None
        if kind == "string":
            if "maxLength" in branch:
                options.append(_marked_text(branch["maxLength"] + 1))
            if branch.get("minLength", 0) > 0:
                options.append(st.just(""))
            if "enum" in branch or "format" in branch:
                options.append(_marked_text())
            if "pattern" in branch:
                options.append(st.sampled_from("\x00\x07\x1b\x7f\x9f").map(f"{MARK}{{}}{MARK}".format))
        elif kind == "integer":
            if "minimum" in branch:
                options.append(st.integers(max_value=branch["minimum"] - 1))
            if "maximum" in branch:
                options.append(st.integers(min_value=branch["maximum"] + 1))
        elif kind == "array":
            item = instances(branch["items"])
            if "maxItems" in branch:
                options.append(item.map(lambda one, n=branch["maxItems"] + 1: [one] * n))
            if branch.get("minItems", 0) > 0:
                options.append(st.just([]))
            items = current if current else [draw(item)]
            index = draw(st.integers(0, len(items) - 1))
            options.append(broken(branch["items"], items[index]).map(_put_at(items, index)))
        elif kind == "object" and "properties" in branch:
            options.append(broken_object(branch, current if current is not None else draw(instances(branch))))
    return draw(st.one_of(options))


def _put_at(items: list[Any], index: int) -> Callable[[Any], list[Any]]:
    return lambda item: [*items[:index], item, *items[index + 1 :]]


@st.composite
def broken_object(draw: st.DrawFn, schema: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """``value`` with one unknown property, one required property missing, or one property broken."""
    properties: dict[str, Any] = schema["properties"]
    how = draw(st.sampled_from(["unknown", "missing", "broken"] if schema.get("required") else ["unknown", "broken"]))
    if how == "unknown":
        return {**value, draw(_marked_text()): draw(st.integers() | _marked_text())}
    if how == "missing":
        missing = draw(st.sampled_from(schema["required"]))
        return {k: v for k, v in value.items() if k != missing}
    name = draw(st.sampled_from(sorted(properties)))
    return {**value, name: draw(broken(properties[name], value.get(name)))}


@pytest.mark.parametrize("tool", ORDER)
@hypothesis_settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_arguments_invalid_under_the_schema_answer_invalid_argument(
    caller: Caller, tool: str, data: st.DataObject
) -> None:
    schema = caller.schemas[tool]
    valid = data.draw(caller.valid[tool], label="valid")
    arguments = data.draw(broken_object(schema, valid), label="arguments")
    assert caller.refused(tool, arguments) == "invalid_argument"


# ---------------------------------------------------------------------------------------------------------------
# 2. Hand-made: what no schema generator makes.

FIVE_MB = MARK * (5_000_000 // len(MARK))


def nested(levels: int) -> dict[str, Any]:
    """A content object ``levels`` deep."""
    content: dict[str, Any] = {"leaf": MARK}
    for _ in range(levels - 1):
        content = {"a": content}
    return content


def nested_text(levels: int) -> str:
    return '{"a":' * levels + json.dumps(MARK) + "}" * levels


def cursor_of(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def after(score: Any, stamp: Any, card_id: Any, query: str = "") -> str:
    """A cursor shaped like the server's, with the position given."""
    return cursor_of({"q": query, "t": None, "g": None, "after": [score, stamp, card_id]})


@functools.cache
def hostile_cases(card_id: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """What each case sends, by what it is; ``card_id`` is an active card of the tenant."""
    nul, lone = f"{MARK}\x00{MARK}", f"{MARK}\ud800{MARK}"
    now = "2026-01-01T00:00:00+00:00"
    cards = [{**CARD, "title": f"{MARK} {i}", "content": {"i": i}} for i in range(1001)]
    return {
        "NUL in a title": ("create_card", {**CARD, "title": nul}),
        "NUL in a tag": ("create_card", {**CARD, "tags": ["fine", nul]}),
        "NUL in a nested content key": ("create_card", {**CARD, "content": {"a": [{"b": {nul: 1}}]}}),
        "NUL in a nested content value": ("create_card", {**CARD, "content": {"a": [{"b": nul}]}}),
        "NUL in a batch card's content": ("batch_create_cards", {"cards": [CARD, {**CARD, "content": {"x": [nul]}}]}),
        "NUL in a new title": ("update_card", {"card_id": card_id, "title": nul}),
        "NUL in new content": ("update_card", {"card_id": card_id, "content": {"deep": {"er": nul}}}),
        "NUL in a search tag": ("search_cards", {"tags": [nul]}),
        "NUL in an idempotency key": ("batch_create_cards", {"cards": [CARD], "idempotency_key": nul}),
        "a lone surrogate in a title": ("create_card", {**CARD, "title": lone}),
        "a lone surrogate in a tag": ("create_card", {**CARD, "tags": [lone]}),
        "a lone surrogate in a nested content value": ("create_card", {**CARD, "content": {"a": {"b": [lone]}}}),
        "a lone surrogate in new content": ("update_card", {"card_id": card_id, "content": {"a": lone}}),
        "a lone surrogate in a batch card": ("batch_create_cards", {"cards": [{**CARD, "content": {"a": lone}}]}),
        "a lone surrogate in an idempotency key": ("batch_create_cards", {"cards": [CARD], "idempotency_key": lone}),
        "a lone surrogate in a query": ("search_cards", {"query": lone}),
        "a lone surrogate in a search tag": ("search_cards", {"tags": [lone]}),
        "a lone surrogate in a cursor": ("search_cards", {"cursor": lone}),
        "content 33 levels deep": ("create_card", {**CARD, "content": nested(33)}),
        "content 200 levels deep": ("create_card", {**CARD, "content": nested(200)}),
        "new content 200 levels deep": ("update_card", {"card_id": card_id, "content": nested(200)}),
        "content 10,000 levels deep as JSON text": ("create_card", {**CARD, "content": nested_text(10_000)}),
        "a batch card 10,000 levels deep as JSON text": (
            "batch_create_cards",
            {"cards": [{**CARD, "content": nested_text(10_000)}], "idempotency_key": MARK},
        ),
        "a 5 MB string in content": ("create_card", {**CARD, "content": {"text": FIVE_MB}}),
        "a 5 MB string in new content": ("update_card", {"card_id": card_id, "content": {"text": FIVE_MB}}),
        "a 5 MB string in a batch card": ("batch_create_cards", {"cards": [{**CARD, "content": {"t": FIVE_MB}}]}),
        "a 5 MB title": ("create_card", {**CARD, "title": FIVE_MB}),
        "a 5 MB new title": ("update_card", {"card_id": card_id, "title": FIVE_MB}),
        "a 5 MB tag": ("create_card", {**CARD, "tags": [FIVE_MB]}),
        "a 5 MB query": ("search_cards", {"query": FIVE_MB}),
        "a 5 MB cursor": ("search_cards", {"cursor": FIVE_MB}),
        "a 5 MB idempotency key": ("batch_create_cards", {"cards": [CARD], "idempotency_key": FIVE_MB}),
        "a 5 MB card id": ("get_card", {"card_id": FIVE_MB}),
        "a limit as a string": ("search_cards", {"limit": "10"}),
        "a usage limit as a string": ("usage_stats", {"limit": "5"}),
        "an expected version as a string": ("update_card", {"card_id": card_id, "expected_version": "1"}),
        "a limit as a boolean": ("search_cards", {"limit": True}),
        "a limit with a fraction": ("search_cards", {"limit": 10.5}),
        "a limit of a googol": ("search_cards", {"limit": 10**100}),
        "since as a number": ("usage_stats", {"since": 1_700_000_000}),
        "a batch of 1001 cards": ("batch_create_cards", {"cards": cards}),
        "an unknown argument": ("create_card", {**CARD, f"{MARK}_field": 1}),
        "a tenant_id argument": ("create_card", {**CARD, "tenant_id": str(uuid.uuid4())}),
        "an unknown field in a batch card": ("batch_create_cards", {"cards": [{**CARD, f"{MARK}_field": 1}]}),
        "an unknown argument to usage_stats": ("usage_stats", {f"{MARK}": MARK}),
        "a missing card_type": ("create_card", {"title": MARK, "content": {}}),
        "a card id as a number": ("get_card", {"card_id": 12345}),
        "a card id to update as a number": ("update_card", {"card_id": 12345, "title": MARK}),
        "a card id to delete as a number": ("delete_card", {"card_id": 12345}),
        "cards as an object": ("batch_create_cards", {"cards": {**CARD, "title": MARK}}),
        "tags as a string": ("create_card", {**CARD, "tags": MARK}),
        "search tags as a string": ("search_cards", {"tags": MARK}),
        "new tags as a string": ("update_card", {"card_id": card_id, "tags": MARK}),
        "content as a list": ("create_card", {**CARD, "content": [MARK]}),
        "a title as a number": ("create_card", {**CARD, "title": 42}),
        "a card type not in the enum": ("create_card", {**CARD, "card_type": MARK}),
        "a card id that is a word": ("get_card", {"card_id": MARK}),
        "an empty card id": ("get_card", {"card_id": ""}),
        "a card id one digit too long": ("delete_card", {"card_id": str(uuid.uuid4()) + "0"}),
        "a card id one digit short": ("update_card", {"card_id": str(uuid.uuid4())[:-1], "title": "x"}),
        "a card id of non-hex letters": ("get_card", {"card_id": "zzzzzzzz-zzzz-zzzz-zzzz-zzzzzzzzzzzz"}),
        "a card id with a NUL": ("get_card", {"card_id": str(uuid.uuid4())[:-1] + "\x00"}),
        "a cursor that is a word": ("search_cards", {"cursor": MARK}),
        "a cursor of punctuation": ("search_cards", {"cursor": "%%%" + MARK}),
        "a cursor that is not ASCII": ("search_cards", {"cursor": MARK + "é"}),
        "a cursor of padding only": ("search_cards", {"cursor": "========"}),
        "a cursor of invalid UTF-8": ("search_cards", {"cursor": cursor_of(b"\xff\xfe" + MARK.encode())}),
        "a cursor nested 1400 levels deep": ("search_cards", {"cursor": cursor_of(b"[" * 1400)}),
        "a cursor that is a JSON list": ("search_cards", {"cursor": cursor_of([MARK, 1, 2])}),
        "a cursor that is a JSON string": ("search_cards", {"cursor": cursor_of(MARK)}),
        "a cursor with a 400-digit score": ("search_cards", {"cursor": after(10**400, now, str(uuid.uuid4()))}),
        "a cursor before year 1 in UTC": ("search_cards", {"cursor": after(0, "0001-01-01T00:00:00+14:00", card_id)}),
        "a cursor with a word for a time": ("search_cards", {"cursor": after(0, MARK, card_id)}),
        "a cursor with a word for an id": ("search_cards", {"cursor": after(0, now, MARK)}),
        "a cursor with a list for a score": ("search_cards", {"cursor": after([MARK], now, card_id)}),
        "a cursor of another search": ("search_cards", {"query": "voice", "cursor": after(0, now, card_id, "other")}),
        "an until 30 days after year 1 began": ("usage_stats", {"until": "0001-01-05T00:00:00Z"}),
        "a since before year 1 in UTC": ("usage_stats", {"since": "0001-01-01T00:00:00+14:00"}),
        "an until after year 9999 in UTC": ("usage_stats", {"until": "9999-12-31T23:59:59-14:00"}),
        "a since in year 0": ("usage_stats", {"since": "0000-06-01T00:00:00Z"}),
        "a since after the until": ("usage_stats", {"since": now, "until": "2025-01-01T00:00:00Z"}),
        "a since that is a word": ("usage_stats", {"since": MARK}),
        "a group_by not in the enum": ("usage_stats", {"group_by": MARK}),
    }


CASES = list(hostile_cases(str(uuid.UUID(int=0))))


def unexpected_keys(value: Any, names: frozenset[str]) -> Iterator[str]:
    """Every key in ``value``, at any depth, that no schema declares."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in names:
                yield key
            yield from unexpected_keys(item, names)
    elif isinstance(value, list):
        for item in value:
            yield from unexpected_keys(item, names)


def without_named_keys(text: str, arguments: dict[str, Any], names: frozenset[str]) -> str:
    """``text`` without the unexpected keys it names, quoted, as the server names them (a key is the client's own
    name, not a value: SPEC section 4 lets the answer name it, so a model can fix its call)."""
    for key in unexpected_keys(arguments, names):
        if NAMEABLE.fullmatch(key):
            text = text.replace(f"'{key}'", "")
    return text


def leaves(value: Any, names: frozenset[str] = frozenset()) -> Iterator[str]:
    """Every string in ``value``, keys included but for the argument ``names``."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in names:
                yield key
            yield from leaves(item, names)
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item, names)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("case", CASES)
def test_hostile_arguments_are_refused_with_invalid_argument_and_write_nothing(caller: Caller, case: str) -> None:
    tool, arguments = hostile_cases(caller.anchor)[case]
    code, text = caller.call(tool, arguments)
    assert code == "invalid_argument", text
    text = without_named_keys(text, arguments, caller.names)
    for leaf in leaves(arguments, caller.names):  # not even the start of a rejected value comes back
        assert len(leaf) < 12 or leaf[:12] not in text, f"{case}: the answer echoes {leaf[:12]!r}"
    assert MARK not in text
    caller.ok("search_cards", {"limit": 1})  # the next valid call succeeds


def test_content_nested_ten_thousand_levels_deep_as_an_argument_never_reaches_a_card(caller: Caller) -> None:
    """The SDK's client refuses to serialize it, so nothing is sent (the stdio tests send it as raw JSON, which the
    server's JSON parser refuses at 200 levels); were it sent, it would be refused as too deep."""
    try:
        code, _ = caller.call("create_card", {**CARD, "content": nested(10_000)})
    except ValueError as exc:
        assert "depth" in str(exc)  # "Maximum serialization depth exceeded", raised before anything is sent
        assert caller.portal.call(tally, caller.admin, caller.tenant_id) == caller.tally
    else:
        assert code == "invalid_argument"
    caller.ok("search_cards", {"limit": 1})


def test_objects_and_lists_sent_as_json_text_are_read_as_such_and_strings_stay_strings(caller: Caller) -> None:
    """Claude Desktop sends objects and lists as JSON text: where the schema allows no string (content, tags,
    cards) the text is read as what it spells; where it allows one, a string is kept as sent."""
    card = caller.ok("create_card", {**CARD, "content": json.dumps({"lenient": 1}), "tags": json.dumps(["a", "b"])})
    assert (card["card"]["content"], card["card"]["tags"]) == ({"lenient": 1}, ["a", "b"])
    batch = caller.ok("batch_create_cards", {"cards": json.dumps([{**CARD, "content": {"lenient": 2}}])})
    assert batch["created"] == 1
    caller.ok("search_cards", {"query": "[1]"})  # a query, not a list
    renamed = caller.ok("update_card", {"card_id": card["card"]["id"], "title": '{"a": 1}'})
    assert renamed["card"]["title"] == '{"a": 1}'
    keyed = caller.ok("batch_create_cards", {"cards": [{**CARD, "content": {"lenient": 3}}], "idempotency_key": "[1]"})
    assert keyed["created"] == 1
    assert caller.refused("create_card", {**CARD, "content": json.dumps([MARK])}) == "invalid_argument"  # a list


def test_a_nul_in_a_search_query_is_dropped_like_any_other_non_word_character(caller: Caller) -> None:
    caller.ok("search_cards", {"query": f"voice\x00{MARK}"})
    caller.ok("search_cards", {"query": "\x00"})


def test_a_thousand_card_batch_whose_last_card_is_bad_writes_none_and_then_saves_all(caller: Caller) -> None:
    cards = [{**CARD, "title": f"Bulk {i}", "content": {"bulk": i, "of": 1000}} for i in range(1000)]
    bad = [*cards[:-1], {**cards[-1], "content": {"bulk": f"{MARK}\x00"}}]
    for key in (None, "bulk-key"):
        arguments: dict[str, Any] = {"cards": bad} | ({"idempotency_key": key} if key else {})
        assert caller.refused("batch_create_cards", arguments) == "invalid_argument"
    saved = caller.ok("batch_create_cards", {"cards": cards, "idempotency_key": "bulk-key"})
    assert (saved["created"], saved["existing"], saved["replayed"]) == (1000, 0, False)


# ---------------------------------------------------------------------------------------------------------------
# 3. Raw bytes on the stdin of a real `card-mcp serve`, on the tests' database.

WAIT = 60.0  # seconds: a generous bound on any one answer, so that a test fails rather than hangs


class Serve:
    """A `card-mcp serve` subprocess spoken to in bytes. A thread reads its stdout line by line and another
    writes its stdin, so every wait has a timeout."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.next_id = 1000
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")  # end of output

    def send(self, raw: bytes) -> None:
        def write() -> None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(raw)
            self.proc.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join(WAIT)
        assert not writer.is_alive(), "the server stopped reading its stdin"

    def request(self, method: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        self.send(
            json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}).encode() + b"\n"
        )
        return self.next_id

    def answer(self, request_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The response to ``request_id``, and the other responses that came before it."""
        others = []
        while True:
            try:
                line = self.lines.get(timeout=WAIT)
            except queue.Empty:
                raise AssertionError(f"no answer to request {request_id} within {WAIT}s") from None
            assert line, f"the server closed its stdout (exit status {self.proc.poll()})"
            message = json.loads(line)
            if message.get("id") == request_id:
                return message, others
            if "id" in message:  # notifications (log messages) are no answers
                others.append(message)

    def serves(self) -> None:
        """A valid call is answered, and succeeds."""
        response, others = self.answer(self.request("tools/call", {"name": "search_cards", "arguments": {"limit": 1}}))
        assert others == [], others
        result = response["result"]
        assert result.get("isError") is not True, result
        assert json.loads(result["content"][0]["text"]) == result["structuredContent"]

    def stop(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            return self.proc.wait(WAIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.reader.join(WAIT)
            self.proc.stdout.close()


@dataclass
class Stdio:
    serve: Serve
    portal: BlockingPortal
    admin: asyncpg.Connection
    tenant_id: uuid.UUID

    def tally(self) -> Tally:
        return self.portal.call(tally, self.admin, self.tenant_id)


@pytest.fixture(scope="module")
def stdio(portal: BlockingPortal, admin: asyncpg.Connection, database: TestDatabase) -> Iterator[Stdio]:
    """One `card-mcp serve` for the module, initialized, serving a tenant of its own on the tests' database."""
    folder = make_tempdir("card-mcp-hostile-")
    tenant = f"hostile-stdio-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_DATA_DIR": str(folder),
        "CARD_MCP_TENANT": tenant,
    }
    with (folder / "stderr.log").open("wb") as log:
        proc = subprocess.Popen([CARD_MCP, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env)
    serve = Serve(proc)
    try:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
        response, _ = serve.answer(serve.request("initialize", hello))
        assert "result" in response, response
        serve.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        yield Stdio(serve, portal, admin, portal.call(tenant_id_of, admin, tenant))
    finally:
        try:
            assert serve.stop() == 0, (folder / "stderr.log").read_text()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def tools_call(tool: str, arguments: str) -> bytes:
    """A tools/call line (id 7) with ``arguments`` written as raw JSON text."""
    return b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "%s", "arguments": %s}}\n' % (
        tool.encode(),
        arguments.encode(),
    )


CREATE = '{"card_type": "voice", "title": "Raw", "content": %s}'
NESTED = '{"a":' * 10_000 + "1" + "}" * 10_000
# Lines that are no tool call, and the JSON-RPC error each gets (None: no answer, for a blank line). A line that
# cannot be read has no id to answer to: its error has id null.
NOT_CALLS: dict[str, tuple[bytes, int | None]] = {
    "an empty line": (b"\n", None),
    "a garbage line": (b"this is not JSON " + MARK.encode() + b"\n", -32700),
    "half a JSON line": (
        b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "get_ca\n',
        -32700,
    ),
    "bytes that are not UTF-8": (b"\xff\xfe\xc3\x28\xa0\xa1 " + MARK.encode() + b"\n", -32700),
    "a JSON object that is not JSON-RPC": (b'{"hello": "world"}\n', -32600),
    "a JSON list": (b"[1, 2, 3]\n", -32600),
    "a JSON number": (b"42\n", -32600),
    "a request whose method is a number": (b'{"jsonrpc": "2.0", "id": 7, "method": 42}\n', -32600),
    "a call nested 10,000 levels deep": (tools_call("create_card", CREATE % NESTED), -32700),
    "a call with an escaped lone surrogate": (tools_call("create_card", CREATE % '{"a": "\\ud800"}'), -32700),
    "a request of an unknown method": (b'{"jsonrpc": "2.0", "id": 7, "method": "cards/steal"}\n', -32601),
    "a call of an unknown tool": (tools_call("steal_cards", "{}"), -32602),
    "a call whose arguments are a list": (tools_call("get_card", "[1, 2]"), -32602),
}


@pytest.mark.parametrize("case", list(NOT_CALLS))
def test_stdio_lines_that_are_no_tool_call_get_their_json_rpc_error_and_the_server_serves_on(
    stdio: Stdio, case: str
) -> None:
    line, expected = NOT_CALLS[case]
    before = stdio.tally()
    stdio.serve.send(line)
    probe = stdio.serve.request("tools/call", {"name": "search_cards", "arguments": {"limit": 1}})
    answer, others = stdio.serve.answer(probe)
    assert answer["result"].get("isError") is not True, answer
    codes = [other["error"]["code"] for other in others]  # what the line itself got
    assert codes == ([] if expected is None else [expected]), others
    assert MARK not in json.dumps(others)
    after = stdio.tally()
    assert after.usage == before.usage + 1 and after.writes == before.writes  # the probe's row alone


# Tool calls with bad arguments no SDK client sends: an invalid_argument result in the shape of SPEC section 4.
BAD_CALLS = {
    "NaN in content": tools_call("create_card", CREATE % '{"x": NaN}'),
    "Infinity in content": tools_call("create_card", CREATE % '{"x": [1, Infinity]}'),
    "-Infinity in content": tools_call("create_card", CREATE % '{"x": {"y": -Infinity}}'),
    "a number too large for a double in content": tools_call("create_card", CREATE % '{"x": 1e400}'),
    "NaN as a limit": tools_call("search_cards", '{"limit": NaN}'),
    "Infinity as a limit": tools_call("search_cards", '{"limit": Infinity}'),
    "-Infinity as an expected version": tools_call(
        "update_card", f'{{"card_id": "{uuid.UUID(int=1)}", "expected_version": -Infinity}}'
    ),
    "content 150 levels deep": tools_call("create_card", CREATE % ('{"a":' * 150 + "1" + "}" * 150)),
    "a 10 MB line": tools_call("create_card", CREATE % json.dumps({"text": MARK * (10_000_000 // len(MARK))})),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_stdio_tool_calls_with_bad_arguments_get_an_invalid_argument_result_and_the_server_serves_on(
    stdio: Stdio, case: str
) -> None:
    before = stdio.tally()
    stdio.serve.send(BAD_CALLS[case])
    answer, others = stdio.serve.answer(7)
    assert others == [], others
    result = answer["result"]
    assert result["isError"] is True and len(result["content"]) == 1, result
    text = result["content"][0]["text"]
    payload = json.loads(text)
    assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message", "hint"}
    assert payload["error"]["code"] == "invalid_argument" and payload["error"]["hint"], text
    assert MARK not in text
    after = stdio.tally()
    assert after.usage == before.usage + 1 and after.writes == before.writes
    assert after.last == (json.loads(BAD_CALLS[case])["params"]["name"], "error", "invalid_argument")
    stdio.serve.serves()


def test_stdio_bytes_that_are_not_utf8_inside_a_title_are_saved_as_replacement_characters(stdio: Stdio) -> None:
    """The SDK reads stdin with errors="replace": the call is a valid one, with U+FFFD where the bytes were."""
    stdio.serve.send(tools_call("create_card", CREATE % "{}").replace(b'"Raw"', b'"Raw \xff\xfe"'))
    answer, _ = stdio.serve.answer(7)
    assert answer["result"]["structuredContent"]["card"]["title"] == "Raw \ufffd\ufffd"
    stdio.serve.serves()
