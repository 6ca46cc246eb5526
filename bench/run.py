"""Every benchmark in one run and one table: what, card-mcp's figure, the floor's figure measured in the same run,
the ratio and the target.

    python bench/run.py [--database-url SUPERUSER_URL] [--quick]

Runs bench/calls.py (get_card over stdio and HTTP, round trips, the tenant transaction, 32-client throughput,
memory over 100,000 calls), bench/batch.py (1000 cards against COPY, and the replay) and bench/startup.py (cold
and warm start of the embedded database, always embedded: it is what Claude Desktop starts). --quick makes every
measure smaller (for a first look; the figures in docs/benchmarks.md come from a full run). Progress goes to
stderr, the table to stdout. The search and usage benchmarks load a million rows each and run on their own
(bench/search.py, bench/usage.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from importlib.metadata import version

import anyio
import batch
import calls
import startup
from calls import Row


async def main(args: argparse.Namespace) -> list[Row]:
    options = ["--calls", "600", "--memory-calls", "10000", "--seconds", "5"] if args.quick else []
    if args.database_url:
        options += ["--database-url", args.database_url]
    rows = await calls.run(calls.parser().parse_args(options))
    print("- batch", file=sys.stderr)
    batch_args = argparse.Namespace(
        runs=3 if args.quick else 7, cards=1000, seed=1, database_url=args.database_url, check=False
    )
    times, _ = await batch.measure(batch_args)
    ms = {what: 1000 * statistics.median(values) for what, values in times.items()}
    rows += [
        Row("batch_create_cards of 1000 cards via the MCP client vs COPY", ms["mcp"], ms["copy"], "ms", "≤ 1.5"),
        Row("batch_create_cards of 1000 cards, server side vs COPY", ms["server"], ms["copy"], "ms", "≤ 1.5"),
        Row("replay of that batch vs the original, via the MCP client", ms["replay"], ms["mcp"], "ms", "≤ 0.2"),
    ]
    print("- startup", file=sys.stderr)
    starts = await startup.measure(2 if args.quick else 5, {"serve": startup.CARD_MCP})
    floor = 1000 * statistics.median(starts["floor"])
    cold, warm = (
        1000 * statistics.median(starts[f"serve, {what}"]) for what in ("fresh data dir (initdb)", "existing data dir")
    )
    rows += [
        Row("cold start to tools/list (initdb, migrations)", cold, floor, "ms"),
        Row("warm start to tools/list (existing data dir)", warm, floor, "ms", "≤ 1.2"),
    ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    parser.add_argument("--quick", action="store_true", help="smaller measures, for a first look")
    arguments = parser.parse_args()
    table = calls.table(anyio.run(main, arguments))
    print(
        f"{'external PostgreSQL' if arguments.database_url else 'embedded PostgreSQL 18'}, Python "
        f"{platform.python_version()}, mcp {version('mcp')}, asyncpg {version('asyncpg')}, {os.cpu_count()} cores\n"
    )
    print(table)
