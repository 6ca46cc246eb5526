"""Tenant isolation as a property: hypothesis drives random sequences of every tool across three tenants, each
through its own server and in-memory client, and checks every answer against a model of what that tenant should
see. At the end of each sequence the database must equal the model exactly: each tenant's cards, their versions,
their history (every version row) and their usage rows.

The ids a rule picks come from every tenant's cards (deleted ones too) and from nowhere, so a call with another
tenant's id is as likely as one with its own; idempotency keys and contents are drawn from small pools shared by
the tenants, so the same key and the same content meet in different tenants all the time.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import anyio.abc
import anyio.from_thread
import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test
from mcp import Client
from mcp.types import CallToolResult

from card_mcp import db
from card_mcp.config import Settings

from .conftest import TestDatabase
from .test_server import connect

TENANTS = 3
TYPES = ("company", "audience", "voice", "insight")
WORDS = ("harbor", "lantern", "meadow", "copper", "violet")
TITLES = tuple(f"{w} card" for w in WORDS)
CONTENTS = tuple({"text": f"{w} notes", "n": n} for w in WORDS[:3] for n in range(2))
TAGS = ("spring", "core", "b2b")
KEYS = ("key-1", "key-2", "key-3")


def content_hash(content: dict[str, Any]) -> str:
    return hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    ).hexdigest()


def unique(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


@dataclass
class ModelCard:
    id: str
    card_type: str
    title: str
    content: dict[str, Any]
    tags: list[str]
    version: int = 1
    active: bool = True
    deleted_at: str | None = None  # as the first acknowledged delete answered it
    history: list[tuple[int, str, str, dict[str, Any], list[str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.history:
            self.keep("create")

    def keep(self, op: str) -> None:
        """The version row the card's last change wrote: (version, op, title, content, tags)."""
        self.history.append((self.version, op, self.title, self.content, self.tags))

    @property
    def digest(self) -> str:
        return content_hash(self.content)

    def matches(self, card: dict[str, Any]) -> bool:
        seen = {k: card[k] for k in ("id", "card_type", "title", "content", "tags", "version")}
        return (
            seen
            == {
                "id": self.id,
                "card_type": self.card_type,
                "title": self.title,
                "content": self.content,
                "tags": self.tags,
                "version": self.version,
            }
            and card["content_hash"] == self.digest
        )


@dataclass
class Tenant:
    name: str
    client: Client
    cards: dict[str, ModelCard] = field(default_factory=dict)
    keys: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = field(default_factory=dict)  # key: (cards, answer)
    calls: Counter[tuple[str, str | None]] = field(default_factory=Counter)  # (tool, error code or None)

    def active(self) -> list[ModelCard]:
        return [c for c in self.cards.values() if c.active]

    def holding(self, card_type: str, digest: str) -> ModelCard | None:
        return next((c for c in self.active() if c.card_type == card_type and c.digest == digest), None)


class Portal:
    """An event loop in a thread of its own with one connected client per tenant: hypothesis's rules are plain
    functions and call the tools through it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._cm.__enter__()

    def clients(self, names: list[str]) -> tuple[list[Client], Callable[[], None]]:
        """Connected clients for ``names``, and the function that disconnects them. The clients live in one
        task of the portal's loop from start to end: a client's cancel scope must be left in the task that
        entered it."""

        async def hold(*, task_status: anyio.abc.TaskStatus[tuple[list[Client], anyio.Event]]) -> None:
            done = anyio.Event()
            async with AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(connect(self.settings, name)) for name in names]
                task_status.started((clients, done))
                await done.wait()

        future, (clients, done) = self.portal.start_task(hold)

        def close() -> None:
            self.portal.call(done.set)
            future.result()

        return clients, close

    def call(self, client: Client, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        async def call() -> CallToolResult:
            return await client.call_tool(tool, arguments)

        return self.portal.call(call)

    def run(self, func: Any, *args: Any) -> Any:
        return self.portal.call(func, *args)

    def close(self) -> None:
        self._cm.__exit__(None, None, None)


PORTAL: Portal | None = None
TALLY: Counter[str] = Counter()  # across all sequences: calls, and calls that named another tenant's card
DATABASE: TestDatabase | None = None


def answer(result: CallToolResult) -> tuple[dict[str, Any] | None, str | None]:
    """(structured content, None) for a success; (None, error code) for a failure in SPEC section 4's shape."""
    text = result.content[0].text  # type: ignore[union-attr]
    payload = json.loads(text)
    if result.is_error:
        assert set(payload) == {"error"} and set(payload["error"]) == {"code", "message", "hint"}
        code: str = payload["error"]["code"]
        return None, code
    assert payload == result.structured_content
    return payload, None


def restored_version(mine: ModelCard | None, which: int) -> int | None:
    """The version a restore asks for, by ``which`` (0-9): 0 none (undelete only), 9 one the card never
    had, else one of its versions (any number for a card that is not the tenant's). Drawn as an index, not as a
    version number, so that how often a restore finds its version does not depend on which numbers hypothesis
    favours (it also draws constants from the source of the modules loaded so far)."""
    if which == 0:
        return None
    if mine is None:
        return which
    if which == 9:
        return mine.version + 1
    return mine.history[which % len(mine.history)][0]


card_types = st.sampled_from(TYPES)
titles = st.sampled_from(TITLES)
contents = st.sampled_from(CONTENTS)
tag_lists = st.lists(st.sampled_from(TAGS), max_size=4)  # duplicates on purpose: the server removes them
new_cards = st.fixed_dictionaries({"card_type": card_types, "title": titles, "content": contents, "tags": tag_lists})
tenant_index = st.integers(0, TENANTS - 1)
picks = st.integers(0, 10**6)


class Tenants(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert PORTAL is not None
        self.portal = PORTAL
        run = uuid.uuid4().hex[:8]
        names = [f"iso-{run}-{i}" for i in range(TENANTS)]
        clients, self.disconnect = PORTAL.clients(names)
        self.tenants = [Tenant(name, client) for name, client in zip(names, clients, strict=True)]

    # -- helpers --------------------------------------------------------------------------------------------

    def call(self, t: Tenant, tool: str, arguments: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        result, code = answer(self.portal.call(t.client, tool, arguments))
        t.calls[(tool, code)] += 1
        TALLY["calls"] += 1
        card_id = arguments.get("card_id")
        if card_id is not None and any(card_id in other.cards for other in self.tenants if other is not t):
            TALLY["foreign"] += 1
        assert code != "internal"
        if tool in ("restore_card", "get_card_history"):  # how often the new tools did their work
            TALLY[f"{tool}:{code or 'ok'}"] += 1
        return result, code

    def any_id(self, t: Tenant, pick: int) -> str:
        """Half the time another tenant's card, else one of ``t``'s own (deleted ones too) or one that exists
        nowhere."""
        own = sorted(t.cards)
        foreign = sorted(card_id for other in self.tenants if other is not t for card_id in other.cards)
        choice = {0: own, 1: foreign, 2: foreign}.get(pick % 4, [])
        choice = choice or own or foreign
        if not choice or pick % 4 == 3:
            return str(uuid.UUID(int=pick))
        return choice[pick // 4 % len(choice)]

    def mostly_own_id(self, t: Tenant, pick: int) -> str:
        """Two times in three one of ``t``'s own cards (deleted ones too), else any_id: history and restore need
        cards with a past, which the tenants' own cards have."""
        own = sorted(t.cards)
        if own and pick % 3:
            return own[pick // 3 % len(own)]
        return self.any_id(t, pick // 3)

    # -- rules: every tool ----------------------------------------------------------------------------------

    @rule(i=tenant_index, card=new_cards)
    def create_card(self, i: int, card: dict[str, Any]) -> None:
        t = self.tenants[i]
        result, code = self.call(t, "create_card", card)
        assert code is None and result is not None
        held = t.holding(card["card_type"], content_hash(card["content"]))
        if held is not None:
            assert result["status"] == "existing"
            assert held.matches(result["card"])
            return
        assert result["status"] == "created"
        made = ModelCard(result["card"]["id"], card["card_type"], card["title"], card["content"], unique(card["tags"]))
        assert made.id not in {c for other in self.tenants for c in other.cards}
        assert made.matches(result["card"])
        t.cards[made.id] = made

    @rule(i=tenant_index, cards=st.lists(new_cards, min_size=1, max_size=5), key=st.none() | st.sampled_from(KEYS))
    def batch_create_cards(self, i: int, cards: list[dict[str, Any]], key: str | None) -> None:
        t = self.tenants[i]
        arguments: dict[str, Any] = {"cards": cards, "idempotency_key": key}
        result, code = self.call(t, "batch_create_cards", arguments)
        if key is not None and key in t.keys:
            sent, stored = t.keys[key]
            if sent != [{**c, "tags": unique(c["tags"])} for c in cards]:
                assert code == "idempotency_conflict"
                return
            assert code is None and result is not None
            assert result == {**stored, "replayed": True}
            return
        assert code is None and result is not None
        assert not result["replayed"]
        assert [r["index"] for r in result["results"]] == list(range(len(cards)))
        for card, item in zip(cards, result["results"], strict=True):
            held = t.holding(card["card_type"], content_hash(card["content"]))
            if held is not None:
                assert item == {"index": item["index"], "status": "existing", "card_id": held.id}
                continue
            assert item["status"] == "created"
            t.cards[item["card_id"]] = ModelCard(
                item["card_id"], card["card_type"], card["title"], card["content"], unique(card["tags"])
            )
        assert result["created"] == sum(r["status"] == "created" for r in result["results"])
        assert result["existing"] == len(cards) - result["created"]
        if key is not None:
            t.keys[key] = ([{**c, "tags": unique(c["tags"])} for c in cards], result)

    @rule(i=tenant_index, pick=picks)
    def get_card(self, i: int, pick: int) -> None:
        t = self.tenants[i]
        card_id = self.any_id(t, pick)
        result, code = self.call(t, "get_card", {"card_id": card_id})
        mine = t.cards.get(card_id)
        if mine is None or not mine.active:
            assert code == "not_found"
            return
        assert result is not None and mine.matches(result["card"])

    @rule(
        i=tenant_index,
        pick=picks,
        title=st.none() | titles,
        content=st.none() | contents,
        tags=st.none() | tag_lists,
        stale=st.booleans(),
    )
    def update_card(
        self,
        i: int,
        pick: int,
        title: str | None,
        content: dict[str, Any] | None,
        tags: list[str] | None,
        stale: bool,
    ) -> None:
        t = self.tenants[i]
        card_id = self.any_id(t, pick)
        mine = t.cards.get(card_id)
        expected = None
        if mine is not None and pick % 3 == 0:
            expected = mine.version + 1 if stale else mine.version
        arguments = {"card_id": card_id, "title": title, "content": content, "tags": tags, "expected_version": expected}
        result, code = self.call(t, "update_card", arguments)
        if mine is None or not mine.active:
            assert code == "not_found"
            return
        if expected is not None and expected != mine.version:
            assert code == "conflict"
            return
        new = (
            mine.title if title is None else title,
            mine.content if content is None else content,
            mine.tags if tags is None else unique(tags),
        )
        if content is not None and content_hash(content) != mine.digest:
            other = t.holding(mine.card_type, content_hash(content))
            if other is not None:
                assert code == "duplicate_content"
                return
        assert code is None and result is not None
        if new != (mine.title, mine.content, mine.tags):
            mine.title, mine.content, mine.tags = new
            mine.version += 1
            mine.keep("update")
        assert mine.matches(result["card"])

    @rule(i=tenant_index, pick=picks)
    def delete_card(self, i: int, pick: int) -> None:
        t = self.tenants[i]
        card_id = self.any_id(t, pick)
        result, code = self.call(t, "delete_card", {"card_id": card_id})
        mine = t.cards.get(card_id)
        if mine is None:
            assert code == "not_found"
            return
        assert code is None and result is not None and result["card_id"] == card_id
        if not mine.active:  # deleted before: answered as the first delete was, no new version
            assert result["deleted_at"] == mine.deleted_at
            return
        mine.active, mine.deleted_at = False, result["deleted_at"]
        mine.version += 1  # a delete is a version too
        mine.keep("delete")

    @rule(i=tenant_index, pick=picks, limit=st.integers(1, 4))
    def get_card_history(self, i: int, pick: int, limit: int) -> None:
        """Exactly the card's versions, newest first, page by page; not_found for another tenant's card."""
        t = self.tenants[i]
        card_id = self.mostly_own_id(t, pick)
        mine = t.cards.get(card_id)
        seen: list[tuple[int, str, str, dict[str, Any], list[str]]] = []
        cursor = None
        while True:
            arguments = {"card_id": card_id, "limit": limit, "cursor": cursor}
            result, code = self.call(t, "get_card_history", arguments)
            if mine is None:
                assert code == "not_found"
                return
            assert code is None and result is not None and len(result["versions"]) <= limit
            seen += [(v["version"], v["op"], v["title"], v["content"], v["tags"]) for v in result["versions"]]
            cursor = result["next_cursor"]
            if cursor is None:
                break
        assert seen == mine.history[::-1]

    @rule(i=tenant_index, pick=picks, which=st.integers(0, 9), stale=st.booleans())
    def restore_card(self, i: int, pick: int, which: int, stale: bool) -> None:
        t = self.tenants[i]
        card_id = self.mostly_own_id(t, pick)
        mine = t.cards.get(card_id)
        version = restored_version(mine, which)
        expected = None
        if mine is not None and pick % 5 == 0:
            expected = mine.version + 1 if stale else mine.version
        arguments = {"card_id": card_id, "version": version, "expected_version": expected}
        result, code = self.call(t, "restore_card", arguments)
        if mine is None:
            assert code == "not_found"
            return
        target = (mine.title, mine.content, mine.tags)
        if version is not None:
            kept = [h for h in mine.history if h[0] == version]
            if not kept:
                assert code == "invalid_argument"
                return
            target = (kept[0][2], kept[0][3], kept[0][4])
        if mine.active and target == (mine.title, mine.content, mine.tags):
            assert code is None and result is not None and mine.matches(result["card"])
            return
        if expected is not None and expected != mine.version:
            assert code == "conflict"
            return
        if not mine.active or content_hash(target[1]) != mine.digest:
            other = t.holding(mine.card_type, content_hash(target[1]))
            if other is not None and other is not mine:
                assert code == "duplicate_content"
                return
        assert code is None and result is not None
        mine.title, mine.content, mine.tags = target
        mine.active, mine.deleted_at = True, None
        mine.version += 1
        mine.keep("restore")
        assert mine.matches(result["card"])

    @rule(
        i=tenant_index, card_type=st.none() | card_types, tags=st.none() | st.lists(st.sampled_from(TAGS), max_size=2)
    )
    def list_cards(self, i: int, card_type: str | None, tags: list[str] | None) -> None:
        """search_cards without a query, page by page: exactly the tenant's active cards that match."""
        t = self.tenants[i]
        found: list[str] = []
        cursor = None
        while True:
            arguments = {"card_type": card_type, "tags": tags, "limit": 3, "cursor": cursor}
            result, code = self.call(t, "search_cards", arguments)
            assert code is None and result is not None
            for card in result["cards"]:
                assert t.cards[card["id"]].matches(card)
            found += [card["id"] for card in result["cards"]]
            cursor = result["next_cursor"]
            if cursor is None:
                break
        wanted = {
            c.id
            for c in t.active()
            if (card_type is None or c.card_type == card_type) and set(tags or ()) <= set(c.tags)
        }
        assert len(found) == len(set(found))
        assert set(found) == wanted

    @rule(i=tenant_index, word=st.sampled_from(WORDS))
    def search_cards(self, i: int, word: str) -> None:
        """A query finds only the tenant's own active cards, and every one whose title holds the word."""
        t = self.tenants[i]
        result, code = self.call(t, "search_cards", {"query": word, "limit": 50})
        assert code is None and result is not None
        for card in result["cards"]:
            mine = t.cards.get(card["id"])
            assert mine is not None and mine.active and mine.matches(card)
        titled = {c.id for c in t.active() if word in c.title}
        assert titled <= {card["id"] for card in result["cards"]}

    @rule(i=tenant_index)
    def usage_stats(self, i: int) -> None:
        """The tenant's figures count its own calls, every one, and nobody else's."""
        t = self.tenants[i]
        before = Counter[str]()
        for (tool, _code), n in t.calls.items():
            before[tool] += n
        result, code = self.call(t, "usage_stats", {"group_by": "tool", "limit": 100})
        assert code is None and result is not None
        assert {row["key"]: row["calls"] for row in result["rows"]} == dict(before)

    # -- the end: the database equals the model ---------------------------------------------------------------

    def teardown(self) -> None:
        try:
            assert DATABASE is not None
            rows = self.portal.run(database_state, DATABASE, [t.name for t in self.tenants])
            for t in self.tenants:
                cards, usage, versions = rows[t.name]
                assert cards == {
                    c.id: (c.card_type, c.title, c.content, c.tags, c.version, c.digest, c.active)
                    for c in t.cards.values()
                }
                assert usage == {key: n for key, n in t.calls.items() if n}
                assert versions == {c.id: c.history for c in t.cards.values()}
        finally:
            self.disconnect()


State = tuple[dict[str, tuple[Any, ...]], dict[tuple[str, str | None], int], dict[str, list[tuple[Any, ...]]]]


async def database_state(database: TestDatabase, names: list[str]) -> dict[str, State]:
    """Each tenant's cards, usage-row counts and version rows, read past row-level security as the admin role."""
    conn: asyncpg.Connection = await db.connect(database.admin_url)
    try:
        state: dict[str, State] = {}
        for name in names:
            tenant_id = await conn.fetchval("SELECT tenant_id FROM card_mcp.tenants WHERE name = $1", name)
            cards = await conn.fetch(
                "SELECT id, card_type, title, content, tags, version, content_hash, is_active"
                " FROM card_mcp.cards WHERE tenant_id = $1",
                tenant_id,
            )
            usage = await conn.fetch(
                "SELECT tool, error_code, count(*) AS n FROM card_mcp.card_usage WHERE tenant_id = $1"
                " GROUP BY tool, error_code",
                tenant_id,
            )
            versions: dict[str, list[tuple[Any, ...]]] = {}
            for r in await conn.fetch(
                "SELECT card_id, version, op, title, content, tags FROM card_mcp.card_versions WHERE tenant_id = $1"
                " ORDER BY card_id, version",
                tenant_id,
            ):
                versions.setdefault(str(r["card_id"]), []).append(
                    (r["version"], r["op"], r["title"], r["content"], list(r["tags"]))
                )
            state[name] = (
                {
                    str(r["id"]): (
                        r["card_type"],
                        r["title"],
                        json.loads(r["content"]) if isinstance(r["content"], str) else r["content"],
                        list(r["tags"]),
                        r["version"],
                        r["content_hash"],
                        r["is_active"],
                    )
                    for r in cards
                },
                {(r["tool"], r["error_code"]): r["n"] for r in usage},
                versions,
            )
        return state
    finally:
        await conn.close()


@pytest.fixture
def portal(database: TestDatabase, settings: Settings) -> Iterator[Portal]:
    global PORTAL, DATABASE
    PORTAL, DATABASE = Portal(settings), database
    try:
        yield PORTAL
    finally:
        PORTAL.close()
        PORTAL = DATABASE = None


def test_random_sequences_of_every_tool_across_three_tenants_match_each_tenants_model(portal: Portal) -> None:
    TALLY.clear()
    run_state_machine_as_test(
        Tenants,
        settings=settings(
            derandomize=True,
            max_examples=50,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
            phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its whole sequence at once
        ),
    )
    # The property is only as strong as the sequences: they must have tried other tenants' cards, often.
    # (Which card a pick names depends on the order of random ids: the counts vary a little from run to run.)
    # Seen 2,653-2,823 calls and 166-259 naming another tenant's card (2026-12-03; 289-360 earlier): the ids drawn
    # are random UUIDs, and the share of steps that find another tenant's card already made varies with them.
    assert TALLY["calls"] >= 2500 and TALLY["foreign"] >= 150, TALLY
    # History and restore must have read and restored the tenants' own cards, not only been refused (seen 42
    # histories and 60 restores answered, 2026-12-03). The seed is fixed, but hypothesis also draws constants found in
    # the source of the modules loaded so far (hypothesis.internal.conjecture.providers._get_local_constants), so
    # which test files ran first, and any new constant in card_mcp, change the sequence: on 2026-12-05 a restore's
    # version drawn as a number found a version 74 times run alone and 10 times after the suite's earlier files. Drawn
    # as an index into the card's versions (restored_version), 112 alone and 171 after them.
    assert TALLY["get_card_history:ok"] >= 20 and TALLY["restore_card:ok"] >= 40, TALLY
