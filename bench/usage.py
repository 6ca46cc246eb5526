"""A 30-day usage query for one tenant among 1,000,000 usage rows, per grouping, as `usage_stats` runs it (the
application role, the tenant set, row-level security on) and as `card-mcp usage --tenant` runs it (the admin
role), against the floor of counting the same rows through the same index. Prints a table of ratios and the
plan of one query (EXPLAIN ANALYZE) to show the index at work.

    python bench/usage.py [--rows 1000000] [--tenants 20] [--runs 7] [--database-url SUPERUSER_URL]

The rows are spread over 90 days and the tenants evenly (so one tenant's 30 days is about 1/60 of the table),
across 7 tools, 3 clients, 500 cards per tenant and 1 error in 23 calls; loaded by the superuser with one
INSERT ... SELECT, then VACUUM ANALYZE. Database creation as in bench/batch.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
from batch import fresh_database, postgres, with_database, with_user

from card_mcp import db, usage

_LOAD = """
WITH tenants AS (SELECT array_agg(tenant_id ORDER BY name) AS ids FROM card_mcp.tenants WHERE name LIKE 'usage-%')
INSERT INTO card_mcp.card_usage
       (tenant_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport, called_at)
SELECT t.ids[1 + g % cardinality(t.ids)],
       (ARRAY['get_card', 'search_cards', 'create_card', 'update_card', 'batch_create_cards', 'delete_card',
              'usage_stats'])[1 + (g / 7) % 7],
       CASE WHEN g % 23 = 0 THEN 'error' ELSE 'ok' END,
       CASE WHEN g % 23 = 0 THEN 'not_found' END,
       CASE WHEN g % 7 = 6 THEN '{}'::uuid[]
            ELSE ARRAY[uuid_in(md5(t.ids[1 + g % cardinality(t.ids)]::text || (g % 500)::text)::cstring)] END,
       2 + 40 * random() ^ 3,
       (ARRAY['claude-desktop', 'cursor', 'inspector-cli'])[1 + g % 3],
       '1.0',
       'stdio',
       now() - interval '90 days' * random()
  FROM tenants AS t, generate_series(1, $1) AS g
"""

# Reading every row of the window once (the heap, not just the index): what any aggregate over it costs at least.
_FLOOR = """
SELECT count(*), sum(duration_ms) FROM card_mcp.card_usage WHERE tenant_id = $1 AND called_at >= $2 AND called_at < $3
"""


async def timed(runs: int, action: Any) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        await action()
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main(args: argparse.Namespace) -> None:
    async with postgres(args.database_url) as superuser_url, fresh_database(superuser_url) as name:
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
        app_url = with_user(superuser_url, db.APP_ROLE, name)
        tenant_ids = [await db.tenant_id_for(admin_url, f"usage-{n:03d}") for n in range(args.tenants)]
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        try:
            started = time.perf_counter()
            await superuser.execute(_LOAD, args.rows)
            await superuser.execute("VACUUM ANALYZE card_mcp.card_usage")
            load_s = time.perf_counter() - started
            total = await superuser.fetchval("SELECT count(*) FROM card_mcp.card_usage")
            version = await superuser.fetchval("SHOW server_version")
        finally:
            await superuser.close()

        tenant = tenant_ids[len(tenant_ids) // 2]
        until = datetime.now(UTC)
        since = until - timedelta(days=30)
        app = await db.connect(app_url)
        # As the command runs it: one execution per process, so planned with its parameters (no cached plan).
        admin = await asyncpg.connect(admin_url, statement_cache_size=0)
        results: list[tuple[str, list[float], list[float]]] = []
        try:
            await app.execute("SELECT set_config('app.current_tenant_id', $1, false)", str(tenant))
            rows_in_window = (await app.fetchrow(_FLOOR, tenant, since, until) or [0])[0]
            floor = await timed(args.runs, lambda: app.fetchrow(_FLOOR, tenant, since, until))
            for group_by in ("tool", "card", "day", "client"):

                def as_app(g: Any = group_by) -> Any:
                    return usage.stats(app, since=since, until=until, group_by=g, limit=20, tenant_id=tenant)

                def as_admin(g: Any = group_by) -> Any:
                    return usage.stats(admin, since=since, until=until, group_by=g, limit=20, tenant_id=tenant)

                assert [r.row for r in await as_app()] == [r.row for r in await as_admin()]
                results.append((group_by, await timed(args.runs, as_app), await timed(args.runs, as_admin)))
            plan = await app.fetch(
                "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + usage._STATS,
                since,
                until,
                "card",
                tenant,
                20,
            )
        finally:
            await app.close()
            await admin.close()

    floor_ms = statistics.median(floor)
    print(
        f"PostgreSQL {version} ({'external' if args.database_url else 'embedded'}); {total:,} usage rows of "
        f"{args.tenants} tenants over 90 days (loaded in {load_s:.0f} s); one tenant's last 30 days: "
        f"{rows_in_window:,} rows; median of {args.runs} runs"
    )
    print()
    print("| what | median ms | max ms | floor ms | ratio |")
    print("|---|---:|---:|---:|---:|")
    print(f"| read the window's rows once (floor) | {floor_ms:.1f} | {max(floor):.1f} | {floor_ms:.1f} | 1.00x |")
    for group_by, app_times, admin_times in results:
        for who, times in (("usage_stats (application role, RLS)", app_times), ("card-mcp usage (admin)", admin_times)):
            median = statistics.median(times)
            print(
                f"| {who}, group by {group_by} | {median:.1f} | {max(times):.1f} | {floor_ms:.1f} | "
                f"{median / floor_ms:.2f}x |"
            )
    print()
    print("Plan of usage_stats grouped by card, as the application role:")
    print()
    for line in plan:
        print("    " + line[0])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    arguments = parser.parse_args()
    if arguments.rows < arguments.tenants or arguments.tenants < 1 or arguments.runs < 1:
        parser.error("--rows must be at least --tenants, and --tenants and --runs at least 1")
    anyio.run(main, arguments)
    sys.exit(0)
