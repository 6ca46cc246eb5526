"""What a person setting card-mcp up reads when it cannot start: one line, `card-mcp: what went wrong (how to fix
it)`, exit status 1, for every command and over both transports (the traceback only at CARD_MCP_LOG_LEVEL=DEBUG);
the tenant a typo would create; and a client that closes stdin with calls in flight still gets their answers."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.conftest import TestDatabase
from tests.test_http import run_cli
from tests.test_stdio import CARD_MCP

# A log line of the server (timestamp, level, logger): what a failure adds beside them is counted.
LOG_LEVELS = (" DEBUG ", " INFO ", " WARNING ")


def database_env(database: TestDatabase, **changes: str | None) -> dict[str, str]:
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_OWNER_DATABASE_URL": database.owner_url,
        "CARD_MCP_SEMANTIC": "off",
    }
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def card_mcp(env: dict[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CARD_MCP, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


def one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command says, after checking that it is all it says beside its log lines."""
    assert result.returncode == 1, result.stderr
    said = [line for line in result.stderr.splitlines() if not any(level in line[:40] for level in LOG_LEVELS)]
    assert len(said) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    line = said[0]
    assert line.startswith("card-mcp: ") and line.endswith(")"), line  # what went wrong (how to fix it)
    return line


SERVE = {"stdio": ("serve",), "http": ("serve", "--transport", "http", "--port", "0")}


@pytest.mark.parametrize("command", [("tenants", "list"), ("usage",), ("migrate", "--check"), *SERVE.values()])
def test_a_bad_setting_is_one_line_naming_the_variable_and_what_it_takes(
    database: TestDatabase, command: tuple[str, ...]
) -> None:
    result = card_mcp(database_env(database, CARD_MCP_STATEMENT_TIMEOUT_MS="abc"), *command)
    line = one_line_failure(result)
    assert line.startswith("card-mcp: CARD_MCP_STATEMENT_TIMEOUT_MS is not valid")
    assert "it takes an integer, at least 0" in line


def test_a_bad_flag_is_named_as_the_flag(database: TestDatabase) -> None:
    line = one_line_failure(card_mcp(database_env(database), "serve", "--transport", "http", "--port", "99999"))
    assert line.startswith("card-mcp: --port is not valid") and "at most 65535" in line
    line = one_line_failure(card_mcp(database_env(database, CARD_MCP_SEMANTIC="on"), "tenants", "list"))
    assert "CARD_MCP_SEMANTIC" in line and "one of auto, off" in line


@pytest.mark.parametrize("transport", sorted(SERVE))
def test_serve_that_cannot_start_says_why_in_one_line_over_either_transport(
    database: TestDatabase, transport: str, tmp_path: Path
) -> None:
    unreachable = "postgresql://card_mcp_app@127.0.0.1:1/card_mcp"
    nobody = database.app_url.replace("card_mcp_app@", f"nobody_{uuid.uuid4().hex[:6]}@", 1)
    failures = {
        "cannot connect to PostgreSQL": database_env(database, CARD_MCP_DATABASE_URL=unreachable),
        "does not exist": database_env(database, CARD_MCP_DATABASE_URL=nobody),
        "CARD_MCP_ADMIN_DATABASE_URL is not set": database_env(database, CARD_MCP_ADMIN_DATABASE_URL=None),
        "cannot create the data folder": {
            **os.environ,
            "CARD_MCP_DATA_DIR": str(tmp_path / "file" / "pg"),  # under a file: no one can create it
        },
    }
    (tmp_path / "file").write_text("")
    for what, env in failures.items():
        line = one_line_failure(card_mcp(env, *SERVE[transport]))
        assert what in line, line


def test_the_traceback_is_logged_at_debug_only(database: TestDatabase) -> None:
    env = database_env(database, CARD_MCP_DATABASE_URL="postgresql://card_mcp_app@127.0.0.1:1/x")
    quiet = card_mcp(env, "serve")
    debug = card_mcp({**env, "CARD_MCP_LOG_LEVEL": "DEBUG"}, "serve")
    assert "Traceback" not in quiet.stderr and "Traceback" in debug.stderr
    assert debug.returncode == 1 and debug.stderr.splitlines()[-1].startswith("card-mcp: cannot connect")


def test_a_chart_into_a_missing_folder_fails_before_the_table_is_printed(
    database: TestDatabase, tmp_path: Path
) -> None:
    result = run_cli(database, "usage", "--chart", str(tmp_path / "missing" / "calls.png"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("card-mcp: --chart: there is no folder") and result.stderr.count("\n") == 1


def test_serve_says_when_it_created_the_tenant_and_which_exist(database: TestDatabase) -> None:
    brand = f"acme{uuid.uuid4().hex[:6]}"
    assert run_cli(database, "tenants", "create", brand).returncode == 0
    typo = brand + "e"
    first = card_mcp(database_env(database), "serve", "--tenant", typo)  # stdin closed at once: starts, then stops
    assert first.returncode == 0, first.stderr
    created = re.search(f"created tenant {typo!r}; existing tenants: (.*)", first.stderr)
    assert created is not None and created[1].split(", ")[0] == brand  # the nearest name first
    again = card_mcp(database_env(database), "serve", "--tenant", typo)
    assert again.returncode == 0 and "created tenant" not in again.stderr


@pytest.mark.parametrize("how", ["--no-create", "CARD_MCP_CREATE_TENANT=false"])
def test_serve_with_no_create_refuses_a_tenant_that_does_not_exist(database: TestDatabase, how: str) -> None:
    brand = f"globex{uuid.uuid4().hex[:6]}"
    assert run_cli(database, "tenants", "create", brand).returncode == 0
    env = database_env(database, CARD_MCP_CREATE_TENANT="false" if how.startswith("CARD_MCP") else None)
    flags = ("--no-create",) if how == "--no-create" else ()
    missing = brand + "x"
    line = one_line_failure(card_mcp(env, "serve", "--tenant", missing, *flags))
    assert re.match(f"card-mcp: no tenant {missing!r} \\(existing tenants: {brand}[,)]", line), line
    assert f"card-mcp tenants create {missing}" in line
    assert card_mcp(env, "serve", "--tenant", brand, *flags).returncode == 0  # an existing one serves
    listed = run_cli(database, "tenants", "list", "--format", "json")
    assert missing not in {t["name"] for t in json.loads(listed.stdout)["tenants"]}


def test_calls_piped_before_stdin_closes_are_all_answered(database: TestDatabase) -> None:
    tenant = f"piped-{uuid.uuid4().hex[:8]}"
    card = {"card_type": "voice", "title": "Piped", "content": {"n": 1}}
    messages = [
        {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "pipe", "version": "1"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        *(
            {"jsonrpc": "2.0", "id": n, "method": "tools/call",
             "params": {"name": "create_card", "arguments": {**card, "content": {"n": n}}}}
            for n in range(1, 6)
        ),
        {"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "search_cards", "arguments": {}}},
    ]  # fmt: skip
    result = card_mcp(
        database_env(database), "serve", "--tenant", tenant, stdin="".join(json.dumps(m) + "\n" for m in messages)
    )
    assert result.returncode == 0, result.stderr
    answers = {answer["id"]: answer for answer in map(json.loads, result.stdout.splitlines())}
    assert set(answers) == set(range(7)), result.stdout
    assert all("result" in answers[n] and not answers[n]["result"].get("isError") for n in range(1, 7))
    assert "Connection closed" not in result.stdout


def test_a_port_in_use_is_one_line(database: TestDatabase) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        line = one_line_failure(card_mcp(database_env(database), "serve", "--transport", "http", "--port", port))
    assert line.startswith(f"card-mcp: cannot listen on 127.0.0.1:{port}")
