"""search_cards among 1,000,000 cards (one tenant of 100,000, the rest in tenants of 1,000): p50 and p95 of the
relevance set's queries (tests/data/relevance.json) as the application role runs them (row-level security on),
against the same statement run by a superuser (to whom row-level security does not apply), as a ratio. The
statement is the one the tool runs (card_mcp.search_cards_call: the tenant, a page of 10 and whether more exist,
the cards, the usage row). Prints the table and
the plan of the ranking inside card_mcp.search_lexical (schema/0022) for the slowest query.

    python bench/search.py [--cards 1000000] [--big 100000] [--per-tenant 1000] [--database-url SUPERUSER_URL]
                            [--keep NAME]

The cards are the relevance set's 312 cards, repeated with a number in each title and content, loaded by the
superuser with INSERT ... SELECT (the search indexes, the postings' included, dropped during the load and built
after, as one would for a bulk load), then VACUUM ANALYZE. Database creation as in bench/batch.py.
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
from batch import fresh_database, postgres, with_database, with_user

from card_mcp import db, search

RELEVANCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "relevance.json"

_LOAD = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash)
SELECT CASE WHEN g <= $5 THEN $6::uuid ELSE ($7::uuid[])[1 + (g - $5 - 1) / $8] END,
       t.card_type[1 + g % cardinality(t.card_type)],
       left(t.title[1 + g % cardinality(t.title)] || ' ' || g, 200),
       t.content[1 + g % cardinality(t.content)] || jsonb_build_object('n', g),
       ARRAY(SELECT jsonb_array_elements_text(t.tags[1 + g % cardinality(t.tags)])),
       md5(g::text) || md5('card' || g)
  FROM (SELECT $1::text[] AS card_type, $2::text[] AS title, $3::jsonb[] AS content, $4::jsonb[] AS tags) AS t,
       generate_series(1, $9) AS g
"""

_DROP = ("ALTER TABLE card_mcp.search_postings DROP CONSTRAINT search_postings_pkey",)
_INDEXES = (
    "ALTER TABLE card_mcp.search_postings"
    " ADD CONSTRAINT search_postings_pkey PRIMARY KEY (tenant_id, word, card_id) INCLUDE (weight)",
)


async def load(superuser: asyncpg.Connection, args: argparse.Namespace, big: uuid.UUID, small: list[uuid.UUID]) -> None:
    data = json.loads(RELEVANCE.read_text())
    templates = [c for brand in data["brands"] for c in brand["cards"]]
    for statement in _DROP:
        await superuser.execute(statement)
    await superuser.execute(
        _LOAD,
        [c["card_type"] for c in templates],
        [c["title"] for c in templates],
        [json.dumps(c["content"]) for c in templates],
        [json.dumps(c["tags"]) for c in templates],
        args.big,
        big,
        small,
        args.per_tenant,
        args.cards,
    )
    for statement in _INDEXES:
        await superuser.execute(statement)
    await superuser.execute("VACUUM ANALYZE card_mcp.cards")
    await superuser.execute("VACUUM ANALYZE card_mcp.search_vocabulary")
    await superuser.execute("VACUUM ANALYZE card_mcp.search_postings")


# The usage row's fields search_cards_call takes after the search's own arguments (calls.Call.fetch_recorded).
_USAGE = ("search_cards", "bench", "1", "stdio", None, 0.0, None, None)


async def timings(conn: asyncpg.Connection, tenant: uuid.UUID, queries: list[str], passes: int = 3) -> list[float]:
    """Each query as the tool runs it: one statement (card_mcp.search_cards_call) that sets the tenant, ranks the
    page, reads its cards and writes the usage row, committed. Every query is timed once per pass, the passes one
    after another, and each query's time is its median: a query's own cost, not the moment the shared machine
    stalled (one pass's p95 moved by 20 ms between runs minutes apart, a median of three by a few)."""
    times: list[list[float]] = [[] for _ in queries]
    for _ in range(passes):
        for i, query in enumerate(queries):
            started = time.perf_counter()
            await conn.fetch(search.SEARCH_CARDS_CALL, tenant, *search.plan(query=query, limit=10).args, *_USAGE)
            times[i].append((time.perf_counter() - started) * 1000)
    return [statistics.median(each) for each in times]


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


async def main(args: argparse.Namespace) -> None:
    # Every query of the relevance set (the paraphrases too: lexical search must answer them fast, if not well).
    queries = [q["query"] for q in json.loads(RELEVANCE.read_text())["queries"]]
    async with postgres(args.database_url) as superuser_url, fresh_database(superuser_url, keep=args.keep) as name:
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
        app_url = with_user(superuser_url, db.APP_ROLE, name)
        big = await db.tenant_id_for(admin_url, "big")
        count = (args.cards - args.big + args.per_tenant - 1) // args.per_tenant
        small = [await db.tenant_id_for(admin_url, f"small-{n:04d}") for n in range(count)]
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        app = await db.connect(app_url)
        try:
            started = time.perf_counter()
            if not await superuser.fetchval("SELECT EXISTS (SELECT FROM card_mcp.cards)"):
                await load(superuser, args, big, small)
            load_s = time.perf_counter() - started
            total = await superuser.fetchval("SELECT count(*) FROM card_mcp.cards")
            version = await superuser.fetchval("SHOW server_version")
            rows: list[tuple[str, str, list[float]]] = []
            plans: dict[str, list[str]] = {}
            labels = (f"{args.big:,}-card tenant", f"{args.per_tenant:,}-card tenant")
            for label, tenant in zip(labels, (big, small[len(small) // 2]), strict=True):
                for conn in (app, superuser):  # warm both: caches, plans
                    await timings(conn, tenant, queries, passes=1)
                app_times = await timings(app, tenant, queries)
                rows.append((label, "application role (RLS on)", app_times))
                rows.append((label, "superuser (no RLS)", await timings(superuser, tenant, queries)))
                slowest = max(zip(app_times, queries, strict=True))[1]
                plans[label] = [f"({slowest!r})", *await explain(superuser, tenant, slowest)]
        finally:
            await app.close()
            await superuser.close()

    print(
        f"PostgreSQL {version} ({'external' if args.database_url else 'embedded'}); {total:,} cards, one tenant of "
        f"{args.big:,} and {len(small)} of up to {args.per_tenant:,} (loaded and indexed in {load_s:.0f} s); "
        f"{len(queries)} queries of the relevance set, a page of 10 each, each query's median of 3 passes"
    )
    print()
    print("| tenant | run as | p50 ms | p95 ms | ratio to superuser (p50) |")
    print("|---|---|---:|---:|---:|")
    floor: dict[str, float] = {label: statistics.median(t) for label, who, t in rows if who.startswith("superuser")}
    for label, who, times in rows:
        median = statistics.median(times)
        print(f"| {label} | {who} | {median:.1f} | {p95(times):.1f} | {median / floor[label]:.2f}x |")
    for label, plan in plans.items():
        print()
        print(f"Plan inside card_mcp.search_lexical for the slowest query, {label} (auto_explain, nested statements):")
        print()
        for line in plan:
            print("    " + line)


async def explain(superuser: asyncpg.Connection, tenant: uuid.UUID, query: str) -> list[str]:
    """The nested plan of the search as the application role runs it (SET ROLE), via auto_explain."""
    messages: list[str] = []

    def listen(_conn: Any, message: Any) -> None:
        messages.append(message.message)

    superuser.add_log_listener(listen)
    try:
        await superuser.execute("LOAD 'auto_explain'")
        await superuser.execute(
            "SET auto_explain.log_min_duration = 0; SET auto_explain.log_nested_statements = on;"
            " SET auto_explain.log_level = notice; SET auto_explain.log_analyze = on;"
            " SET auto_explain.log_timing = off; SET client_min_messages = notice"
        )
        async with superuser.transaction():
            await superuser.execute(f"SET LOCAL ROLE {db.APP_ROLE}")
            await superuser.fetch(search.SEARCH_CARDS_CALL, tenant, *search.plan(query=query, limit=10).args, *_USAGE)
        await superuser.execute("SET auto_explain.log_min_duration = -1; SET client_min_messages = warning")
    finally:
        superuser.remove_log_listener(listen)
    inner = [m for m in messages if "search_postings" in m]
    return "\n\n".join(inner if inner else messages).splitlines()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=1_000_000)
    parser.add_argument("--big", type=int, default=100_000, help="cards of the one big tenant")
    parser.add_argument("--per-tenant", type=int, default=1000, help="cards of each small tenant")
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    parser.add_argument(
        "--keep", metavar="NAME", help="load into database NAME and keep it; a later run with it skips the load"
    )
    arguments = parser.parse_args()
    if not 0 < arguments.big < arguments.cards or arguments.per_tenant < 1:
        parser.error("--big must be between 0 and --cards, and --per-tenant at least 1")
    anyio.run(main, arguments)
    sys.exit(0)
