"""Semantic search (the `semantic` extra): what it costs and what it gives.

    python bench/semantic.py [--calls 400] [--cards 10000] [--threads 1] [--database-url SUPERUSER_URL]

Without --database-url it starts the embedded PostgreSQL (which has pgvector) in a temporary folder under /tmp;
with it, that server, which must have pgvector. Either way a fresh migrated database (bench/batch.py's
fresh_database), dropped at the end. Everything runs in this process through the SDK's in-memory client.

* create_card with the extra: its latency while the embedding worker runs (it embeds each new card, on a thread,
  in the same process), against a server with semantic search off, in blocks that alternate so drift hits both.
* search_cards: p50 and p95 of the relevance set's 92 queries (tests/data/relevance.json, five brands of about 42
  cards), hybrid (the query embedded, then lexical and vector rankings fused) against lexical.
* hybrid latency (--tenant-cards, 1,000 by default): a tenant of that many generated cards, every one embedded;
  each distinct query of the relevance set asked once (so no answer comes from the query-embedding cache), timed
  three ways in turn: the query's embedding alone (the same model, an engine of this script's, also uncached),
  search_cards with semantic search on, and with it off; then every query again, now answered from the cache; then
  every query again, cached and lexical, each call after a thread of this process has kept a core busy for as long
  as the embedding's p50, PostgreSQL idle meanwhile (as while a query embeds): what a call costs after that.
  The target row: hybrid p50 minus the embedding's p50 (issue 16: at most 5 ms).
* backfill: `card-mcp embed`'s work (semantic.backfill) for --cards new cards in one tenant, with --threads model
  threads: seconds, and cards per second.

--only runs one part (create, search, hybrid or backfill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from batch import fresh_database, make_cards, postgres, with_database, with_user
from mcp import Client

from card_mcp import cards, db, semantic
from card_mcp.config import Settings
from card_mcp.models import NewCard
from card_mcp.server import build_server
from tests.helpers import tenant_transaction

RELEVANCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "relevance.json"


def quantiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


async def ready(server: Any) -> None:
    with anyio.fail_after(120):
        while server.state is None or server.state.edge.semantic is None:  # noqa: ASYNC110 - set by the lifespan
            await anyio.sleep(0.05)


async def create_latency(settings: Settings, calls: int) -> dict[str, list[float]]:
    """create_card, semantic on (worker embedding) vs off, alternating blocks of 25 calls."""
    times: dict[str, list[float]] = {"on": [], "off": []}
    on = build_server(settings.model_copy(update={"semantic": "auto", "tenant": f"lat-on-{uuid.uuid4().hex[:6]}"}))
    off = build_server(settings.model_copy(update={"semantic": "off", "tenant": f"lat-off-{uuid.uuid4().hex[:6]}"}))
    fresh = iter(make_cards(calls * 2 + 100, seed=7))
    async with Client(on, mode="legacy") as with_extra, Client(off, mode="legacy") as without:
        await ready(on)
        for client in (with_extra, without):  # warm both
            for _ in range(25):
                await client.call_tool("create_card", next(fresh))
        while len(times["on"]) < calls:
            for name, client in (("on", with_extra), ("off", without)):
                for _ in range(25):
                    card = next(fresh)
                    started = time.perf_counter()
                    result = await client.call_tool("create_card", card)
                    times[name].append((time.perf_counter() - started) * 1000)
                    assert not result.is_error, result
        assert on.state is not None
        queue = await queue_length(on.state.edge.pool)
    print(f"  embedding queue at the end of the latency run: {queue}", file=sys.stderr)
    return times


async def queue_length(pool: Any) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM card_mcp.embedding_queue"))


async def search_latency(settings: Settings, admin_url: str, rounds: int) -> dict[str, list[float]]:
    """The relevance set's queries, hybrid vs lexical, after every card is embedded."""
    data = json.loads(RELEVANCE.read_text())
    tenants: dict[str, str] = {}
    pool = await db.create_pool(settings.database_url or "", settings)
    try:
        for brand in data["brands"]:
            name = f"rel-{brand['brand']}-{uuid.uuid4().hex[:6]}"
            tenant_id = await db.tenant_id_for(admin_url, name)
            tenants[brand["brand"]] = name
            new = [NewCard.model_validate({k: v for k, v in c.items() if k != "key"}) for c in brand["cards"]]
            async with tenant_transaction(pool, tenant_id) as conn:
                await cards.insert_cards(conn, tenant_id, new)
    finally:
        await pool.close()
    model = semantic.load_model(settings.embed_threads)
    assert model is not None
    await semantic.backfill(admin_url, model, everything=False, progress=lambda done, total: None)
    times: dict[str, list[float]] = {"hybrid": [], "lexical": []}
    for brand, tenant in tenants.items():
        queries = [q for q in data["queries"] if q["brand"] == brand]
        on = build_server(settings.model_copy(update={"semantic": "auto", "tenant": tenant}))
        off = build_server(settings.model_copy(update={"semantic": "off", "tenant": tenant}))
        async with Client(on, mode="legacy") as hybrid, Client(off, mode="legacy") as lexical:
            await ready(on)
            for _ in range(rounds):
                for name, client in (("hybrid", hybrid), ("lexical", lexical)):
                    for query in queries:
                        started = time.perf_counter()
                        result = await client.call_tool("search_cards", {"query": query["query"]})
                        times[name].append((time.perf_counter() - started) * 1000)
                        assert not result.is_error, result
    return times


async def hybrid_latency(settings: Settings, admin_url: str, superuser_url: str, count: int) -> dict[str, list[float]]:
    """A tenant of ``count`` embedded cards; each distinct relevance query once: its embedding alone, hybrid and
    lexical search_cards (in turn, the order alternating); then hybrid again, every query now cached."""
    tenant = f"hybrid-{uuid.uuid4().hex[:6]}"
    tenant_id = await db.tenant_id_for(admin_url, tenant)
    pool = await db.create_pool(settings.database_url or "", settings)
    try:
        async with tenant_transaction(pool, tenant_id) as conn:
            await cards.insert_cards(conn, tenant_id, [NewCard.model_validate(c) for c in make_cards(count, seed=13)])
    finally:
        await pool.close()
    model = semantic.load_model(settings.embed_threads)  # this script's own engines: the server's cache stays cold
    assert model is not None
    await semantic.backfill(admin_url, model, everything=False, progress=lambda done, total: None)
    conn = await asyncpg.connect(superuser_url)
    try:  # as autovacuum would after a bulk load: the plans see 1,000 cards, not an empty table
        await conn.execute("VACUUM ANALYZE card_mcp.cards, card_mcp.card_vectors, card_mcp.search_vocabulary")
    finally:
        await conn.close()
    texts = sorted({q["query"] for q in json.loads(RELEVANCE.read_text())["queries"]})
    times: dict[str, list[float]] = {
        "embedding": [],
        "hybrid": [],
        "lexical": [],
        "cached": [],
        "cached after busy": [],
        "lexical after busy": [],
    }
    on = build_server(settings.model_copy(update={"semantic": "auto", "tenant": tenant}))
    off = build_server(settings.model_copy(update={"semantic": "off", "tenant": tenant}))
    async with Client(on, mode="legacy") as hybrid, Client(off, mode="legacy") as lexical:
        await ready(on)
        for client in (hybrid, lexical):  # warm: connections, plans (a query of no relevance-set words)
            for i in range(5):
                await client.call_tool("search_cards", {"query": f"warm up {i}"})

        async def step(name: str, text: str) -> None:
            if name == "embedding":
                await model.embed_query(text)
            else:
                result = await (hybrid if name in ("hybrid", "cached") else lexical).call_tool(
                    "search_cards", {"query": text}
                )
                assert not result.is_error, result

        for i, text in enumerate(texts):
            names = ["embedding", "hybrid", "lexical"]
            for name in names if i % 2 else names[::-1]:
                started = time.perf_counter()
                await step(name, text)
                times[name].append((time.perf_counter() - started) * 1000)
        for text in texts:
            started = time.perf_counter()
            await step("cached", text)
            times["cached"].append((time.perf_counter() - started) * 1000)
        # Each call again after a thread of this process has kept one core busy for as long as an embedding takes,
        # PostgreSQL idle meanwhile, as while a query embeds: what that costs the call after it, hybrid or not.
        busy = statistics.median(times["embedding"]) / 1000
        for i, text in enumerate(texts):
            for name in ("cached", "lexical") if i % 2 else ("lexical", "cached"):
                await anyio.to_thread.run_sync(spin, busy)
                started = time.perf_counter()
                await step(name, text)
                times[f"{name} after busy"].append((time.perf_counter() - started) * 1000)
    return times


def spin(seconds: float) -> None:
    """Keep a core busy for ``seconds``, as the model does while it embeds a query."""
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pass


async def backfill(settings: Settings, admin_url: str, count: int) -> tuple[float, int]:
    tenant_id = await db.tenant_id_for(admin_url, f"backfill-{uuid.uuid4().hex[:6]}")
    pool = await db.create_pool(settings.database_url or "", settings)
    try:
        generated = [NewCard.model_validate(c) for c in make_cards(count, seed=11)]
        for start in range(0, count, 1000):
            async with tenant_transaction(pool, tenant_id) as conn:
                await cards.insert_cards(conn, tenant_id, generated[start : start + 1000])
    finally:
        await pool.close()
    model = semantic.load_model(settings.embed_threads)
    assert model is not None
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.perf_counter() - last[0] > 30:
            last[0] = time.perf_counter()
            print(f"  backfill: {done}/{total}", file=sys.stderr)

    started = time.perf_counter()
    _, done = await semantic.backfill(admin_url, model, everything=False, progress=progress)
    return time.perf_counter() - started, done


async def main(args: argparse.Namespace) -> None:
    async with postgres(args.database_url) as superuser_url, fresh_database(superuser_url) as name:
        app_url = with_user(superuser_url, db.APP_ROLE, name)
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
        settings = Settings(
            database_url=app_url,
            admin_database_url=admin_url,
            embed_threads=args.threads,
        )
        conn = await db.connect(admin_url)
        try:
            if not await semantic.database_ready(conn):
                sys.exit("this PostgreSQL has no pgvector: semantic search is off there")
            version = await conn.fetchval("SELECT current_setting('server_version')")
        finally:
            await conn.close()
        print(f"PostgreSQL {version}; model threads {args.threads}", file=sys.stderr)
        part = args.only
        created = await create_latency(settings, args.calls) if part in (None, "create") else None
        searched = await search_latency(settings, admin_url, rounds=3) if part in (None, "search") else None
        hybrid = (
            await hybrid_latency(settings, admin_url, with_database(superuser_url, name), args.tenant_cards)
            if part in (None, "hybrid")
            else None
        )
        wanted = args.cards if part in (None, "backfill") else 0
        seconds, done = await backfill(settings, admin_url, wanted) if wanted else (0.0, 0)
    print(f"\nPostgreSQL {version}, {args.threads} model thread(s), 2-core machine\n")
    print("| what | with the extra | without | ratio |")
    print("|---|---:|---:|---:|")
    if created:
        (on50, on95), (off50, off95) = quantiles(created["on"]), quantiles(created["off"])
        print(f"| create_card p50 (ms) | {on50:.2f} | {off50:.2f} | {on50 / off50:.2f} |")
        print(f"| create_card p95 (ms) | {on95:.2f} | {off95:.2f} | {on95 / off95:.2f} |")
    if searched:
        (h50, h95), (l50, l95) = quantiles(searched["hybrid"]), quantiles(searched["lexical"])
        print(f"| search_cards p50 (ms), relevance set | {h50:.2f} | {l50:.2f} | {h50 / l50:.2f} |")
        print(f"| search_cards p95 (ms), relevance set | {h95:.2f} | {l95:.2f} | {h95 / l95:.2f} |")
    if hybrid:
        n = len(hybrid["hybrid"])
        (e50, e95), (h50, h95) = quantiles(hybrid["embedding"]), quantiles(hybrid["hybrid"])
        (l50, _), (c50, _) = quantiles(hybrid["lexical"]), quantiles(hybrid["cached"])
        print(
            f"| {args.tenant_cards}-card tenant, {n} queries uncached: hybrid p50 against the embedding alone (ms) "
            f"| {h50:.2f} | {e50:.2f} | {h50 / e50:.2f} (+{h50 - e50:.2f} ms; target +5) |"
        )
        print(f"| same, p95 (ms) | {h95:.2f} | {e95:.2f} | {h95 / e95:.2f} |")
        print(f"| same queries, hybrid p50 against lexical (ms) | {h50:.2f} | {l50:.2f} | {h50 / l50:.2f} |")
        print(f"| the same again, cached: hybrid p50 against lexical (ms) | {c50:.2f} | {l50:.2f} | {c50 / l50:.2f} |")
        (ci50, _), (li50, _) = quantiles(hybrid["cached after busy"]), quantiles(hybrid["lexical after busy"])
        print(
            f"| the same, each call after a thread's {e50:.0f} ms of work: cached hybrid p50 against lexical (ms) "
            f"| {ci50:.2f} | {li50:.2f} | {ci50 / li50:.2f} |"
        )
    if done:
        print(f"| backfill of {done} cards (s) | {seconds:.1f} ({done / seconds:.1f} cards/s) | | |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400, help="create_card calls per side")
    parser.add_argument("--cards", type=int, default=10_000, help="cards to backfill (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="model threads")
    parser.add_argument("--tenant-cards", type=int, default=1000, help="cards of the hybrid latency tenant")
    parser.add_argument("--only", choices=("create", "search", "hybrid", "backfill"), help="run this part alone")
    parser.add_argument("--database-url", help="a superuser URL of a PostgreSQL with pgvector")
    anyio.run(main, parser.parse_args())
