"""A bounded soak of the streamable HTTP transport, checked against a client-side ledger.

    python bench/soak.py [--seconds 300] [--tenants 3] [--clients 24] [--database-url SUPERUSER_URL] [--json]

Without --database-url it starts the embedded PostgreSQL in a temporary folder under /tmp; with it (a superuser
URL such as postgresql://postgres@127.0.0.1:5432/postgres) it uses that server. Either way it creates a fresh
migrated database of its own (bench/batch.py's fresh_database), one tenant and one API key per tenant, and
starts a real `card-mcp serve --transport http --port 0` (loopback; the port is read from its log). Everything
it made (the server process, the database, the embedded server and its folder) is removed at the end, also
after a failure, Ctrl-C or SIGTERM.

The load: --clients SDK streamable HTTP client sessions in this process, spread over the tenants (round robin),
each running a random mix of every tool against its own tenant for --seconds: create_card (fresh content, and
content from a small pool so `existing` answers and `duplicate_content` happen), get_card, search_cards (with
and without words, filters, a second page), update_card with expected_version (read-modify-write, stale
versions on purpose, no-op updates), delete_card, batch_create_cards with idempotency keys (new batches,
replays as sent and spelled differently, the same key with other cards, two calls with one key at once),
usage_stats, calls on other tenants' cards (they must be not_found) and malformed arguments (invalid_argument).
Half the clients close their session and open a new one (a new HTTP connection too) every 5-40 calls.

The ledger: every acknowledged write (card id -> type, title, tags, content hash, version; deleted or not, and
when each acknowledgement arrived), every card state any answer showed, and every call per (tenant, tool,
outcome). A call that answered an error acknowledged nothing.

Every --sample-every seconds (at most a twelfth of the run): the server's resident set size (/proc/PID/status
VmRSS) and open file descriptors, and the database's backends per role from pg_stat_activity. The server does
not publish its pool sizes; the backends stand in: the application role's are its tool pool, the admin role's its
admin pool (API-key lookups), the revocation listener and the idempotency expiry.

At the end, after the server has stopped, the ledger is compared with the database through a superuser
connection, and the run fails (exit status 1) when anything of this is not zero:

* lost: an acknowledged card missing, at an older version or another state than acknowledged, an acknowledged
  delete undone, or an acknowledged live card deleted with no delete acknowledged;
* duplicated: one card acknowledged as created twice, or two active cards of one tenant with one type and content;
* unacknowledged: a card, or a version of a card, that no acknowledged call explains (a call that failed in
  transport or answered `unavailable` could; those are reported and fail the run by themselves);
* isolation: a tenant seeing, changing or deduplicating against another tenant's card, a card stored under
  another tenant than the one that made it, another tenant's rows in usage_stats;
* stale reads: a read started after an acknowledgement arrived that does not show it;
* inconsistent: two answers showing one version of a card differently (two updates acknowledged with one
  version: a lost update), a content_hash that is not the SHA-256 of the content, an answer that does not
  reflect what its call asked for;
* idempotency: a replay that wrote, or answered differently than the original; a key accepted for other cards;
* usage mismatches: card_usage rows per (tenant, tool, status/error code) differing from the calls made, rows
  with another transport, API key or client name, created cards missing from their calls' usage rows;
* unhealthy: `internal` or `unavailable` answers, calls that failed in transport, malformed answers, error codes
  a call should not answer, calls still running at the drain deadline, ERROR lines in the server's log, a
  non-zero exit status of the server;
* resources: the application role's backends above the pool's size (--pool-size) or the admin role's above its
  pool's size + 2 at any sample; backends left after the server stopped; the median RSS of the last third of the
  samples more than --rss-growth-mib (default 10) above the median of the middle third (the first third is
  warm-up; docs/benchmarks.md has RSS flat at ~76 MiB over 100,000 calls); the median of the open file
  descriptors of the last third more than --clients above the middle third's (a socket leak per session).

Progress goes to stderr. The tables go to stdout, or with --json to stderr and one JSON summary to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx2
from batch import NOUNS, PEOPLE, TAGS, WORDS, fresh_database, postgres, with_database, with_user
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import Implementation, TextContent

from card_mcp import db, keys, tools

CARD_MCP = str(Path(sys.executable).parent / "card-mcp")
CARD_TYPES = ("company", "audience", "voice", "insight")
TOOLS = tuple(tool.name for tool in tools.TOOLS)
# A word per tenant in every title it writes, so a search for another tenant's word has something to find.
MARKERS = ("kestrel", "osprey", "heron", "falcon", "condor", "plover", "magpie", "curlew", "bittern", "merlin")
POOL = 40  # contents shared by every tenant: dedup must answer `existing` within a tenant, never across
UNHEALTHY_CODES = frozenset({"internal", "unavailable"})
DRAIN_SECONDS = 60.0  # how long the running calls may take to finish after --seconds
LOGGED_ERROR_LINES = 120  # of the server's ERROR records with their tracebacks, printed when the log has any
OUTCOME_OK = "ok"
OUTCOME_TRANSPORT = "transport"
PROBLEMS = (
    "lost",
    "duplicated",
    "unacknowledged",
    "isolation",
    "stale_reads",
    "inconsistent",
    "idempotency",
    "usage_mismatches",
    "unhealthy",
    "resources",
)


def canonical_hash(content: dict[str, Any]) -> str:
    """SPEC section 2's content hash, computed here independently of card_mcp."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


# -- the ledger --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What a card is at one version, as far as the ledger compares it."""

    card_type: str
    title: str
    tags: tuple[str, ...]
    content_hash: str

    @classmethod
    def of(cls, card: dict[str, Any]) -> Snapshot:
        return cls(card["card_type"], card["title"], tuple(card["tags"]), card["content_hash"])


@dataclass
class CardEntry:
    """One card a call acknowledged creating: its acknowledged versions, what answers showed, its deletion."""

    tenant: str
    content: dict[str, Any]  # of the newest version known, to build updates from
    writes: dict[int, Snapshot] = field(default_factory=dict)  # version -> state, from acknowledged writes
    acked_at: dict[int, float] = field(default_factory=dict)  # version -> when its acknowledgement arrived
    seen: dict[int, Snapshot] = field(default_factory=dict)  # version -> state, from reads
    deleted_at: float | None = None  # when the first acknowledged delete arrived
    deleted_stamp: str | None = None  # the deleted_at it answered
    deleting: int = 0  # delete calls in flight
    uncertain: bool = False  # a write on it failed in transport or answered unavailable: its outcome is unknown

    @property
    def version(self) -> int:
        return max([*self.writes, *self.seen])

    @property
    def newest(self) -> Snapshot:
        return {**self.seen, **self.writes}[self.version]


@dataclass
class Batch:
    """A batch_create_cards sent with an idempotency key, and its answer once one acknowledged it."""

    cards: list[dict[str, Any]]
    response: dict[str, Any] | None = None
    busy: bool = True  # a call with the key is running: no other client retries it meanwhile


@dataclass
class Tenant:
    index: int
    name: str
    tenant_id: uuid.UUID
    key_id: uuid.UUID
    key: str
    cards: dict[str, CardEntry] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # the keys of cards, for random picks
    batches: dict[str, Batch] = field(default_factory=dict)
    referenced: set[str] = field(default_factory=set)  # ids answered as existing before their creation arrived
    calls: Counter[tuple[str, str]] = field(default_factory=Counter)  # (tool, outcome)

    @property
    def marker(self) -> str:
        return MARKERS[self.index % len(MARKERS)]

    @property
    def client_name(self) -> str:
        return f"soak-{self.marker}"


@dataclass
class Ledger:
    tenants: list[Tenant]
    owner: dict[str, str] = field(default_factory=dict)  # card id -> tenant name, from acknowledged creates
    problems: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # what the deliberate cases came to, for the report
    examples: dict[str, list[str]] = field(default_factory=dict)
    acknowledged_writes: int = 0
    calls: int = 0
    sessions: int = 0
    uncertain_calls: int = 0

    def problem(self, kind: str, message: str, amount: int = 1) -> None:
        assert kind in PROBLEMS, kind
        self.problems[kind] += amount
        shown = self.examples.setdefault(kind, [])
        if len(shown) < 10:
            shown.append(message)
            print(f"soak: {kind}: {message}", file=sys.stderr)

    def check_card(self, card: dict[str, Any], where: str) -> None:
        if canonical_hash(card["content"]) != card["content_hash"]:
            self.problem("inconsistent", f"{where}: card {card['id']} has a content_hash that is not its content's")

    def agree(self, entry: CardEntry, card_id: str, version: int, snap: Snapshot, where: str) -> None:
        known = entry.writes.get(version) or entry.seen.get(version)
        if known is not None and known != snap:
            self.problem("inconsistent", f"{where}: card {card_id} v{version} shown as {snap}, earlier as {known}")

    def created(self, tenant: Tenant, card_id: str, snap: Snapshot, content: dict[str, Any], where: str) -> None:
        """A call acknowledged creating ``card_id`` (version 1)."""
        if card_id in self.owner:
            self.problem("duplicated", f"{where}: card {card_id} acknowledged as created a second time")
            return
        self.owner[card_id] = tenant.name
        entry = CardEntry(tenant.name, content)
        entry.writes[1] = snap
        entry.acked_at[1] = time.monotonic()
        tenant.cards[card_id] = entry
        tenant.ids.append(card_id)
        self.acknowledged_writes += 1

    def written(self, tenant: Tenant, card: dict[str, Any], started: float, where: str) -> None:
        """An update acknowledged: the card at its returned version."""
        entry = self.observed(tenant, card, started, where)
        if entry is None:
            return
        version = card["version"]
        if version not in entry.writes:
            self.acknowledged_writes += 1
        entry.writes.setdefault(version, Snapshot.of(card))
        entry.acked_at.setdefault(version, time.monotonic())

    def observed(self, tenant: Tenant, card: dict[str, Any], started: float, where: str) -> CardEntry | None:
        """An answer (of a call started at ``started``) showed ``card``: check it against what was acknowledged
        before that call started; None when the card's creation has not been acknowledged (yet)."""
        card_id = card["id"]
        self.check_card(card, where)
        owner = self.owner.get(card_id)
        if owner is not None and owner != tenant.name:
            self.problem("isolation", f"{where}: tenant {tenant.name} was shown card {card_id} of {owner}")
            return None
        entry = tenant.cards.get(card_id)
        if entry is None:  # made by a call whose answer has not been read yet: checked at the end
            tenant.referenced.add(card_id)
            return None
        version, snap = card["version"], Snapshot.of(card)
        self.agree(entry, card_id, version, snap, where)
        if version >= entry.version:
            entry.content = card["content"]
        entry.seen.setdefault(version, snap)
        if entry.deleted_at is not None and entry.deleted_at < started:
            self.problem("stale_reads", f"{where}: card {card_id} shown after its delete was acknowledged")
        newest = max((v for v, at in entry.acked_at.items() if at < started), default=0)
        if version < newest:
            self.problem("stale_reads", f"{where}: card {card_id} shown at v{version} after v{newest} was acknowledged")
        return entry


# -- the clients -------------------------------------------------------------------------------------------------


class SessionBroken(Exception):
    """A call failed in transport; the session is closed and a new one opened."""


def broken(exc: BaseException) -> bool:
    """Whether ``exc`` is, or (from a task group) holds only, SessionBroken."""
    if isinstance(exc, BaseExceptionGroup):
        return all(broken(inner) for inner in exc.exceptions)
    return isinstance(exc, SessionBroken)


@dataclass
class Answer:
    data: dict[str, Any] | None
    code: str | None
    started: float

    @property
    def ok(self) -> bool:
        return self.data is not None


@asynccontextmanager
async def session(url: str, tenant: Tenant) -> AsyncIterator[Client]:
    """A streamable HTTP session of ``tenant``'s key (its own HTTP connections)."""
    headers = {"Authorization": f"Bearer {tenant.key}", "User-Agent": f"{tenant.client_name}/1.0"}
    info = Implementation(name=tenant.client_name, version="1.0")
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", client_info=info) as client,
    ):
        yield client


class Worker:
    """One client: a session at a time, calling a random mix of every tool against its tenant."""

    def __init__(self, number: int, tenant: Tenant, ledger: Ledger, counter: itertools.count[int]) -> None:
        self.number = number
        self.tenant = tenant
        self.ledger = ledger
        self.rng = random.Random(number * 7919 + 17)
        self.counter = counter
        self.client: Client | None = None
        self.others = [t for t in ledger.tenants if t is not tenant]
        self.operations: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (14, self.create),
            (16, self.get),
            (12, self.search),
            (14, self.update),
            (4, self.read_modify_write),
            (6, self.delete),
            (7, self.batch),
            (4, self.replay),
            (1, self.reuse_key),
            (1, self.racing_batches),
            (3, self.usage_stats),
            (4, self.foreign),
            (2, self.invalid),
        ]
        self.weights = [w for w, _ in self.operations]

    # -- calls -----------------------------------------------------------------------------------------------

    async def call(self, tool: str, arguments: dict[str, Any], expected: frozenset[str] = frozenset()) -> Answer:
        """One tool call, counted in the ledger by outcome; an error answer acknowledges nothing."""
        assert self.client is not None
        started = time.monotonic()
        self.ledger.calls += 1
        try:
            result = await self.client.call_tool(tool, arguments)
        except Exception as exc:
            self.tenant.calls[(tool, OUTCOME_TRANSPORT)] += 1
            self.ledger.uncertain_calls += 1
            self.ledger.problem("unhealthy", f"{tool} failed in transport: {exc!r}"[:300])
            raise SessionBroken from exc
        text = result.content[0].text if result.content and isinstance(result.content[0], TextContent) else None
        if result.is_error:
            try:
                error = json.loads(text or "")["error"]
                code = error["code"]
                assert set(error) == {"code", "message", "hint"} and isinstance(code, str)
            except (ValueError, KeyError, TypeError, AssertionError):
                self.tenant.calls[(tool, "malformed")] += 1
                self.ledger.problem("unhealthy", f"{tool} answered a malformed error: {text!r}"[:300])
                return Answer(None, "malformed", started)
            self.tenant.calls[(tool, code)] += 1
            if code in UNHEALTHY_CODES:
                self.ledger.problem("unhealthy", f"{tool} answered {code}: {error['message']}")
            elif code not in expected | {"limit_exceeded"}:
                self.ledger.problem("unhealthy", f"{tool} answered {code} unexpectedly: {error['message']}")
            return Answer(None, code, started)
        self.tenant.calls[(tool, OUTCOME_OK)] += 1
        data = result.structured_content
        if data is None or text is None or json.loads(text) != data:
            self.ledger.problem("unhealthy", f"{tool} answered without the same JSON as structured content and text")
            return Answer(data or {}, None, started)
        return Answer(data, None, started)

    # -- what the calls send ---------------------------------------------------------------------------------

    def fresh_content(self) -> dict[str, Any]:
        rng = self.rng
        return {
            "summary": f"{rng.choice(WORDS)} {rng.choice(NOUNS)} for {rng.choice(PEOPLE)}",
            "points": [rng.choice(WORDS) for _ in range(rng.randint(1, 4))],
            "serial": next(self.counter),
            "by": self.number,
        }

    def pool_content(self) -> dict[str, Any]:
        i = self.rng.randrange(POOL)
        return {"summary": f"shared {NOUNS[i % len(NOUNS)]} card", "pool": i}

    def content(self, shared: float) -> dict[str, Any]:
        return self.pool_content() if self.rng.random() < shared else self.fresh_content()

    def title(self) -> str:
        rng = self.rng
        return f"{self.tenant.marker} {rng.choice(WORDS)} {rng.choice(NOUNS)} {next(self.counter)}"

    def tags(self) -> list[str]:
        return self.rng.sample(TAGS, self.rng.randint(0, 3))

    def new_card(self, shared: float = 0.3) -> dict[str, Any]:
        if self.rng.random() < shared:  # two types only, so `existing` comes often
            card_type, content = CARD_TYPES[self.rng.randrange(2)], self.pool_content()
        else:
            card_type, content = self.rng.choice(CARD_TYPES), self.fresh_content()
        return {"card_type": card_type, "title": self.title(), "content": content, "tags": self.tags()}

    def pick(self, tenant: Tenant | None = None, *, live: bool = True) -> tuple[str, CardEntry] | None:
        """A random card of ``tenant`` (this worker's by default), preferably one not deleted."""
        tenant = tenant or self.tenant
        if not tenant.ids:
            return None
        for _ in range(8):
            card_id = self.rng.choice(tenant.ids)
            entry = tenant.cards[card_id]
            if not live or entry.deleted_at is None:
                return card_id, entry
        return None

    # -- operations ------------------------------------------------------------------------------------------

    async def create(self) -> None:
        card = self.new_card()
        answer = await self.call("create_card", card, frozenset({"conflict"}))
        if not answer.ok:
            return
        assert answer.data is not None
        got, status = answer.data["card"], answer.data["status"]
        sent = Snapshot(card["card_type"], card["title"], tuple(card["tags"]), canonical_hash(card["content"]))
        self.ledger.check_card(got, "create_card")
        if status == "created":
            if Snapshot.of(got) != sent or got["version"] != 1 or got["content"] != card["content"]:
                self.ledger.problem("inconsistent", f"create_card stored {Snapshot.of(got)}, not {sent}")
            self.ledger.created(self.tenant, got["id"], Snapshot.of(got), got["content"], "create_card")
            return
        self.ledger.events["create_card answered existing"] += 1
        if (got["card_type"], got["content_hash"]) != (sent.card_type, sent.content_hash):
            self.ledger.problem("inconsistent", f"create_card answered existing with another card: {got['id']}")
        self.ledger.observed(self.tenant, got, answer.started, "create_card existing")

    async def get(self) -> None:
        picked = self.pick(live=self.rng.random() < 0.9)
        if picked is None:
            return await self.create()
        card_id, entry = picked
        answer = await self.call("get_card", {"card_id": card_id}, frozenset({"not_found"}))
        if answer.ok:
            assert answer.data is not None
            self.ledger.observed(self.tenant, answer.data["card"], answer.started, "get_card")
        elif answer.code == "not_found" and entry.deleted_at is None and not entry.deleting and not entry.uncertain:
            self.ledger.problem("stale_reads", f"get_card: card {card_id} not found, and no delete was acknowledged")

    async def search(self) -> None:
        rng = self.rng
        arguments: dict[str, Any] = {"limit": rng.choice((5, 10, 20, 50))}
        roll = rng.random()
        if roll < 0.5:
            words = [rng.choice(WORDS + NOUNS) for _ in range(rng.randint(1, 2))]
            arguments["query"] = " ".join(words)
        elif roll < 0.6 and self.others:
            arguments["query"] = rng.choice(self.others).marker  # another tenant's word: none of its cards
        if rng.random() < 0.3:
            arguments["card_type"] = rng.choice(CARD_TYPES)
        if rng.random() < 0.15:
            arguments["tags"] = [rng.choice(TAGS)]
        for _page in range(2):
            answer = await self.call("search_cards", arguments)
            if not answer.ok:
                return
            assert answer.data is not None
            for hit in answer.data["cards"]:
                self.ledger.observed(self.tenant, hit, answer.started, "search_cards")
            if len(answer.data["cards"]) > arguments["limit"]:
                self.ledger.problem("inconsistent", "search_cards answered more cards than its limit")
            cursor = answer.data["next_cursor"]
            if cursor is None or rng.random() < 0.5:
                return
            arguments["cursor"] = cursor

    async def update(self, card_id: str | None = None, expected: int | None = None) -> None:
        rng = self.rng
        if card_id is None:
            picked = self.pick()
            if picked is None:
                return await self.create()
            card_id, entry = picked
            roll = rng.random()
            if roll < 0.8:
                expected = entry.version  # may be stale already: a conflict then
            elif roll < 0.9:
                expected = max(1, entry.version - 1)  # stale on purpose (unless still at version 1)
        else:
            entry = self.tenant.cards[card_id]
        arguments: dict[str, Any] = {"card_id": card_id}
        if expected is not None:
            arguments["expected_version"] = expected
        change = rng.choice(("title", "tags", "content", "content", "all", "nothing"))
        if change in ("title", "all"):
            arguments["title"] = self.title()
        if change in ("tags", "all"):
            arguments["tags"] = [] if rng.random() < 0.2 else self.tags()
        if change in ("content", "all"):
            arguments["content"] = self.content(shared=0.2)
        if change == "nothing":  # the same title as the newest known: no new version if it still is
            arguments["title"] = entry.newest.title
        codes = frozenset({"conflict", "not_found", "duplicate_content"})
        try:
            answer = await self.call("update_card", arguments, codes)
        except SessionBroken:
            entry.uncertain = True
            raise
        if answer.code in UNHEALTHY_CODES:
            entry.uncertain = True
        if not answer.ok:
            if answer.code == "duplicate_content" and "content" not in arguments:
                self.ledger.problem("inconsistent", "update_card answered duplicate_content with no content given")
            return
        assert answer.data is not None
        card = answer.data["card"]
        wrong = [
            name
            for name, value in (
                ("title", arguments.get("title")),
                ("tags", arguments.get("tags")),
                ("content", arguments.get("content")),
            )
            if value is not None and card[name] != value
        ]
        if expected is not None and card["version"] not in (expected, expected + 1):
            wrong.append(f"version {card['version']} after expected_version {expected}")
        if card["id"] != card_id:
            wrong.append("id")
        if wrong:
            self.ledger.problem("inconsistent", f"update_card of {card_id} did not apply: {', '.join(wrong)}")
        self.ledger.written(self.tenant, card, answer.started, "update_card")

    async def read_modify_write(self) -> None:
        picked = self.pick()
        if picked is None:
            return await self.create()
        card_id, _ = picked
        answer = await self.call("get_card", {"card_id": card_id}, frozenset({"not_found"}))
        if not answer.ok:
            return
        assert answer.data is not None
        card = answer.data["card"]
        self.ledger.observed(self.tenant, card, answer.started, "get_card")
        await self.update(card_id, card["version"])

    async def delete(self) -> None:
        picked = self.pick()
        if picked is None:
            return await self.create()
        card_id, entry = picked
        entry.deleting += 1
        try:
            answer = await self.call("delete_card", {"card_id": card_id}, frozenset({"not_found", "conflict"}))
        except SessionBroken:
            entry.uncertain = True
            raise
        finally:
            entry.deleting -= 1
        if answer.code in UNHEALTHY_CODES:
            entry.uncertain = True
        if not answer.ok:
            return
        assert answer.data is not None
        if answer.data["card_id"] != card_id:
            self.ledger.problem("inconsistent", f"delete_card of {card_id} answered {answer.data['card_id']}")
        # A delete repeated (retried, or by two workers) answers the first one's deleted_at: anything else is a
        # card deleted twice.
        stamp = answer.data["deleted_at"]
        if entry.deleted_stamp is not None and stamp != entry.deleted_stamp:
            self.ledger.problem("inconsistent", f"delete_card of {card_id} acknowledged twice, at two times")
        if entry.deleted_at is None:
            entry.deleted_at = time.monotonic()
            entry.deleted_stamp = stamp
            self.ledger.acknowledged_writes += 1

    def batch_cards(self) -> list[dict[str, Any]]:
        cards = [self.new_card(shared=0.25) for _ in range(self.rng.randint(1, 12))]
        if len(cards) > 2 and self.rng.random() < 0.3:  # a card twice in one batch: `existing`, the first's id
            cards.append(dict(cards[0]))
        return cards

    def acknowledge_batch(self, cards: list[dict[str, Any]], data: dict[str, Any], where: str) -> None:
        """A batch that wrote (not a replay): check its answer and add its created cards to the ledger."""
        results = data["results"]
        if [r["index"] for r in results] != list(range(len(cards))):
            self.ledger.problem("inconsistent", f"{where}: results do not follow the cards")
            return
        first: dict[tuple[str, str], str] = {}
        for card, result in zip(cards, results, strict=True):
            digest = canonical_hash(card["content"])
            same = first.setdefault((card["card_type"], digest), result["card_id"])
            if same != result["card_id"]:
                self.ledger.problem("duplicated", f"{where}: one card of a batch answered with two ids")
            if result["status"] == "created":
                snap = Snapshot(card["card_type"], card["title"], tuple(card["tags"]), digest)
                self.ledger.created(self.tenant, result["card_id"], snap, card["content"], where)
            else:
                owner = self.ledger.owner.get(result["card_id"])
                if owner is not None and owner != self.tenant.name:
                    self.ledger.problem("isolation", f"{where}: existing answered with {owner}'s card")
                self.tenant.referenced.add(result["card_id"])
                self.ledger.events["batch card answered existing"] += 1
        created = sum(r["status"] == "created" for r in results)
        if (data["created"], data["existing"]) != (created, len(results) - created):
            self.ledger.problem("inconsistent", f"{where}: created/existing counts do not match the results")

    async def batch(self) -> None:
        unanswered = [k for k, b in self.tenant.batches.items() if b.response is None and not b.busy]
        if unanswered and self.rng.random() < 0.5:  # retry a batch whose call failed, with its key
            key = self.rng.choice(unanswered)
            batch = self.tenant.batches[key]
            batch.busy = True
        else:
            key, cards = f"soak-{uuid.uuid4()}", self.batch_cards()
            if self.rng.random() < 0.25:
                answer = await self.call("batch_create_cards", {"cards": cards}, frozenset({"conflict"}))
                if answer.ok and answer.data is not None:
                    self.acknowledge_batch(cards, answer.data, "batch_create_cards")
                return
            batch = self.tenant.batches[key] = Batch(cards)
        try:
            arguments = {"cards": batch.cards, "idempotency_key": key}
            answer = await self.call("batch_create_cards", arguments, frozenset({"conflict"}))
        finally:
            batch.busy = False
        if answer.ok and answer.data is not None:
            self.answered(key, batch.cards, answer.data)

    def answered(self, key: str, cards: list[dict[str, Any]], data: dict[str, Any]) -> None:
        """A batch with a key acknowledged: the first answer writes; later ones must be its replays."""
        batch = self.tenant.batches[key]
        if batch.response is None and not data["replayed"]:
            batch.response = data
            self.acknowledge_batch(cards, data, "batch_create_cards")
        elif batch.response is None:  # a replay of an answer this ledger has not seen: impossible
            self.ledger.problem("idempotency", f"batch {key} replayed before any call of it was acknowledged")
        else:
            self.check_replay(key, data)

    def check_replay(self, key: str, data: dict[str, Any]) -> None:
        original = self.tenant.batches[key].response
        assert original is not None
        if not data["replayed"]:
            self.ledger.problem("idempotency", f"batch {key} was written again instead of replayed")
            self.acknowledge_batch(self.tenant.batches[key].cards, data, "batch_create_cards (written twice)")
        elif {**data, "replayed": False} != original:
            self.ledger.problem("idempotency", f"the replay of batch {key} answered differently than the original")

    async def replay(self) -> None:
        answered = [k for k, b in self.tenant.batches.items() if b.response is not None]
        if not answered:
            return await self.batch()
        key = self.rng.choice(answered)
        cards = self.tenant.batches[key].cards
        spelling = "as sent"
        if self.rng.random() < 0.5:  # the same cards spelled differently: not the arguments' fast path
            cards = [{**c, "title": f"  {c['title']} ", "tags": c["tags"] + c["tags"][:1]} for c in cards]
            spelling = "spelled differently"
        answer = await self.call("batch_create_cards", {"cards": cards, "idempotency_key": key})
        if answer.ok and answer.data is not None:
            self.ledger.events[f"batch replayed, {spelling}"] += answer.data["replayed"]
            self.check_replay(key, answer.data)

    async def reuse_key(self) -> None:
        answered = [k for k, b in self.tenant.batches.items() if b.response is not None]
        if not answered:
            return await self.batch()
        key = self.rng.choice(answered)
        cards = self.batch_cards()
        answer = await self.call(
            "batch_create_cards", {"cards": cards, "idempotency_key": key}, frozenset({"idempotency_conflict"})
        )
        if answer.ok and answer.data is not None:
            self.ledger.problem("idempotency", f"batch key {key} was accepted for other cards")
            if not answer.data["replayed"]:
                self.acknowledge_batch(cards, answer.data, "batch_create_cards (key reused)")

    async def racing_batches(self) -> None:
        """Two calls with one new key at once: one writes; the other replays it or is told to retry (conflict)."""
        key, cards = f"soak-race-{uuid.uuid4()}", self.batch_cards()
        self.tenant.batches[key] = Batch(cards)
        answers: list[Answer] = []
        broken: list[SessionBroken] = []

        async def one() -> None:
            try:
                answers.append(
                    await self.call(
                        "batch_create_cards", {"cards": cards, "idempotency_key": key}, frozenset({"conflict"})
                    )
                )
            except SessionBroken as exc:
                broken.append(exc)

        async with anyio.create_task_group() as group:
            group.start_soon(one)
            group.start_soon(one)
        self.tenant.batches[key].busy = False
        outcomes = sorted(a.code or ("replayed" if a.data and a.data["replayed"] else "wrote") for a in answers)
        self.ledger.events[f"two batches with one key at once: {' + '.join(outcomes)}"] += 1
        oks = [a.data for a in answers if a.ok and a.data is not None]
        writers = [d for d in oks if not d["replayed"]]
        if len(writers) > 1:
            self.ledger.problem("idempotency", f"two concurrent calls with key {key} both wrote")
        for data in writers[:1] + [d for d in oks if d["replayed"]] + writers[1:]:
            self.answered(key, cards, data)
        if broken:
            raise broken[0]

    async def usage_stats(self) -> None:
        group_by = self.rng.choice(("tool", "card", "day", "client"))
        answer = await self.call("usage_stats", {"group_by": group_by, "limit": self.rng.choice((5, 20, 100))})
        if not answer.ok or answer.data is None:
            return
        for row in answer.data["rows"]:
            key = row["key"]
            if group_by == "tool" and key not in TOOLS:
                self.ledger.problem("isolation", f"usage_stats names a tool no client called: {key}")
            elif group_by == "client" and key != self.tenant.client_name:
                self.ledger.problem("isolation", f"usage_stats of {self.tenant.name} shows client {key}")
            elif group_by == "card" and self.ledger.owner.get(key, self.tenant.name) != self.tenant.name:
                self.ledger.problem("isolation", f"usage_stats of {self.tenant.name} shows a foreign card {key}")

    async def foreign(self) -> None:
        """Another tenant's card, by id: not_found for every tool, deleted or not."""
        if not self.others:
            return await self.get()
        picked = self.pick(self.rng.choice(self.others), live=False)
        if picked is None:
            return
        card_id, _ = picked
        tool = self.rng.choice(("get_card", "get_card", "update_card", "delete_card"))
        arguments: dict[str, Any] = {"card_id": card_id}
        if tool == "update_card":
            arguments["tags"] = ["intruder"]
        answer = await self.call(tool, arguments, frozenset({"not_found"}))
        if answer.ok:
            self.ledger.problem("isolation", f"{tool} of {self.tenant.name} reached another tenant's card {card_id}")

    async def invalid(self) -> None:
        """Arguments the input schema refuses: invalid_argument, and still one usage row."""
        tool, arguments = self.rng.choice(
            (
                ("get_card", {"card_id": "not-a-card-id"}),
                ("create_card", {"card_type": "poem", "title": "x", "content": {}}),
                ("search_cards", {"limit": 0}),
                ("batch_create_cards", {"cards": []}),
                ("update_card", {"card_id": str(uuid.uuid4()), "expected_version": 0}),
            )
        )
        answer = await self.call(tool, arguments, frozenset({"invalid_argument"}))
        if answer.ok:
            self.ledger.problem("inconsistent", f"{tool} accepted arguments its schema refuses: {arguments}")

    # -- the loop --------------------------------------------------------------------------------------------

    async def run(self, url: str, deadline: float, churn: bool) -> None:
        while time.monotonic() < deadline:
            try:
                async with session(url, self.tenant) as client:
                    self.client = client
                    self.ledger.sessions += 1
                    budget = self.rng.randint(5, 40) if churn else -1
                    while budget != 0 and time.monotonic() < deadline:
                        operation = self.rng.choices(self.operations, self.weights)[0][1]
                        await operation()
                        budget -= 1
            except Exception as exc:
                if not broken(exc):  # a failed call is reported already; this is the session (or the soak's bug)
                    self.ledger.problem("unhealthy", f"client {self.number} lost its session: {exc!r}"[:300])
                await anyio.sleep(0.2)
            finally:
                self.client = None


# -- the server and the samples ----------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    pid: int
    log: list[str]
    returncode: int | None = None
    stdout: str = ""


@asynccontextmanager
async def card_mcp_server(env: dict[str, str], stateless: bool) -> AsyncIterator[Server]:
    """`card-mcp serve --transport http --port 0` in a session of its own (Ctrl-C reaches only this process,
    which stops the server before the database); stopped with SIGTERM, killed if it does not stop in 30 s."""
    args = [CARD_MCP, "serve", "--transport", "http", "--port", "0", *(["--stateless"] if stateless else [])]
    process = subprocess.Popen(  # noqa: ASYNC220 - once, before the load
        args,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log: list[str] = []
    found: list[str] = []
    out: list[str] = []
    ready = threading.Event()

    def drain_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            log.append(line)
            match = re.search(r"listening on (http://\S+/mcp)", line)
            if match:
                found.append(match.group(1))
                ready.set()
        ready.set()

    def drain_stdout() -> None:
        assert process.stdout is not None
        out.append(process.stdout.read())

    readers = [threading.Thread(target=drain_stderr, daemon=True), threading.Thread(target=drain_stdout, daemon=True)]
    for reader in readers:
        reader.start()
    server = Server("", process.pid, log)
    try:
        await anyio.to_thread.run_sync(ready.wait, 60)
        if not found:
            raise RuntimeError("card-mcp serve did not start:\n" + "".join(log[-30:]))
        server.url = found[0]
        yield server
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            try:
                await anyio.to_thread.run_sync(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
                await anyio.to_thread.run_sync(process.wait)
            for reader in readers:
                await anyio.to_thread.run_sync(reader.join, 10)
            server.returncode = process.returncode
            server.stdout = "".join(out)


def error_records(log: list[str]) -> list[str]:
    """The server log's ERROR and CRITICAL records, each with the traceback lines under it (card_mcp.logs
    writes them as following lines that start with `  | `)."""
    lines: list[str] = []
    inside = False
    for line in log:
        if re.search(r" (ERROR|CRITICAL) ", line):
            inside = True
        elif not line.startswith("  | "):
            inside = False
        if inside:
            lines.append(line.rstrip())
    return lines


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@dataclass
class Sample:
    at: float  # seconds since the load started
    calls: int
    calls_per_s: float | None  # since the sample before; None for the last, taken after the clients stopped
    rss_mib: float
    fds: int
    backends: dict[str, int]  # role -> client backends on the soak's database
    idle_in_transaction: int

    def backends_of(self, role: str) -> int:
        return self.backends.get(role, 0)


BACKENDS = """
SELECT coalesce(usename::text, '?') AS role, count(*) AS backends,
       count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction
  FROM pg_stat_activity
 WHERE datname = $1 AND backend_type = 'client backend'
 GROUP BY 1
"""


async def backends(superuser: asyncpg.Connection[asyncpg.Record], database: str) -> tuple[dict[str, int], int]:
    rows = await superuser.fetch(BACKENDS, database)
    return {r["role"]: r["backends"] for r in rows}, sum(r["idle_in_transaction"] for r in rows)


async def sampler(
    superuser: asyncpg.Connection[asyncpg.Record],
    database: str,
    pid: int,
    ledger: Ledger,
    every: float,
    samples: list[Sample],
) -> None:
    started = time.monotonic()
    previous = (started, 0)
    while True:
        now = time.monotonic()
        by_role, idle = await backends(superuser, database)
        rate = (ledger.calls - previous[1]) / (now - previous[0]) if now > previous[0] else 0.0
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        samples.append(Sample(now - started, ledger.calls, rate, rss_mib(pid), fds, by_role, idle))
        previous = (now, ledger.calls)
        await anyio.sleep(every)


# -- the checks at the end ---------------------------------------------------------------------------------------

CARDS = """
SELECT t.name AS tenant, c.id::text AS id, c.card_type, c.title, c.tags, c.content::text AS content,
       c.content_hash, c.version, c.is_active
  FROM card_mcp.cards AS c JOIN card_mcp.tenants AS t USING (tenant_id)
"""
# Per tenant, tool and outcome: the calls, and those with another transport, API key or client name than the
# tenant's one key and client ($1: tenant names, $2: their client names).
USAGE = """
SELECT t.name AS tenant, u.tool, coalesce(u.error_code, 'ok') AS outcome, count(*) AS calls,
       count(*) FILTER (WHERE u.transport <> 'http' OR u.api_key_id IS DISTINCT FROM k.key_id
                          OR u.client_name IS DISTINCT FROM e.client_name) AS odd
  FROM card_mcp.card_usage AS u
  JOIN card_mcp.tenants AS t USING (tenant_id)
  LEFT JOIN card_mcp.api_keys AS k ON k.tenant_id = u.tenant_id
  LEFT JOIN unnest($1::text[], $2::text[]) AS e(tenant, client_name) ON e.tenant = t.name
 GROUP BY 1, 2, 3
"""
USED_CARDS = """
SELECT DISTINCT t.name AS tenant, unnest(u.card_ids)::text AS id
  FROM card_mcp.card_usage AS u JOIN card_mcp.tenants AS t USING (tenant_id)
 WHERE u.status = 'ok' AND u.tool IN ('create_card', 'batch_create_cards')
"""


def compare_cards(ledger: Ledger, rows: list[asyncpg.Record]) -> None:
    stored = {r["id"]: r for r in rows}
    for tenant in ledger.tenants:
        for card_id, entry in tenant.cards.items():
            row = stored.get(card_id)
            if row is None:
                ledger.problem("lost", f"card {card_id} of {tenant.name} is not in the database")
                continue
            if row["tenant"] != tenant.name:
                ledger.problem("isolation", f"card {card_id} made by {tenant.name} is stored under {row['tenant']}")
            top = max(entry.writes)
            expected = entry.writes[top]
            if entry.deleted_at is not None:  # a delete counts the version up too: it is a version of the history
                top += 1
            found = Snapshot(row["card_type"], row["title"], tuple(row["tags"]), row["content_hash"])
            if row["version"] < top or (row["version"] == top and found != expected):
                ledger.problem(
                    "lost",
                    f"card {card_id}: acknowledged v{top} {expected}, stored v{row['version']} {found}",
                )
            elif row["version"] > top and not entry.uncertain:
                ledger.problem("unacknowledged", f"card {card_id} is at v{row['version']}; v{top} was acknowledged")
            if entry.deleted_at is not None and row["is_active"]:
                ledger.problem("lost", f"card {card_id}: its delete was acknowledged but it is active")
            if entry.deleted_at is None and not row["is_active"] and not entry.uncertain:
                ledger.problem("lost", f"card {card_id} was deleted, but no delete was acknowledged")
        for card_id in tenant.referenced - tenant.cards.keys():
            owner = ledger.owner.get(card_id)
            if owner is not None:
                ledger.problem("isolation", f"{tenant.name} was answered with {owner}'s card {card_id}")
            else:
                ledger.problem("unacknowledged", f"{tenant.name} was answered with card {card_id} no call created")
    for row in rows:
        if canonical_hash(json.loads(row["content"])) != row["content_hash"]:
            ledger.problem("inconsistent", f"stored card {row['id']} has a content_hash that is not its content's")
        if row["id"] not in ledger.owner:
            ledger.problem("unacknowledged", f"card {row['id']} of {row['tenant']} was not acknowledged by any call")
    active = Counter((r["tenant"], r["card_type"], r["content_hash"]) for r in rows if r["is_active"])
    for (tenant_name, card_type, digest), count in active.items():
        if count > 1:
            ledger.problem("duplicated", f"{count} active {card_type} cards of {tenant_name} with content {digest}")


@dataclass
class UsageRow:
    tool: str
    outcome: str
    client: int
    stored: int


def compare_usage(ledger: Ledger, rows: list[asyncpg.Record], used: list[asyncpg.Record]) -> list[UsageRow]:
    """card_usage against the calls made, per (tenant, tool, outcome); the table sums over the tenants."""
    stored: Counter[tuple[str, str, str]] = Counter()
    for row in rows:
        stored[(row["tenant"], row["tool"], row["outcome"])] += row["calls"]
        if row["odd"]:
            ledger.problem(
                "usage_mismatches",
                f"{row['odd']} usage rows of {row['tenant']} {row['tool']} have another transport, key or client",
            )
    made: Counter[tuple[str, str, str]] = Counter()
    for tenant in ledger.tenants:
        for (tool, outcome), count in tenant.calls.items():
            if outcome != OUTCOME_TRANSPORT:  # its row may or may not exist; reported as unhealthy already
                made[(tenant.name, tool, outcome)] += count
    for key in sorted(stored.keys() | made.keys()):
        if stored[key] != made[key]:
            tenant_name, tool, outcome = key
            message = f"{tenant_name} {tool} {outcome}: {made[key]} calls made, {stored[key]} usage rows"
            ledger.problem("usage_mismatches", message, abs(stored[key] - made[key]))
    recorded = {(r["tenant"], r["id"]) for r in used}
    missing = [card_id for card_id, name in ledger.owner.items() if (name, card_id) not in recorded]
    if missing:
        message = f"{len(missing)} created cards are in no usage row of their call, e.g. {missing[0]}"
        ledger.problem("usage_mismatches", message, len(missing))
    table: dict[tuple[str, str], UsageRow] = {}
    for (_, tool, outcome), count in made.items():
        table.setdefault((tool, outcome), UsageRow(tool, outcome, 0, 0)).client += count
    for (_, tool, outcome), count in stored.items():
        table.setdefault((tool, outcome), UsageRow(tool, outcome, 0, 0)).stored += count
    return sorted(table.values(), key=lambda r: (TOOLS.index(r.tool) if r.tool in TOOLS else 99, r.outcome))


@dataclass
class Bounds:
    app_backends: int
    owner_backends: int
    rss_growth_mib: float
    fd_growth: int


def thirds(values: list[float]) -> tuple[float, float]:
    """Medians of the middle and the last third of ``values``."""
    third = len(values) // 3
    return statistics.median(values[third : 2 * third]), statistics.median(values[2 * third :])


def check_resources(ledger: Ledger, samples: list[Sample], after_stop: dict[str, int], bounds: Bounds) -> None:
    for s in samples:
        if s.backends_of(db.APP_ROLE) > bounds.app_backends:
            ledger.problem("resources", f"{s.backends_of(db.APP_ROLE)} application backends at {s.at:.0f} s")
        if s.backends_of(db.ADMIN_ROLE) > bounds.owner_backends:
            ledger.problem("resources", f"{s.backends_of(db.ADMIN_ROLE)} admin backends at {s.at:.0f} s")
    if any(after_stop.values()):
        ledger.problem("resources", f"backends left after the server stopped: {after_stop}")
    if len(samples) < 6:
        ledger.problem("resources", f"only {len(samples)} samples: too few to tell growth")
        return
    middle, last = thirds([s.rss_mib for s in samples])
    if last - middle > bounds.rss_growth_mib:
        ledger.problem("resources", f"RSS grew from a median of {middle:.1f} MiB to {last:.1f} MiB")
    middle, last = thirds([float(s.fds) for s in samples])
    if last - middle > bounds.fd_growth:
        ledger.problem("resources", f"open file descriptors grew from a median of {middle:.0f} to {last:.0f}")


# -- the run -----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    ledger: Ledger
    samples: list[Sample]
    usage: list[UsageRow]
    seconds: float
    after_stop: dict[str, int]
    server_errors: list[str]
    environment: str
    bounds: Bounds


async def make_tenants(admin_url: str, count: int) -> list[Tenant]:
    conn = await db.connect(admin_url)
    try:
        made = []
        for index in range(count):
            name = f"soak-{MARKERS[index % len(MARKERS)]}-{uuid.uuid4().hex[:6]}"
            tenant_id = await db.tenant_id_for(admin_url, name)
            key_id, key = await keys.create_key(conn, name, "soak")
            made.append(Tenant(index, name, tenant_id, key_id, key))
        return made
    finally:
        await conn.close()


async def wait_for_no_backends(superuser: asyncpg.Connection[asyncpg.Record], database: str) -> dict[str, int]:
    """The backends still open on the database once the server has stopped (they end within moments)."""
    by_role: dict[str, int] = {}
    for _ in range(100):
        by_role, _idle = await backends(superuser, database)
        if not by_role:
            break
        await anyio.sleep(0.1)
    return by_role


async def soak(args: argparse.Namespace) -> Outcome:
    every = min(args.sample_every, args.seconds / 12)
    bounds = Bounds(args.pool_size, max(2, args.pool_size // 2) + 2, args.rss_growth_mib, args.clients)
    async with postgres(args.database_url) as superuser_url, fresh_database(superuser_url) as name:
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)  # the server's admin role (it refuses the owner)
        superuser = await asyncpg.connect(superuser_url)  # the maintenance database: not counted as a backend
        try:
            server_version = await superuser.fetchval("SHOW server_version")
            tenants = await make_tenants(admin_url, args.tenants)
            ledger = Ledger(tenants)
            env = {  # nothing of the caller's card-mcp configuration: the soak decides every setting
                **{k: v for k, v in os.environ.items() if not k.startswith("CARD_MCP_")},
                "CARD_MCP_DATABASE_URL": with_user(superuser_url, db.APP_ROLE, name),
                "CARD_MCP_ADMIN_DATABASE_URL": admin_url,
                "CARD_MCP_LOG_LEVEL": "INFO",  # the server announces its URL at INFO
                "CARD_MCP_POOL_MAX_SIZE": str(args.pool_size),
                "CARD_MCP_MAX_CALLS_PER_KEY": str(args.max_calls_per_key),
                "CARD_MCP_SEMANTIC": args.semantic,
            }
            samples: list[Sample] = []
            counter = itertools.count()
            async with card_mcp_server(env, args.stateless) as server:
                print(f"soak: {server.url} (pid {server.pid}), {args.seconds:g} s", file=sys.stderr)
                workers = [Worker(n, tenants[n % len(tenants)], ledger, counter) for n in range(args.clients)]
                started = time.monotonic()
                deadline = started + args.seconds
                with anyio.move_on_after(args.seconds + DRAIN_SECONDS) as drain:
                    async with anyio.create_task_group() as group:
                        group.start_soon(sampler, superuser, name, server.pid, ledger, every, samples)
                        async with anyio.create_task_group() as clients:
                            for worker in workers:
                                clients.start_soon(worker.run, server.url, deadline, worker.number % 2 == 0)
                        group.cancel_scope.cancel()  # the sampler
                elapsed = time.monotonic() - started
                if drain.cancelled_caught:
                    ledger.problem("unhealthy", f"calls were still running {DRAIN_SECONDS:g} s after the end")
                samples.append(  # the last sample, with the clients gone
                    Sample(
                        elapsed,
                        ledger.calls,
                        None,
                        rss_mib(server.pid),
                        len(os.listdir(f"/proc/{server.pid}/fd")),
                        *await backends(superuser, name),
                    )
                )
            after_stop = await wait_for_no_backends(superuser, name)
            errors = [line.rstrip() for line in server.log if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
            for line in error_records(server.log)[:LOGGED_ERROR_LINES]:
                print(f"soak: server log: {line}", file=sys.stderr)
            if errors:
                ledger.problem("unhealthy", f"{len(errors)} ERROR lines in the server's log")
            if server.returncode != 0 or server.stdout:
                ledger.problem("unhealthy", f"the server exited {server.returncode}, stdout {server.stdout[:200]!r}")
            check = await asyncpg.connect(with_database(superuser_url, name))
            try:
                compare_cards(ledger, await check.fetch(CARDS))
                names, client_names = [t.name for t in tenants], [t.client_name for t in tenants]
                usage_rows = await check.fetch(USAGE, names, client_names)
                usage = compare_usage(ledger, usage_rows, await check.fetch(USED_CARDS))
            finally:
                with anyio.CancelScope(shield=True):
                    await check.close()
            check_resources(ledger, samples, after_stop, bounds)
        finally:
            with anyio.CancelScope(shield=True):
                await superuser.close()
    environment = (
        f"PostgreSQL {server_version} ({'external' if args.database_url else 'embedded'}), "
        f"{'stateless' if args.stateless else 'stateful'} HTTP, {args.tenants} tenants, {args.clients} clients, "
        f"pool {args.pool_size}, Python {platform.python_version()}, mcp {version('mcp')}, "
        f"asyncpg {version('asyncpg')}, {os.cpu_count()} cores"
    )
    return Outcome(ledger, samples, usage, elapsed, after_stop, errors, environment, bounds)


# -- the report --------------------------------------------------------------------------------------------------


def summary(outcome: Outcome) -> dict[str, Any]:
    ledger, samples = outcome.ledger, outcome.samples
    rss = [s.rss_mib for s in samples]
    total = [sum(s.backends.values()) for s in samples]
    middle, last = thirds(rss) if len(rss) >= 3 else (float("nan"), float("nan"))
    live = sum(e.deleted_at is None for t in ledger.tenants for e in t.cards.values())
    return {
        "passed": not any(ledger.problems.values()),
        "environment": outcome.environment,
        "seconds": round(outcome.seconds, 1),
        "operations": ledger.calls,
        "calls_per_s": round(ledger.calls / outcome.seconds, 1) if outcome.seconds else 0.0,
        "sessions": ledger.sessions,
        "acknowledged_writes": ledger.acknowledged_writes,
        "cards": {"acknowledged": len(ledger.owner), "live": live, "deleted": len(ledger.owner) - live},
        **{kind: ledger.problems[kind] for kind in PROBLEMS},
        "uncertain_calls": ledger.uncertain_calls,
        "examples": ledger.examples,
        "rss_mib": {
            "first": round(rss[0], 1),
            "last": round(rss[-1], 1),
            "max": round(max(rss), 1),
            "median_middle_third": round(middle, 1),
            "median_last_third": round(last, 1),
            "bound_growth": outcome.bounds.rss_growth_mib,
        },
        "backends": {
            "first": total[0],
            "last": total[-1],
            "max": max(total),
            "after_stop": sum(outcome.after_stop.values()),
            "bound_app": outcome.bounds.app_backends,
            "bound_owner": outcome.bounds.owner_backends,
        },
        "events": dict(ledger.events),
        "calls": [vars(r) for r in outcome.usage],
        "samples": [vars(s) for s in samples],
    }


def tables(outcome: Outcome, data: dict[str, Any]) -> str:
    lines = [outcome.environment, ""]
    lines += [
        "| t s | calls | calls/s | RSS MiB | fds | app backends | admin backends | other | idle in tx |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in outcome.samples:
        other = sum(n for role, n in s.backends.items() if role not in (db.APP_ROLE, db.ADMIN_ROLE))
        lines.append(
            f"| {s.at:.0f} | {s.calls} | {'-' if s.calls_per_s is None else f'{s.calls_per_s:.0f}'} | "
            f"{s.rss_mib:.1f} | {s.fds} | "
            f"{s.backends_of(db.APP_ROLE)} | {s.backends_of(db.ADMIN_ROLE)} | {other} | {s.idle_in_transaction} |"
        )
    lines += ["", "| tool | outcome | calls made | card_usage rows |", "|---|---|---:|---:|"]
    lines += [f"| {r.tool} | {r.outcome} | {r.client} | {r.stored} |" for r in outcome.usage]
    lines += ["", "| deliberate case | times |", "|---|---:|"]
    lines += [f"| {event} | {count} |" for event, count in sorted(outcome.ledger.events.items())]
    rss, backends_ = data["rss_mib"], data["backends"]
    bounds = outcome.bounds
    rows = [
        ("tool calls", f"{data['operations']} in {data['seconds']} s ({data['calls_per_s']}/s)", "", True),
        ("client sessions opened", data["sessions"], "", True),
        (
            "acknowledged writes",
            f"{data['acknowledged_writes']} ({data['cards']['acknowledged']} cards, {data['cards']['deleted']} "
            "deleted)",
            "",
            True,
        ),
        *((kind.replace("_", " "), data[kind], "0", data[kind] == 0) for kind in PROBLEMS if kind != "resources"),
        ("calls with unknown outcome (transport)", data["uncertain_calls"], "0", data["uncertain_calls"] == 0),
        (
            "RSS MiB first / last / max",
            f"{rss['first']} / {rss['last']} / {rss['max']}",
            f"median of last third ≤ middle third's + {bounds.rss_growth_mib:g} "
            f"({rss['median_last_third']} vs {rss['median_middle_third']})",
            rss["median_last_third"] - rss["median_middle_third"] <= bounds.rss_growth_mib,
        ),
        (
            "backends first / last / max",
            f"{backends_['first']} / {backends_['last']} / {backends_['max']}",
            f"app ≤ {bounds.app_backends}, owner ≤ {bounds.owner_backends} at every sample",
            True,
        ),
        ("backends after the server stopped", backends_["after_stop"], "0", backends_["after_stop"] == 0),
        ("resource bounds broken", data["resources"], "0", data["resources"] == 0),
    ]
    lines += ["", "| what | value | bound | verdict |", "|---|---|---|---|"]
    for what, value, bound, ok in rows:
        verdict = "" if not bound else ("ok" if ok else "FAILED")
        lines.append(f"| {what} | {value} | {bound} | {verdict} |")
    lines += ["", "soak: passed" if data["passed"] else "soak: FAILED"]
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    """Runs the soak; SIGTERM and SIGINT cancel it, and everything it made is removed on the way out."""
    result: list[Outcome] = []
    interrupted = False

    async def run(scope: anyio.CancelScope) -> None:
        result.append(await soak(args))
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(run, group.cancel_scope)
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for received in signals:
                print(f"soak: {signal.Signals(received).name}: cleaning up", file=sys.stderr)
                interrupted = True
                group.cancel_scope.cancel()
                break
    if interrupted or not result:
        return 130
    outcome = result[0]
    data = summary(outcome)
    text = tables(outcome, data)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(data, default=str))
    else:
        print(text)
    return 0 if data["passed"] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300, help="how long the clients call (default 300)")
    p.add_argument("--tenants", type=int, default=3)
    p.add_argument("--clients", type=int, default=24, help="client sessions in all, spread over the tenants")
    p.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout (the tables on stderr)")
    p.add_argument("--stateless", action="store_true", help="serve with --stateless (no sessions)")
    p.add_argument("--pool-size", type=int, default=10, help="CARD_MCP_POOL_MAX_SIZE of the server (default 10)")
    p.add_argument(
        "--max-calls-per-key", type=int, default=64, help="CARD_MCP_MAX_CALLS_PER_KEY (default 64: no throttling)"
    )
    p.add_argument(
        "--semantic",
        choices=("off", "auto"),
        default="off",
        help="CARD_MCP_SEMANTIC of the server (default off: with the semantic extra installed, auto loads the model "
        "and embeds the cards written during the run: 76 to 193 MiB over a 20 s run on 2026-12-05, growth to the RSS "
        "bound)",
    )
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--rss-growth-mib", type=float, default=10.0, help="allowed RSS growth (default 10 MiB)")
    return p


if __name__ == "__main__":
    arguments = parser().parse_args()
    if arguments.seconds <= 0 or arguments.tenants < 1 or arguments.clients < 1:
        parser().error("--seconds, --tenants and --clients must be positive")
    sys.exit(anyio.run(main, arguments))
