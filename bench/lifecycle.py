"""A tenant's data from arrival to erasure, at size (issue #22): the partitioned usage log with 10,000,000 rows, and
export / import of 100,000 cards. Prints tables; the rates are this machine's, the ratios hold across runs.

    python bench/lifecycle.py [--rows 10000000] [--cards 100000] [--database-url SUPERUSER_URL]

1. A call's usage insert (card_mcp.record_call as the application role, one statement per call, as the call edge
   writes it), on the partitioned table against the table as it was before schema/0010 (a database migrated up to
   0009), in alternating blocks, both nearly empty; then again on the partitioned table once it holds every row.
2. --rows usage rows of 50 tenants over 120 days, loaded by the superuser with one INSERT ... SELECT over
   generate_series into daily partitions made beforehand, then VACUUM ANALYZE.
3. One tenant's last 30 days, as usage_stats runs it (the application role, row-level security on), per grouping;
   the target is under 0.1 s.
4. Retention: the prune of the 90 daily partitions older than 30 days (card_mcp.usage_prune as the admin role);
   the target is under a second.
5. Export of --cards cards (one snapshot, a cursor, to a file) and their import into an empty tenant, then the
   same import again (every card existing): cards per second, and the process's peak memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from batch import fresh_database, postgres, with_database, with_user

from card_mcp import db, migrate, retention, transfer, usage

TENANTS = 50
DAYS = 120

_PARTITION = "SELECT card_mcp.create_usage_partition($1::text, $2::timestamptz, $2::timestamptz + interval '1 day')"
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
       now() - interval '1 day' * $2 * random()
  FROM tenants AS t, generate_series(1, $1) AS g
"""
_RECORD = "SELECT card_mcp.record_call($1, 'get_card', 'ok', NULL, '{}', 1.5, 'bench', '1.0', 'stdio', NULL)"
_SET_TENANT = "SELECT set_config('app.current_tenant_id', $1, false)"
# Cards with their content hash made in SQL exactly as models.canonical_json would ({"n": .., "text": ..}).
_CARDS = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, tags, content_hash)
SELECT $1, (ARRAY['company', 'audience', 'voice', 'insight'])[1 + g % 4], 'card ' || g,
       jsonb_build_object('n', g, 'text', repeat('brand words ', 20) || g),
       ARRAY['bench', 'tag' || (g % 10)],
       encode(sha256(convert_to('{"n":' || g || ',"text":"' || repeat('brand words ', 20) || g || '"}', 'UTF8')), 'hex')
  FROM generate_series(1, $2) AS g
"""


async def timed(action: Any) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def insert_blocks(urls: dict[str, str], tenants: dict[str, Any], blocks: int, per_block: int) -> dict[str, float]:
    """Median microseconds per usage insert, per database, in alternating blocks."""
    conns = {label: await db.connect(url) for label, url in urls.items()}
    times: dict[str, list[float]] = {label: [] for label in urls}
    try:
        for label, conn in conns.items():
            await conn.execute(_SET_TENANT, str(tenants[label]))
            for _ in range(200):  # warm: plans cached, pages in memory
                await conn.execute(_RECORD, tenants[label])
        for _ in range(blocks):
            for label, conn in conns.items():
                started = time.perf_counter()
                for _ in range(per_block):
                    await conn.execute(_RECORD, tenants[label])
                times[label].append((time.perf_counter() - started) / per_block * 1e6)
    finally:
        for conn in conns.values():
            await conn.close()
    return {label: statistics.median(values) for label, values in times.items()}


async def main(args: argparse.Namespace) -> None:
    before_0010 = [m for m in migrate.load_migrations() if m.version < "0010"]
    async with (
        postgres(args.database_url) as superuser_url,
        fresh_database(superuser_url) as name,
        fresh_database(superuser_url, before_0010) as old_name,
    ):
        admin_url = with_user(superuser_url, db.ADMIN_ROLE, name)
        app_url = with_user(superuser_url, db.APP_ROLE, name)
        owner_url = with_user(superuser_url, db.OWNER_ROLE, name)
        tenant_ids = [await db.tenant_id_for(admin_url, f"usage-{n:03d}") for n in range(TENANTS)]
        old_tenant = await db.tenant_id_for(with_user(superuser_url, db.ADMIN_ROLE, old_name), "usage-old")

        print("1/5 usage insert, partitioned vs not", file=sys.stderr)
        urls = {"partitioned": app_url, "before 0010": with_user(superuser_url, db.APP_ROLE, old_name)}
        tenants = {"partitioned": tenant_ids[0], "before 0010": old_tenant}
        insert_empty = await insert_blocks(urls, tenants, blocks=10, per_block=300)

        print(f"2/5 loading {args.rows:,} usage rows", file=sys.stderr)
        owner = await db.connect(owner_url)
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        try:
            today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            for n in range(DAYS, 0, -1):
                day = today - timedelta(days=n)
                if not await owner.fetchval("SELECT to_regclass($1) IS NOT NULL", f"card_mcp.card_usage_p{day:%Y%m%d}"):
                    await owner.execute(_PARTITION, f"card_usage_p{day:%Y%m%d}", day)
            started = time.perf_counter()
            await superuser.execute(_LOAD, args.rows, DAYS)
            await superuser.execute("VACUUM ANALYZE card_mcp.card_usage")
            load_s = time.perf_counter() - started
            total = await superuser.fetchval("SELECT count(*) FROM card_mcp.card_usage")
            in_default = await superuser.fetchval("SELECT count(*) FROM card_mcp.card_usage_default")
            partitions = await superuser.fetchval(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = 'card_mcp.card_usage'::regclass"
            )
            version = await superuser.fetchval("SHOW server_version")
        finally:
            await owner.close()
            await superuser.close()
        insert_full = await insert_blocks({"partitioned": app_url}, tenants, blocks=10, per_block=300)

        print("3/5 a tenant's 30 days as the application role", file=sys.stderr)
        tenant = tenant_ids[len(tenant_ids) // 2]
        until = datetime.now(UTC)
        since = until - timedelta(days=30)
        app = await db.connect(app_url)
        query_ms: dict[str, float] = {}
        try:
            await app.execute(_SET_TENANT, str(tenant))
            window = await app.fetchval(
                "SELECT count(*) FROM card_mcp.card_usage WHERE called_at >= $1 AND called_at < $2", since, until
            )
            for group_by in ("tool", "card", "day", "client"):
                runs = []
                for _ in range(args.runs):
                    runs.append(
                        await timed(
                            lambda g=group_by: usage.stats(
                                app, since=since, until=until, group_by=g, limit=20, tenant_id=tenant
                            )
                        )
                    )
                query_ms[group_by] = statistics.median(runs) * 1000
        finally:
            await app.close()

        print("4/5 prune of the partitions older than 30 days", file=sys.stderr)
        admin = await db.connect(admin_url)
        try:
            started = time.perf_counter()
            dropped = await retention.prune(admin, retention.cut_off(30))
            prune_s = time.perf_counter() - started
        finally:
            await admin.close()
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        try:
            left = await superuser.fetchval("SELECT count(*) FROM card_mcp.card_usage")
        finally:
            await superuser.close()

        print(f"5/5 export and import of {args.cards:,} cards", file=sys.stderr)
        source = await db.tenant_id_for(admin_url, "export-source")
        target = await db.tenant_id_for(admin_url, "import-target")
        superuser = await asyncpg.connect(with_database(superuser_url, name))
        try:
            await superuser.execute(_CARDS, source, args.cards)
            await superuser.execute("VACUUM ANALYZE card_mcp.cards")
        finally:
            await superuser.close()
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "export.jsonl"
            conn = await db.connect(app_url)
            try:
                with path.open("w", encoding="utf-8") as out:
                    started = time.perf_counter()
                    exported = await transfer.export_cards(conn, source, "export-source", out)
                    export_s = time.perf_counter() - started
                rss_export = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                size_mb = path.stat().st_size / 1e6
                started = time.perf_counter()
                first = await transfer.import_cards(conn, target, path)
                import_s = time.perf_counter() - started
                started = time.perf_counter()
                again = await transfer.import_cards(conn, target, path)
                again_s = time.perf_counter() - started
            finally:
                await conn.close()

    print(
        f"PostgreSQL {version} ({'external' if args.database_url else 'embedded'}); shared machine; "
        f"{total:,} usage rows of {TENANTS} tenants over {DAYS} days in {partitions} partitions "
        f"({in_default} in the default one), loaded in {load_s:.0f} s"
    )
    print()
    print("| what | figure | target |")
    print("|---|---:|---|")
    ratio = insert_empty["partitioned"] / insert_empty["before 0010"]
    print(
        f"| usage insert (record_call), partitioned, near-empty | {insert_empty['partitioned']:.0f} µs | |\n"
        f"| usage insert, the table before 0010, near-empty | {insert_empty['before 0010']:.0f} µs | |\n"
        f"| ratio partitioned / before | {ratio:.2f}x | within noise (about 1.1x) |\n"
        f"| usage insert, partitioned, with {total:,} rows | {insert_full['partitioned']:.0f} µs | |"
    )
    for group_by, ms in query_ms.items():
        what = f"one tenant's 30 days ({window:,} rows), group by {group_by}, app role, median"
        print(f"| {what} | {ms:.1f} ms | < 100 ms |")
    print(f"| prune: {len(dropped)} partitions dropped, {total - left:,} rows | {prune_s * 1000:.0f} ms | < 1000 ms |")
    print(
        f"| export {exported.cards:,} cards ({size_mb:.0f} MB) | {exported.cards / export_s:,.0f} cards/s | |\n"
        f"| import into an empty tenant ({first.created:,} created) | {first.cards / import_s:,.0f} cards/s | |\n"
        f"| the same import again ({again.existing:,} existing, {again.created} created) | "
        f"{again.cards / again_s:,.0f} cards/s | |\n"
        f"| peak memory of this process: before export, after export | {rss_before / 1024:.0f} MB, "
        f"{rss_export / 1024:.0f} MB | flat |"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    anyio.run(main, parser.parse_args())
    sys.exit(0)
