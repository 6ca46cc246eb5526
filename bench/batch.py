"""A 1000-card batch_create_cards against a plain COPY of the same rows into the same table, side by side in
one run, as ratios; and a replay of the batch (same idempotency key) against the original call.

    python bench/batch.py [--runs 7] [--cards 1000] [--seed 1] [--database-url SUPERUSER_URL] [--check]

Without --database-url it starts the embedded PostgreSQL in a temporary folder under /tmp; with it (a superuser
URL such as postgresql://postgres@127.0.0.1:5432/postgres) it uses that server. Either way it creates a fresh
database (roles, CREATE DATABASE ... OWNER card_mcp_owner, migrations as the owner), as tests/conftest.py does,
and drops it at the end. Every run uses fresh tenants, so every measured call really inserts every card.

What each row times (wall clock, time.perf_counter; the same deterministic cards everywhere):

* COPY floor: as the superuser (row-level security does not bind superusers, and the application role may not
  COPY), computing each card's content hash as the server does (models.content_hash), building the records and
  ``COPY card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash) FROM STDIN`` (asyncpg's
  copy_records_to_table, binary; content as json.dumps text, as card-mcp's jsonb codec sends it) inside a
  transaction, commit included.
* batch_create_cards via MCP: one ``call_tool`` with an idempotency key through the SDK's in-memory client
  (``mcp.Client(server, mode="legacy")``) against build_server: the SDK's validation of 1000 cards, the tenant
  transaction, hashing, the bulk INSERTs, the idempotency claim and stored response, the usage row, the result
  model and its JSON text, the client's check of the result, commit included. Not included: JSON-RPC framing on
  a real transport (stdio/HTTP would add encoding and decoding about 0.6 MB of request and 0.1 MB of response)
  and process start-up. Each run builds its own
  server for its fresh tenant and warms its pool with a one-card batch first (not timed).
* of which the SDK client's outputSchema check (info): the Python SDK's client validates every structured
  result against the tool's outputSchema with jsonschema; that check of the batch's result, timed on its own.
* same work without MCP (info): the tool body by hand on a warm pool: cards.encode_cards, idempotency.request_hash,
  the call edge (calls.Edge.call), idempotency.replay (claim and lookup), cards.insert_cards, the response model,
  idempotency.store and the usage row, commit included. The 1000 NewCard models are validated beforehand (not
  timed): the difference to the MCP row is the SDK's work (argument validation, the client's outputSchema
  check, request and result serialization, message passing).
* replay: the same call_tool again with the same key and cards, answered from the idempotency store; its ratio
  is against the original batch call.

The order of the COPY and the MCP call alternates between runs. Prints one markdown table: median and p90 of
the runs, the reference ("floor") each ratio divides by, the ratio of medians and the target.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import asyncpg
from mcp import Client
from mcp.types import CallToolResult

from card_mcp import cards as card_store
from card_mcp import db, idempotency, migrate
from card_mcp.bootstrap import ROLES_SQL, VECTOR_SQL
from card_mcp.calls import Caller, Edge
from card_mcp.config import Settings
from card_mcp.embedded import SUPERUSER, EmbeddedPostgres
from card_mcp.models import CARD_TYPES, BatchCreateResult, BatchItemResult, NewCard, canonical_json, content_hash
from card_mcp.server import build_server

TOOL = "batch_create_cards"
COPY_COLUMNS = ("tenant_id", "card_type", "title", "content", "tags", "content_hash")
CONTENT_BYTES = (300, 600)  # canonical JSON size of each card's content
COPY_TARGET = 1.5
REPLAY_TARGET = 0.2

# -- the cards ---------------------------------------------------------------------------------------------------

# fmt: off
WORDS = (
    "bold", "clear", "warm", "honest", "playful", "calm", "precise", "curious", "direct", "friendly", "expert",
    "local", "global", "modern", "classic", "simple", "careful", "quick", "patient", "generous", "practical",
    "thoughtful", "confident", "humble", "vivid", "quiet", "steady", "bright",
)
NOUNS = (
    "coffee", "bikes", "software", "shoes", "tea", "furniture", "recipes", "travel", "insurance", "banking",
    "gardens", "books", "music", "fitness", "skincare", "pets", "camping", "energy", "housing", "learning", "cinema",
    "design", "tools", "kitchens", "fashion", "cycling",
)
PEOPLE = (
    "parents", "students", "founders", "nurses", "teachers", "developers", "retirees", "commuters", "gamers",
    "designers", "farmers", "freelancers", "runners", "shopkeepers", "architects", "engineers", "artists",
)
CHANNELS = (
    "email", "blog", "instagram", "linkedin", "newsletter", "podcast", "packaging", "support-chat",
)
TAGS = (
    "core", "launch", "spring", "summer", "autumn", "winter", "b2b", "b2c", "retail", "online", "europe", "us",
    "asia", "onboarding", "retention", "pricing", "tone", "legal", "social", "seo", "support", "product", "research",
    "q1", "q2", "q3", "q4",
)
# fmt: on


def _phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS + NOUNS) for _ in range(rng.randint(low, high)))


def _company(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    noun = rng.choice(NOUNS)
    content: dict[str, Any] = {
        "name": f"{rng.choice(WORDS).title()} {noun.title()} {i}",
        "summary": f"We make {rng.choice(WORDS)} {noun} for {rng.choice(PEOPLE)}; {_phrase(rng, 4, 8)}.",
        "founded": rng.randint(1950, 2024),
        "markets": [rng.choice(("DE", "FR", "US", "UK", "JP", "BR", "IN", "NL")) for _ in range(rng.randint(1, 4))],
        "products": [
            {"name": f"{rng.choice(WORDS)} {noun}", "price_eur": round(rng.uniform(5, 500), 2)}
            for _ in range(rng.randint(1, 3))
        ],
        "notes": [],
    }
    return f"{content['name']}: company profile", content


def _audience(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    who = rng.choice(PEOPLE)
    content: dict[str, Any] = {
        "segment": f"{rng.choice(WORDS)} {who} #{i}",
        "age_range": sorted(rng.sample(range(16, 80), 2)),
        "needs": [_phrase(rng, 2, 5) for _ in range(rng.randint(2, 4))],
        "channels": rng.sample(CHANNELS, rng.randint(1, 4)),
        "objections": [{"text": _phrase(rng, 3, 6), "answer": _phrase(rng, 4, 8)}],
        "notes": [],
    }
    return f"Audience: {content['segment']}", content


def _voice(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    content: dict[str, Any] = {
        "tone": rng.sample(WORDS, 3),
        "do": [_phrase(rng, 3, 7) for _ in range(rng.randint(2, 4))],
        "dont": [_phrase(rng, 3, 6) for _ in range(rng.randint(1, 3))],
        "examples": {"headline": _phrase(rng, 4, 8).capitalize(), "cta": _phrase(rng, 2, 4).capitalize()},
        "variant": i,
        "notes": [],
    }
    return f"Voice {i}: {' and '.join(content['tone'][:2])}", content


def _insight(rng: random.Random, i: int) -> tuple[str, dict[str, Any]]:
    content: dict[str, Any] = {
        "finding": f"{rng.choice(PEOPLE).capitalize()} respond to {_phrase(rng, 3, 6)}",
        "evidence": [
            {
                "source": rng.choice(CHANNELS),
                "metric": rng.choice(("ctr", "open rate", "nps", "conversion")),
                "lift_pct": round(rng.uniform(-20, 60), 1),
            }
            for _ in range(rng.randint(1, 3))
        ],
        "confidence": rng.choice(("low", "medium", "high")),
        "observed": f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "study": i,
        "notes": [],
    }
    return f"Insight {i}: {content['finding'][:60]}", content


MAKERS: dict[str, Callable[[random.Random, int], tuple[str, dict[str, Any]]]] = {
    "company": _company,
    "audience": _audience,
    "voice": _voice,
    "insight": _insight,
}


def make_cards(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct cards as an agent would send them: all four types, 300-600 bytes of content, 2-4 tags."""
    rng = random.Random(seed)
    low, high = CONTENT_BYTES
    result: list[dict[str, Any]] = []
    for i in range(count):
        card_type = CARD_TYPES[i % len(CARD_TYPES)]
        title, content = MAKERS[card_type](rng, i)
        # "notes" pads the content to a size drawn from the range (trims it when already over it).
        target = rng.randint(low, high)
        while len(canonical_json(content).encode()) < target:
            content["notes"].append(_phrase(rng, 1, 3))
        while len(canonical_json(content).encode()) > high and content["notes"]:
            content["notes"].pop()
        tags = rng.sample(TAGS, rng.randint(2, 4))
        result.append({"card_type": card_type, "title": title, "content": content, "tags": tags})
    distinct = {(c["card_type"], canonical_json(c["content"])) for c in result}
    assert len(distinct) == count, "the generated cards must be distinct"
    return result


# -- the database ------------------------------------------------------------------------------------------------


def with_user(url: str, user: str, database: str) -> str:
    """``url`` with another user and database (passwords are not carried over), as tests/conftest.py does."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, f"/{database}", urlencode(parse_qsl(parts.query)), ""))


def with_database(url: str, database: str) -> str:
    """``url`` (user and password kept) on another database."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def data_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="card-mcp-bench-", dir="/tmp"))
    path.chmod(0o755)  # reachable by the embedded PostgreSQL's service user when run as root
    return path


@asynccontextmanager
async def postgres(external: str | None) -> AsyncIterator[str]:
    """A superuser URL of the maintenance database: ``external``, or an embedded server started for the run."""
    if external:
        yield external
        return
    folder = data_dir()
    pg = EmbeddedPostgres(folder)
    try:
        await anyio.to_thread.run_sync(pg.start)
        yield pg.url(SUPERUSER, "postgres")
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(pg.stop)
            shutil.rmtree(folder, ignore_errors=True)


@asynccontextmanager
async def fresh_database(
    superuser_url: str, migrations: list[migrate.Migration] | None = None, keep: str | None = None
) -> AsyncIterator[str]:
    """A migrated database of its own (every migration, or those given); yields its name and drops it afterwards.
    With ``keep``, the database of that name, created if missing, brought up to date, and kept afterwards."""
    name = keep or f"card_mcp_bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(ROLES_SQL)
        exists = keep is not None and await conn.fetchval("SELECT true FROM pg_database WHERE datname = $1", keep)
        if not exists:
            await conn.execute(f'CREATE DATABASE "{name}" OWNER card_mcp_owner')
    finally:
        await conn.close()
    try:
        conn = await asyncpg.connect(with_database(superuser_url, name))
        try:
            await conn.execute(VECTOR_SQL)  # pgvector where the server has it, as the embedded PostgreSQL does
        finally:
            await conn.close()
        owner = await db.connect(with_user(superuser_url, db.OWNER_ROLE, name))
        try:
            await migrate.migrate(owner, migrations)
        finally:
            await owner.close()
        yield name
    finally:
        with anyio.CancelScope(shield=True):
            conn = await asyncpg.connect(superuser_url)
            try:
                if keep is None:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()


# -- the measures ------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    cards: list[dict[str, Any]]
    new_cards: list[NewCard]
    settings: Settings
    owner_url: str
    superuser: asyncpg.Connection[asyncpg.Record]
    pool: asyncpg.Pool
    times: dict[str, list[float]] = field(default_factory=dict)

    def record(self, what: str, seconds: float) -> None:
        self.times.setdefault(what, []).append(seconds)

    async def tenant(self) -> tuple[str, uuid.UUID]:
        name = f"bench-{uuid.uuid4().hex[:12]}"
        return name, await db.tenant_id_for(self.owner_url, name)


async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    gc.collect()
    started = time.perf_counter()
    result = await action()
    return time.perf_counter() - started, result


async def copy_floor(bench: Bench) -> None:
    _, tenant_id = await bench.tenant()

    async def copy() -> str:
        records = [
            (tenant_id, c["card_type"], c["title"], json.dumps(c["content"]), c["tags"], content_hash(c["content"]))
            for c in bench.cards
        ]
        async with bench.superuser.transaction():
            return await bench.superuser.copy_records_to_table(
                "cards", schema_name="card_mcp", columns=COPY_COLUMNS, records=records
            )

    seconds, status = await timed(copy)
    assert status == f"COPY {len(bench.cards)}", status
    bench.record("copy", seconds)


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error and result.structured_content is not None, result.content
    content: dict[str, Any] = result.structured_content
    return content


async def through_mcp(bench: Bench, client: Client) -> None:
    key = f"import-{uuid.uuid4()}"
    arguments = {"cards": bench.cards, "idempotency_key": key}
    seconds, result = await timed(lambda: client.call_tool(TOOL, arguments))
    first = structured(result)
    assert (first["created"], first["replayed"]) == (len(bench.cards), False), first["created"]
    bench.record("mcp", seconds)
    # The part of that call spent in the SDK client checking the result against the tool's outputSchema, timed
    # again on its own (the same check call_tool just ran; other clients may check more cheaply or not at all).
    seconds, _ = await timed(lambda: client.session.validate_tool_result(TOOL, result))
    bench.record("client_check", seconds)
    seconds, result = await timed(lambda: client.call_tool(TOOL, arguments))
    assert structured(result) == {**first, "replayed": True}
    bench.record("replay", seconds)


async def server_side(bench: Bench, tenant_id: uuid.UUID) -> None:
    """The server's own time for the batch and its replay, from their usage rows: from the call's arrival at the
    call edge (before the SDK validates the arguments) to just before COMMIT; no transport, no client."""
    durations = await bench.superuser.fetch(
        "SELECT duration_ms FROM card_mcp.card_usage WHERE tenant_id = $1 AND tool = $2 ORDER BY usage_id",
        tenant_id,
        TOOL,
    )
    _warm, original, replay = (row["duration_ms"] / 1000 for row in durations)
    bench.record("server", original)
    bench.record("server_replay", replay)


async def mcp_client_run(bench: Bench, before_mcp: Callable[[], Awaitable[None]] | None) -> None:
    """A server for a fresh tenant, warmed with a one-card batch; then the batch and its replay."""
    name, tenant_id = await bench.tenant()
    server = build_server(bench.settings.model_copy(update={"tenant": name}))
    async with Client(server, mode="legacy") as client:
        warm = {"card_type": "insight", "title": "warm-up", "content": {"warm": name}, "tags": ["bench"]}
        structured(await client.call_tool(TOOL, {"cards": [warm], "idempotency_key": f"warm-{name}"}))
        if before_mcp is not None:
            await before_mcp()
        await through_mcp(bench, client)
    await server_side(bench, tenant_id)


async def without_mcp(bench: Bench) -> None:
    _, tenant_id = await bench.tenant()
    key = f"import-{uuid.uuid4()}"
    max_bytes = bench.settings.max_content_bytes
    edge = Edge(bench.pool, bench.settings)

    async def body() -> BatchCreateResult:
        encoded = card_store.encode_cards(bench.new_cards, max_bytes=max_bytes)
        digest = idempotency.request_hash(bench.new_cards, [content_digest for _, content_digest in encoded])
        async with edge.call(Caller(tenant_id, "stdio"), TOOL, durable=True) as call:
            conn = await call.transaction()
            assert await idempotency.replay(conn, key, TOOL, digest) is None
            items = await card_store.insert_cards(conn, tenant_id, bench.new_cards, encoded)
            result = BatchCreateResult(
                results=[BatchItemResult(index=i.index, status=i.status, card_id=i.card_id) for i in items],
                created=sum(i.status == "created" for i in items),
                existing=sum(i.status == "existing" for i in items),
                replayed=False,
            )
            await idempotency.store(conn, tenant_id, key, TOOL, digest, result.model_dump(mode="json"))
            call.touched(*(i.card_id for i in items))
        return result

    seconds, result = await timed(body)
    assert result.created == len(bench.cards)
    bench.record("raw", seconds)


async def one_run(bench: Bench, copy_first: bool) -> None:
    if copy_first:
        await mcp_client_run(bench, lambda: copy_floor(bench))  # the COPY right before the call, server warm
    else:
        await mcp_client_run(bench, None)
        await copy_floor(bench)
    await without_mcp(bench)


# -- the report --------------------------------------------------------------------------------------------------


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def report(times: dict[str, list[float]], environment: str) -> bool:
    """Print the table; True when every target is met."""
    ms = {what: [v * 1000 for v in values] for what, values in times.items()}
    median = {what: statistics.median(values) for what, values in ms.items()}
    rows = (
        ("COPY by the superuser (floor)", "copy", "copy", None),
        ("batch_create_cards via MCP client", "mcp", "copy", COPY_TARGET),
        ("of which: the SDK client's outputSchema check (info)", "client_check", "copy", None),
        ("same work without MCP (info)", "raw", "copy", None),
        ("replay vs original batch", "replay", "mcp", REPLAY_TARGET),
        ("batch_create_cards, server side (usage row)", "server", "copy", COPY_TARGET),
        ("replay vs original, server side (usage rows)", "server_replay", "server", REPLAY_TARGET),
    )
    met = True
    print(environment)
    print()
    print("| what | median ms | p90 ms | floor ms | ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, what, base, target in rows:
        ratio = median[what] / median[base]
        if target is None:
            verdict = "" if what != base else "1.00 (reference)"
        else:
            ok = ratio <= target
            met = met and ok
            verdict = f"≤ {target:.1f}x {'met' if ok else 'MISSED'}"
        print(f"| {name} | {median[what]:.1f} | {p90(ms[what]):.1f} | {median[base]:.1f} | {ratio:.2f}x | {verdict} |")
    return met


async def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], str]:
    """Seconds per run of each measure (keys as in report), and a line describing the environment."""
    cards = make_cards(args.cards, args.seed)
    new_cards = [NewCard.model_validate(c) for c in cards]
    async with postgres(args.database_url) as superuser_url, fresh_database(superuser_url) as name:
        app_url = with_user(superuser_url, db.APP_ROLE, name)
        owner_url = with_user(superuser_url, db.OWNER_ROLE, name)
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
        settings = Settings(database_url=app_url, admin_database_url=admin_url, log_level="WARNING")
        # Plain asyncpg: binary COPY needs its binary jsonb codec (a str); the records carry json.dumps, as
        # card-mcp's text codec does.
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        pool = await db.create_pool(app_url, settings)
        try:
            bench = Bench(cards, new_cards, settings, owner_url, superuser, pool)
            await one_run(bench, copy_first=True)  # warm-up: caches, statements, the first pages of each index
            bench.times.clear()
            for run in range(args.runs):
                await one_run(bench, copy_first=run % 2 == 0)
            server_version = await superuser.fetchval("SHOW server_version")
        finally:
            await pool.close()
            await superuser.close()
    sizes = [len(canonical_json(c["content"]).encode()) for c in cards]
    environment = (
        f"PostgreSQL {server_version} ({'external' if args.database_url else 'embedded'}), {args.runs} runs "
        f"after 1 warm-up, {len(cards)} cards (content {min(sizes)}-{max(sizes)} bytes, mean "
        f"{statistics.mean(sizes):.0f}), Python {platform.python_version()}, mcp {version('mcp')}, "
        f"asyncpg {version('asyncpg')}, pydantic {version('pydantic')}"
    )
    return bench.times, environment


async def main(args: argparse.Namespace) -> bool:
    return report(*await measure(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--cards", type=int, default=1000, help="cards per batch (the tool accepts 1-1000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    arguments = parser.parse_args()
    if arguments.runs < 1 or not 1 <= arguments.cards <= 1000:
        parser.error("--runs must be at least 1 and --cards between 1 and 1000")
    all_met = anyio.run(main, arguments)
    sys.exit(1 if arguments.check and not all_met else 0)
