"""The HTTP soak (bench/soak.py), short: a real `card-mcp serve --transport http`, concurrent SDK clients of
several tenants calling every tool, and a client-side ledger of every acknowledged write and every call,
compared with the cards and the usage log in the database at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def test_a_short_soak_over_http_loses_duplicates_and_miscounts_nothing() -> None:
    command = [sys.executable, str(SOAK), "--seconds", "20", "--json"]
    external = os.environ.get("CARD_MCP_TEST_DATABASE_URL")
    if external:  # its own database on that server, dropped at the end; else its own embedded server
        command += ["--database-url", external]
    # The timeout only stops a hung run; nothing here depends on how fast the calls are.
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    # The server's ERROR records come first in the report, its tables last: both halves when it is long.
    report = run.stderr if len(run.stderr) <= 16000 else f"{run.stderr[:8000]}\n[...]\n{run.stderr[-8000:]}"
    assert run.returncode == 0, report
    summary = json.loads(run.stdout)
    assert summary["passed"]
    assert summary["operations"] >= 50 and summary["acknowledged_writes"] >= 10
    assert (summary["lost"], summary["duplicated"], summary["unacknowledged"]) == (0, 0, 0)
    assert (summary["usage_mismatches"], summary["isolation"], summary["stale_reads"]) == (0, 0, 0)
    assert (summary["inconsistent"], summary["idempotency"], summary["unhealthy"]) == (0, 0, 0)
    assert summary["backends"]["after_stop"] == 0
    assert {row["tool"] for row in summary["calls"]} == {
        "create_card",
        "get_card",
        "search_cards",
        "update_card",
        "delete_card",
        "batch_create_cards",
        "usage_stats",
    }
