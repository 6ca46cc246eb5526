"""Where a call's database time goes, function by function: search_cards_call, get_card_call and a create_card
transaction, each run in a loop as the application role on a 250-card tenant, with PostgreSQL's count of every
function's own time (track_functions) over the loop.

    python bench/functions.py [--calls 2000] [--database-url SUPERUSER_URL]

Without --database-url it starts the embedded PostgreSQL in a temporary folder under /tmp; with it, it uses that
server. It creates a fresh migrated database (bench/batch.py's fresh_database, via bench/calls.py's target) and
drops it at the end. Each statement's p50 is printed against get_card_call's (the cheapest call), and each function's
own time per call (without the functions it calls) under it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
from batch import postgres, with_database
from calls import target

from card_mcp import cards as card_store
from card_mcp import db, search
from card_mcp.config import Settings
from card_mcp.models import NewCard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.helpers
from tests.helpers import tenant_transaction

_OWN_TIME = """
SELECT funcname, self_time / calls * 1000 AS own_us
  FROM pg_stat_user_functions
 WHERE calls > 0
 ORDER BY self_time DESC
 LIMIT 6
"""


async def flush(conn: asyncpg.Connection, pool: asyncpg.Pool) -> None:
    """The counts both backends hold, reported: a backend reports them at the end of a transaction at most once a
    second (the rest wait for its next transaction)."""
    await asyncio.sleep(1.1)
    await conn.execute("SELECT 1")
    async with pool.acquire() as pooled:  # the pool's one connection
        await pooled.execute("SELECT 1")
    await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> None:
    async with postgres(args.database_url) as superuser_url, target(superuser_url, 250) as t:
        superuser = await asyncpg.connect(with_database(superuser_url, t.name))
        await superuser.execute(f"ALTER DATABASE \"{t.name}\" SET track_functions = 'all'")
        conn = await asyncpg.connect(t.app_url)
        pool = await db.create_pool(t.app_url, Settings(database_url=t.app_url, log_level="WARNING", pool_max_size=1))
        rng = random.Random(1)
        usage = ("bench", None, "http", None, 0.1, None, None)

        async def search_call() -> None:
            planned = search.plan(query=rng.choice(t.words), limit=5)
            await conn.fetch(search.SEARCH_CARDS_CALL, t.tenant_id, *planned.args, "search_cards", *usage)

        async def get_call() -> None:
            await conn.fetch(card_store.GET_CARD_CALL, t.tenant_id, rng.choice(t.card_ids), "get_card", *usage)

        async def create() -> None:
            content = {"summary": f"bench {uuid.uuid4().hex}", "points": [rng.choice(t.words) for _ in range(5)]}
            new = NewCard.model_validate({"card_type": "insight", "title": "Bench insight", "content": content})
            async with tenant_transaction(pool, t.tenant_id) as tx:
                await card_store.create_card(tx, t.tenant_id, new, max_bytes=65536)

        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "get_card_call": get_call,
            "search_cards_call (one word, limit 5)": search_call,
            "create_card (its transaction, through the call edge)": create,
        }
        try:
            p50: dict[str, float] = {}
            own: dict[str, list[asyncpg.Record]] = {}
            for name, step in steps.items():
                for _ in range(100):  # plans made and cached
                    await step()
                await flush(conn, pool)
                await superuser.execute("SELECT pg_stat_reset()")
                times = []
                for _ in range(args.calls):
                    started = time.perf_counter()
                    await step()
                    times.append(time.perf_counter() - started)
                p50[name] = 1000 * statistics.median(times)
                await flush(conn, pool)
                own[name] = await superuser.fetch(_OWN_TIME)
        finally:
            await pool.close()
            await conn.close()
            await superuser.close()
    floor = p50["get_card_call"]
    print("| statement | p50 (ms) | against get_card_call | functions' own time per call (us) |")
    print("|---|---:|---:|---|")
    for name, ms in p50.items():
        functions = ", ".join(f"{r['funcname']} {r['own_us']:.0f}" for r in own[name])
        print(f"| {name} | {ms:.3f} | {ms / floor:.2f} | {functions} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--database-url", help="a PostgreSQL superuser URL (default: the embedded PostgreSQL)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
