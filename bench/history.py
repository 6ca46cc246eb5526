"""What card history costs (issue #21): an update with its version row against today's update, a 1000-card batch
with its 1000 version rows against today's COPY, and the history table's bytes per version of a typical card.

    python bench/history.py [--updates 100] [--runs 6] [--database-url SUPERUSER_URL]

Without --database-url it starts the embedded PostgreSQL in a temporary folder under /tmp; with it (a superuser
URL such as postgresql://postgres@127.0.0.1:5432/postgres) it uses that server. Either way it creates a fresh
migrated database (bench/batch.py's fresh_database) and drops it at the end.

Three fresh databases on one server, one per mode: "today" has the two history triggers disabled (ALTER TABLE ...
DISABLE TRIGGER, as the owner, once), so the same code and statements run without the version rows; "with" is
card-mcp as migrated; "row" has them replaced by the alternative below. The calls go to the three databases in
turn, one call each, so drift on a shared machine hits every mode alike. What each row times:

* update_card's statements alone: the locked read and the UPDATE (with its version row, by trigger, or not) on a
  warm connection, each timed without its BEGIN and COMMIT (which does not wait for the WAL flush): what the
  version row costs the database, without the flush, whose wait varies most on a shared machine.
* update_card, database work: the call edge on a warm pool of the application role (BEGIN with the tenant and the
  actor, the locked read, the UPDATE, the usage row, COMMIT), a new title each time; per call.
* update_card via the MCP client: one call_tool through the SDK's in-memory client against build_server; per call.
* 1000-card batch, database work: bench/batch.py's "same work without MCP" (encode, idempotency claim, the bulk
  INSERTs, the stored answer, the usage row, COMMIT) against the floor of bench/batch.py, a superuser COPY of the
  same rows, with the history triggers disabled (today's COPY). COPY with the triggers on is shown for reference:
  a COPY writes its version rows too.
* alternative, a trigger per row: the same with one AFTER ... FOR EACH ROW trigger (made by this benchmark) that
  inserts each card's version row, instead of card-mcp's two statement-level triggers with transition tables.
* bytes per version: 1000 cards of 300-600 bytes of content (bench/batch.py's cards) created and each updated once:
  the history table's size (heap, TOAST and index) over its rows, and the mean row as PostgreSQL stores it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from batch import COPY_COLUMNS, fresh_database, make_cards, postgres, with_database, with_user
from mcp import Client

from card_mcp import cards as card_store
from card_mcp import db, idempotency
from card_mcp.calls import Caller, Edge
from card_mcp.config import Settings
from card_mcp.models import NewCard, canonical_json, content_hash
from card_mcp.server import build_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UPDATE_TARGET = 1.2
BATCH_TARGET = 1.5
# The way measured against: one trigger per row (FOR EACH ROW), each inserting its card's version row. Made by
# this benchmark in its own database, as the owner, disabled until its blocks.
_ROW_TRIGGERS = """
CREATE FUNCTION card_mcp.bench_keep_version_row() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    actor jsonb := NULLIF(current_setting('card_mcp.actor', true), '')::jsonb;
BEGIN
    IF TG_OP = 'UPDATE' AND (NEW.version, NEW.title, NEW.tags, NEW.content_hash, NEW.is_active)
       IS NOT DISTINCT FROM (OLD.version, OLD.title, OLD.tags, OLD.content_hash, OLD.is_active) THEN
        RETURN NULL;
    END IF;
    INSERT INTO card_mcp.card_versions
           (tenant_id, card_id, version, op, card_type, title, content, tags, content_hash, is_active, transport,
            api_key_id, connection_id, oauth_client_id, client_name, client_version)
    VALUES (NEW.tenant_id, NEW.id, NEW.version, CASE TG_OP WHEN 'INSERT' THEN 'create' ELSE 'update' END,
            NEW.card_type, NEW.title, NEW.content, NEW.tags, NEW.content_hash, NEW.is_active,
            COALESCE(actor->>'transport', 'database'), (actor->>'api_key_id')::uuid, (actor->>'connection_id')::uuid,
            actor->>'oauth_client_id', actor->>'client_name', actor->>'client_version');
    RETURN NULL;
END
$$;
CREATE TRIGGER bench_keep_version_row AFTER INSERT OR UPDATE ON card_mcp.cards
    FOR EACH ROW EXECUTE FUNCTION card_mcp.bench_keep_version_row();
ALTER TABLE card_mcp.cards DISABLE TRIGGER bench_keep_version_row;
"""
# Which history triggers each mode has on: today's (none), card-mcp's (per statement), the alternative (per row).
MODES = {
    "today": (),
    "with": ("cards_keep_inserted_versions", "cards_keep_updated_versions"),
    "row": ("bench_keep_version_row",),
}
_DISABLE = "ALTER TABLE card_mcp.cards DISABLE TRIGGER {}"
_SIZE = """
SELECT pg_total_relation_size('card_mcp.card_versions') AS total, count(*) AS n, avg(pg_column_size(v.*)) AS row
  FROM card_mcp.card_versions AS v
"""


async def timed(action: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


@dataclass
class Mode:
    """One database of the run, its history triggers set for one mode, and what calls it."""

    label: str
    owner_url: str
    superuser: asyncpg.Connection[asyncpg.Record]
    pool: asyncpg.Pool
    edge: Edge
    client: Client
    caller: Caller
    card_id: uuid.UUID
    statements: db.Connection  # a connection of the application role, held for update_card's statements alone

    async def new_tenant(self) -> uuid.UUID:
        return await db.tenant_id_for(self.owner_url, f"bench-{uuid.uuid4().hex[:12]}")


@asynccontextmanager
async def mode_database(stack: AsyncExitStack, superuser_url: str, label: str, card: NewCard) -> AsyncIterator[Mode]:
    """A fresh database with the history triggers of ``label``, a card to update, a pool, an MCP client."""
    name = await stack.enter_async_context(fresh_database(superuser_url))
    app_url = with_user(superuser_url, db.APP_ROLE, name)
    owner_url = with_user(superuser_url, db.OWNER_ROLE, name)
    settings = Settings(
        database_url=app_url,
        admin_database_url=with_user(superuser_url, db.ADMIN_ROLE, name),
        log_level="WARNING",
        semantic="off",
    )
    owner = await db.connect(owner_url)
    try:
        await owner.execute(_ROW_TRIGGERS)
        for trigger in {name for names in MODES.values() for name in names} - set(MODES[label]):
            await owner.execute(_DISABLE.format(trigger))
    finally:
        await owner.close()
    superuser = await asyncpg.connect(with_database(superuser_url, name))
    stack.push_async_callback(superuser.close)
    pool = await db.create_pool(app_url, settings)
    stack.push_async_callback(pool.close)
    tenant = f"bench-{uuid.uuid4().hex[:12]}"
    tenant_id = await db.tenant_id_for(owner_url, tenant)
    caller = Caller(tenant_id, "stdio", client_name="bench", client_version="1")
    edge = Edge(pool, settings)
    async with edge.call(caller, "create_card", durable=True) as call:
        _, made = await card_store.create_card(await call.transaction(), tenant_id, card)
    client = await stack.enter_async_context(
        Client(build_server(settings.model_copy(update={"tenant": tenant})), mode="legacy")
    )
    statements = await pool.acquire()
    stack.push_async_callback(pool.release, statements)
    yield Mode(label, owner_url, superuser, pool, edge, client, caller, made.id, statements)


async def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float], str]:
    cards = make_cards(1000, 1)
    new_cards = [NewCard.model_validate(c) for c in cards]
    times: dict[str, list[float]] = {}

    def record(what: str, mode: Mode, seconds: float) -> None:
        times.setdefault(f"{what}_{mode.label}", []).append(seconds)

    async def update_statements(m: Mode) -> float:
        """update_card's statements alone (the locked read and the UPDATE with its trigger), timed without BEGIN
        and COMMIT, which commits without waiting for the WAL flush (not durable)."""
        await db.begin(m.statements, m.caller.tenant_id, 0, durable=False, actor=m.caller.actor())
        try:
            return await timed(lambda: card_store.update_card(m.statements, m.card_id, title=uuid.uuid4().hex))
        finally:
            await db.commit(m.statements)

    async def update_edge(m: Mode) -> None:
        async with m.edge.call(m.caller, "update_card", durable=True) as call:
            await card_store.update_card(await call.transaction(), m.card_id, title=uuid.uuid4().hex)

    async def update_mcp(m: Mode) -> None:
        result = await m.client.call_tool("update_card", {"card_id": str(m.card_id), "title": uuid.uuid4().hex})
        assert not result.is_error, result.content

    async def batch(m: Mode) -> None:
        tenant_id = await m.new_tenant()
        key = f"bench-{uuid.uuid4()}"
        encoded = card_store.encode_cards(new_cards)
        digest = idempotency.request_hash(new_cards, [d for _, d in encoded])
        async with m.edge.call(Caller(tenant_id, "stdio"), "batch_create_cards", durable=True) as call:
            conn = await call.transaction()
            assert await idempotency.replay(conn, key, "batch_create_cards", digest) is None
            items = await card_store.insert_cards(conn, tenant_id, new_cards, encoded)
            await idempotency.store(conn, tenant_id, key, "batch_create_cards", digest, {"n": len(items)})
            call.touched(*(i.card_id for i in items))

    async def copy(m: Mode) -> None:
        tenant_id = await m.new_tenant()
        records = [
            (tenant_id, c["card_type"], c["title"], json.dumps(c["content"]), c["tags"], content_hash(c["content"]))
            for c in cards
        ]
        async with m.superuser.transaction():
            await m.superuser.copy_records_to_table(
                "cards", schema_name="card_mcp", columns=COPY_COLUMNS, records=records
            )

    async with postgres(args.database_url) as superuser_url, AsyncExitStack() as stack:
        modes = [
            await stack.enter_async_context(mode_database(stack, superuser_url, label, new_cards[0])) for label in MODES
        ]
        # Warm-up: statements prepared, caches warm, in every database.
        for m in modes:
            await update_statements(m)
            for action in (update_edge, update_mcp, batch, copy):
                await action(m)
        for run in range(args.runs):
            order = modes[run % 3 :] + modes[: run % 3]  # which goes first rotates
            gc.collect()
            for _ in range(args.updates):  # one call in each database in turn: drift hits all alike
                for m in order:
                    record("update_sql", m, await update_statements(m))
                for m in order:
                    record("update_edge", m, await timed(lambda: update_edge(m)))  # noqa: B023 - awaited at once
            for _ in range(args.updates):
                for m in order:
                    record("update_mcp", m, await timed(lambda: update_mcp(m)))  # noqa: B023
            for m in order:
                gc.collect()
                record("batch", m, await timed(lambda: batch(m)))  # noqa: B023
                gc.collect()
                record("copy", m, await timed(lambda: copy(m)))  # noqa: B023
        # Bytes per version: a fresh table's worth of typical cards, created and each updated once.
        sized = modes[list(MODES).index("with")]
        await sized.superuser.execute("TRUNCATE card_mcp.card_versions")
        size_tenant = await sized.new_tenant()
        async with sized.edge.call(Caller(size_tenant, "stdio", client_name="bench"), "bench", durable=True) as call:
            conn = await call.transaction()
            items = await card_store.insert_cards(conn, size_tenant, new_cards)
            for item in items:
                await card_store.update_card(conn, item.card_id, title=f"Updated {item.index}")
        await sized.superuser.execute("VACUUM ANALYZE card_mcp.card_versions")
        size = await sized.superuser.fetchrow(_SIZE)
        assert size is not None
        server_version = await sized.superuser.fetchval("SHOW server_version")
    contents = [len(canonical_json(c["content"]).encode()) for c in cards]
    sizes = {
        "per_version": size["total"] / size["n"],
        "row": float(size["row"]),
        "versions": size["n"],
        "content": statistics.mean(contents),
    }
    environment = (
        f"PostgreSQL {server_version} ({'external' if args.database_url else 'embedded'}), {args.runs} runs of "
        f"{args.updates} updates and one 1000-card batch and COPY per database, after a warm-up; Python "
        f"{platform.python_version()}, mcp {version('mcp')}, asyncpg {version('asyncpg')}"
    )
    return times, sizes, environment


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]


def report(times: dict[str, list[float]], sizes: dict[str, float], environment: str) -> bool:
    ms = {what: [v * 1000 for v in values] for what, values in times.items()}
    median = {what: statistics.median(values) for what, values in ms.items()}
    rows = (
        (
            "update_card's statements alone (no BEGIN, COMMIT): today (floor)",
            "update_sql_today",
            "update_sql_today",
            None,
        ),
        ("update_card's statements alone: with its version row", "update_sql_with", "update_sql_today", None),
        ("update_card, database work: today (floor)", "update_edge_today", "update_edge_today", None),
        ("update_card, database work: with its version row", "update_edge_with", "update_edge_today", UPDATE_TARGET),
        ("update_card via the MCP client: today (floor)", "update_mcp_today", "update_mcp_today", None),
        ("update_card via the MCP client: with its version row", "update_mcp_with", "update_mcp_today", UPDATE_TARGET),
        ("COPY of 1000 cards, today (floor)", "copy_today", "copy_today", None),
        ("COPY of 1000 cards with their version rows (info)", "copy_with", "copy_today", None),
        ("1000-card batch, database work: today", "batch_today", "copy_today", BATCH_TARGET),
        ("1000-card batch, database work: with 1000 version rows", "batch_with", "copy_today", BATCH_TARGET),
        ("alternative, a trigger per row: update_card's statements", "update_sql_row", "update_sql_today", None),
        ("alternative, a trigger per row: update_card, database work", "update_edge_row", "update_edge_today", None),
        ("alternative, a trigger per row: 1000-card batch, database work", "batch_row", "copy_today", None),
    )
    met = True
    print(environment)
    print()
    print("| what | median ms | p90 ms | floor ms | ratio | target |")
    print("|---|---:|---:|---:|---:|---|")
    for name, what, base, target in rows:
        ratio = median[what] / median[base]
        verdict = ""
        if target is not None:
            ok = ratio <= target
            met = met and ok
            verdict = f"≤ {target:.1f}x {'met' if ok else 'MISSED'}"
        print(f"| {name} | {median[what]:.3f} | {p90(ms[what]):.3f} | {median[base]:.3f} | {ratio:.2f}x | {verdict} |")
    print()
    print(
        f"History growth: {sizes['per_version']:.0f} bytes per version on disk (table, TOAST and primary key over "
        f"{sizes['versions']:.0f} versions), {sizes['row']:.0f} bytes per row as stored, for cards of "
        f"{sizes['content']:.0f} bytes of content on average."
    )
    return met


async def main(args: argparse.Namespace) -> bool:
    return report(*await measure(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=100, help="updates of each kind per run and database")
    parser.add_argument("--runs", type=int, default=6, help="runs (each with one batch and one COPY per database)")
    parser.add_argument("--database-url", help="a superuser URL of an external server (default: embedded)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    arguments = parser.parse_args()
    if arguments.runs < 1 or arguments.updates < 1:
        parser.error("--runs and --updates must be at least 1")
    all_met = anyio.run(main, arguments)
    sys.exit(1 if arguments.check and not all_met else 0)
