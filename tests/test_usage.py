"""Usage figures for analysts: the usage_stats tool, `card-mcp usage` in every format, the SQL views and the
chart, each checked against figures computed here, independently, from the raw card_usage rows."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from card_mcp import db
from card_mcp.config import Settings
from tests.conftest import TestDatabase
from tests.helpers import connect, error_code, ok, tenant_transaction
from tests.test_http import run_cli

GROUPINGS = ("tool", "card", "day", "client")


def percentile(values: list[float], fraction: float) -> float:
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def expected(rows: list[asyncpg.Record], group_by: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(tenant, key) -> calls, errors, p50_ms, p95_ms, last_at, from raw rows."""
    key_of: dict[str, Callable[[asyncpg.Record], list[str]]] = {
        "tool": lambda r: [r["tool"]],
        "client": lambda r: [r["client_name"]],
        "day": lambda r: [r["called_at"].date().isoformat()],
        "card": lambda r: [str(c) for c in r["card_ids"]],
    }
    groups: dict[tuple[str, str], list[asyncpg.Record]] = defaultdict(list)
    for row in rows:
        for key in key_of[group_by](row):
            groups[(row["tenant"], key)].append(row)
    return {
        group: {
            "calls": len(members),
            "errors": sum(m["status"] == "error" for m in members),
            "p50_ms": percentile([m["duration_ms"] for m in members], 0.5),
            "p95_ms": percentile([m["duration_ms"] for m in members], 0.95),
            "last_at": max(m["called_at"] for m in members),
        }
        for group, members in groups.items()
    }


@dataclass(frozen=True)
class Mix:
    tenants: tuple[str, str]
    since: datetime
    until: datetime
    raw: list[asyncpg.Record]


@pytest.fixture(scope="module")
async def mix(database: TestDatabase, settings: Settings) -> Mix:
    """A known mix of calls by two clients in tenant A and one in tenant B, errors included."""
    a, b = f"ua-{uuid.uuid4().hex[:8]}", f"ub-{uuid.uuid4().hex[:8]}"
    conn = await db.connect(database.admin_url)
    try:
        since = await conn.fetchval("SELECT now()")
        async with connect(settings, a, client_name="alpha") as alpha:
            made = [
                ok(await alpha.call_tool("create_card", {"card_type": t, "title": f"{t} card", "content": {"t": t}}))
                for t in ("company", "voice", "audience")
            ]
            ids = [m["card"]["id"] for m in made]
            for card_id in (ids[0], ids[0], ids[1]):
                ok(await alpha.call_tool("get_card", {"card_id": card_id}))
            assert error_code(await alpha.call_tool("get_card", {"card_id": str(uuid.uuid4())})) == "not_found"
            assert error_code(await alpha.call_tool("create_card", {"card_type": "voice"})) == "invalid_argument"
            ok(await alpha.call_tool("search_cards", {"query": "card"}))
            stale = {"card_id": ids[2], "title": "x", "expected_version": 9}
            assert error_code(await alpha.call_tool("update_card", stale)) == "conflict"
        async with connect(settings, a, client_name="beta") as beta:
            ok(await beta.call_tool("get_card", {"card_id": ids[2]}))
            ok(
                await beta.call_tool(
                    "batch_create_cards", {"cards": [{"card_type": "insight", "title": "i", "content": {}}]}
                )
            )
        async with connect(settings, b, client_name="gamma") as gamma:
            ok(await gamma.call_tool("create_card", {"card_type": "voice", "title": "b voice", "content": {"b": 1}}))
            assert error_code(await gamma.call_tool("delete_card", {"card_id": ids[0]})) == "not_found"
        until = await conn.fetchval("SELECT clock_timestamp()")
        raw = await conn.fetch(
            "SELECT t.name AS tenant, u.* FROM card_mcp.card_usage u JOIN card_mcp.tenants t USING (tenant_id)"
            " WHERE t.name = ANY($1) AND u.called_at >= $2 AND u.called_at < $3",
            [a, b],
            since,
            until,
        )
    finally:
        await conn.close()
    assert len(raw) == 14
    return Mix((a, b), since, until, raw)


def comparable(figures: dict[str, Any]) -> dict[str, Any]:
    """Figures as the tool gives them: durations to 0.1 ms (rounded half to even: within 0.05 of the exact)."""
    return {
        **figures,
        "p50_ms": pytest.approx(figures["p50_ms"], abs=0.0501),
        "p95_ms": pytest.approx(figures["p95_ms"], abs=0.0501),
    }


@pytest.mark.parametrize("group_by", GROUPINGS)
async def test_usage_stats_tool_matches_the_raw_rows_and_only_its_tenant(
    settings: Settings, mix: Mix, group_by: str
) -> None:
    tenant_a = mix.tenants[0]
    want = {key: f for (tenant, key), f in expected(mix.raw, group_by).items() if tenant == tenant_a}
    window = {"since": mix.since.isoformat(), "until": mix.until.isoformat(), "group_by": group_by, "limit": 100}
    async with connect(settings, tenant_a) as client:
        rows = ok(await client.call_tool("usage_stats", window))["rows"]
    got = {r["key"]: {**r, "last_at": datetime.fromisoformat(r["last_at"])} for r in rows}
    assert {k: {f: v for f, v in r.items() if f != "key"} for k, r in got.items()} == {
        k: comparable(f) for k, f in want.items()
    }
    if group_by == "day":
        assert [r["key"] for r in rows] == sorted(got, reverse=True)
    else:
        assert [r["calls"] for r in rows] == sorted((r["calls"] for r in rows), reverse=True)


def usage_cli(database: TestDatabase, mix: Mix, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(database, "usage", "--since", mix.since.isoformat(), "--until", mix.until.isoformat(), *args)


def parse(output: str, fmt: str) -> list[dict[str, Any]]:
    if fmt == "json":
        rows: list[dict[str, Any]] = json.loads(output)["rows"]
        return rows
    if fmt == "csv":
        return list(csv.DictReader(io.StringIO(output)))
    header, *lines = output.splitlines()
    columns = header.split()
    return [dict(zip(columns, line.split(None, len(columns) - 1), strict=True)) for line in lines]


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
@pytest.mark.parametrize("group_by", GROUPINGS)
async def test_usage_command_matches_the_raw_rows_in_every_format(
    database: TestDatabase, mix: Mix, group_by: str, fmt: str
) -> None:
    want = expected(mix.raw, group_by)
    one = usage_cli(
        database, mix, "--tenant", mix.tenants[0], "--group-by", group_by, "--format", fmt, "--limit", "100"
    )
    every = usage_cli(database, mix, "--group-by", group_by, "--format", fmt, "--limit", "100")
    assert one.returncode == 0 and every.returncode == 0, one.stderr + every.stderr
    for result, tenants in ((one, mix.tenants[:1]), (every, mix.tenants)):
        rows = parse(result.stdout, fmt)
        if result is one:
            assert all("tenant" not in r for r in rows)
            rows = [{**r, "tenant": mix.tenants[0]} for r in rows]
        rows = [r for r in rows if r["tenant"] in tenants]  # the shared test database holds other tests' tenants
        got = {(r["tenant"], r["key"]): (int(r["calls"]), int(r["errors"]), float(r["p95_ms"])) for r in rows}
        assert got.keys() == {g for g in want if g[0] in tenants}
        for group, (calls, errors, p95) in got.items():
            assert (calls, errors) == (want[group]["calls"], want[group]["errors"]), group
            assert p95 == pytest.approx(want[group]["p95_ms"], abs=0.0501)  # to 0.1 ms, in every format
            assert p95 == round(p95, 1)


async def test_the_views_read_as_the_application_role_return_only_its_tenant(
    database: TestDatabase, app_pool: asyncpg.Pool, mix: Mix
) -> None:
    tenant_a = mix.tenants[0]
    tenant_id = await db.tenant_id_for(database.admin_url, tenant_a)
    async with tenant_transaction(app_pool, tenant_id) as conn:
        read_at = await conn.fetchval("SELECT now()")
        daily = await conn.fetch("SELECT * FROM card_mcp.usage_daily")
        cards = await conn.fetch("SELECT * FROM card_mcp.usage_by_card")
        clients = await conn.fetch("SELECT * FROM card_mcp.usage_by_client")
    assert {r["tenant_id"] for r in [*daily, *cards, *clients]} == {tenant_id}
    conn = await db.connect(database.admin_url)
    # The views are not windowed: every row of the tenant so far, usage_stats calls of other tests included, but not
    # the usage row of the transaction that read them (tool "test"), which commits after its reads.
    try:
        raw = await conn.fetch(
            "SELECT t.name AS tenant, u.* FROM card_mcp.card_usage u JOIN card_mcp.tenants t USING (tenant_id)"
            " WHERE t.name = $1 AND NOT (u.tool = 'test' AND u.called_at >= $2)",
            tenant_a,
            read_at,
        )
    finally:
        await conn.close()
    tools = expected(raw, "tool")
    assert {r["tool"]: (r["calls"], r["errors"]) for r in daily} == {
        key: (f["calls"], f["errors"]) for (tenant, key), f in tools.items() if tenant == tenant_a
    }
    by_card = expected(raw, "card")
    assert {str(r["card_id"]): r["calls"] for r in cards} == {
        key: f["calls"] for (tenant, key), f in by_card.items() if tenant == tenant_a
    }
    assert {r["title"] for r in cards} == {"company card", "voice card", "audience card", "i"}
    assert {r["client_name"]: r["calls"] for r in clients} == {
        key: f["calls"] for (tenant, key), f in expected(raw, "client").items() if tenant == tenant_a
    }
    assert {"alpha", "beta"} <= {r["client_name"] for r in clients}
    for row in [*daily, *cards, *clients]:  # to 0.1 ms, as the command and the tool give them
        assert (row["p50_ms"], row["p95_ms"]) == (round(row["p50_ms"], 1), round(row["p95_ms"], 1))
    async with app_pool.acquire() as conn:  # no tenant set: nothing
        assert await conn.fetchval("SELECT count(*) FROM card_mcp.usage_daily") == 0


async def test_usage_chart_is_written_as_png_svg_or_html(database: TestDatabase, mix: Mix, tmp_path: Path) -> None:
    for name, magic in (("calls.png", b"\x89PNG"), ("calls.svg", b"<?xml"), ("calls.html", b"<!DOCTYPE html>")):
        target = tmp_path / name
        result = usage_cli(database, mix, "--tenant", mix.tenants[0], "--chart", str(target), "--format", "json")
        assert result.returncode == 0, result.stderr
        assert target.read_bytes().startswith(magic)
    assert b"<svg" in (tmp_path / "calls.html").read_bytes()
    refused = usage_cli(database, mix, "--chart", str(tmp_path / "calls.txt"))
    assert refused.returncode == 1 and ".png, .svg or .html" in refused.stderr


async def test_usage_refuses_an_unknown_tenant_and_a_bad_window(database: TestDatabase, mix: Mix) -> None:
    unknown = usage_cli(database, mix, "--tenant", "no-such-tenant")
    assert unknown.returncode == 1 and "no tenant" in unknown.stderr
    backwards = usage_cli(database, mix, "--since", "2026-01-02", "--until", "2026-01-01")  # last flag wins
    assert backwards.returncode == 1 and "since must be before until" in backwards.stderr


@pytest.mark.parametrize("since", ["7d", "24h", "today"])
async def test_usage_stats_tool_and_command_read_the_same_window_grammar(
    database: TestDatabase, settings: Settings, mix: Mix, since: str
) -> None:
    tenant_a = mix.tenants[0]
    since = mix.since.date().isoformat() if since == "today" else since  # a bare date: its midnight, UTC
    command = run_cli(database, "usage", "--tenant", tenant_a, "--since", since, "--format", "json")
    assert command.returncode == 0, command.stderr
    async with connect(settings, tenant_a) as client:  # after the command: its own row is not in its answer
        tool = ok(await client.call_tool("usage_stats", {"since": since}))["rows"]
    assert {r["key"]: (r["calls"], r["errors"]) for r in tool} == {
        r["key"]: (r["calls"], r["errors"]) for r in json.loads(command.stdout)["rows"]
    }
    assert {r["key"] for r in tool} >= {"create_card", "get_card"}


async def test_a_window_outside_the_grammar_is_named_by_the_tool_and_the_command(
    database: TestDatabase, settings: Settings, mix: Mix
) -> None:
    async with connect(settings, mix.tenants[0]) as client:
        result = await client.call_tool("usage_stats", {"since": "last week"})
    assert error_code(result) == "invalid_argument"
    assert "since is not a span or a date" in result.content[0].text  # type: ignore[union-attr]
    command = run_cli(database, "usage", "--since", "last week")
    assert command.returncode == 1 and command.stderr.splitlines() == [
        "card-mcp: since is not a span or a date (Use 7d, 24h, 2026-11-01 or 2026-11-01T12:00:00Z; times are UTC.)"
    ]
