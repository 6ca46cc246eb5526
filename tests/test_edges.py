"""Every edge bounded (issue #18), tried as an attacker would, against real server processes: `card-mcp serve
--transport http` over loopback and `card-mcp serve` over stdio. Headers and sessions (with the server's memory
measured and printed), unknown resource URIs and prompt arguments, stdio lines over the limit, stored rows Python
cannot read, lock files, Host headers and redirects, errors that must not echo what they refuse."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx2
import pytest
from mcp import MCPError

from card_mcp import db, logs
from tests.conftest import TestDatabase, make_tempdir
from tests.helpers import error_code, ok, superuser, until, usage_rows
from tests.test_batch import make_cards
from tests.test_hostile import Serve
from tests.test_http import INITIALIZE, HttpServer, http_server, mcp_client, name, new_key
from tests.test_stdio import CARD_MCP

MARK = "EDGE\u00a7"  # in every rejected value: an echo is easy to see
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def memory_mib(pid: int) -> tuple[float, float]:
    """The process's resident memory now and at its peak (VmRSS, VmHWM), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def address(server: HttpServer) -> tuple[str, int]:
    parts = urlsplit(server.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def raw_request(server: HttpServer, head: bytes, *, filler: int = 0, chunk: int = 1 << 20) -> bytes:
    """Send ``head`` and then ``filler`` bytes of one header's value over a socket of its own, stopping as soon as
    the server answers; the answer's bytes (empty if the server closed without one)."""
    with socket.create_connection(address(server), timeout=60) as sock:
        sent = 0
        try:
            sock.sendall(head)
            piece = b"a" * chunk
            while sent < filler:
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(piece[: min(chunk, filler - sent)])
                sent += chunk
            if filler:
                sock.sendall(b"\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and len(answer) > 4096:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def post_head(server: HttpServer, *extra: bytes) -> bytes:
    host, port = address(server)
    lines = [b"POST /mcp HTTP/1.1", b"Host: %s:%d" % (host.encode(), port), *extra]
    return b"\r\n".join(lines) + b"\r\n"


# -- 1. headers ------------------------------------------------------------------------------------------------


def test_heads_over_the_bounds_are_refused_before_authentication_and_memory_stays_flat(
    database: TestDatabase,
) -> None:
    with http_server(database) as server:
        assert status_of(raw_request(server, post_head(server) + b"\r\n")) == 401  # a sane head: on to auth
        before = memory_mib(server.process.pid)
        answers: list[bytes] = []

        def one_huge_header() -> None:
            answers.append(raw_request(server, post_head(server) + b"X-Big: ", filler=64 * 1024 * 1024))

        senders = [threading.Thread(target=one_huge_header) for _ in range(4)]
        started = time.perf_counter()
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(120)
        elapsed = time.perf_counter() - started
        after = memory_mib(server.process.pid)
        many = post_head(server, *(b"X-H%d: 1" % i for i in range(101))) + b"\r\n"
        long_target = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        counted, long = raw_request(server, many), raw_request(server, long_target)
        healthy = httpx2.get(f"{server.base}/healthz", timeout=30)
    print(
        f"\nfour 64 MiB headers at once, all answered in {elapsed:.2f} s: RSS {before[0]:.1f} -> {after[0]:.1f} "
        f"MiB, peak {before[1]:.1f} -> {after[1]:.1f} MiB"
    )
    assert [status_of(answer) for answer in answers] == [431] * 4
    assert status_of(counted) == 431 and status_of(long) == 414
    assert healthy.status_code == 200
    assert after[1] - before[1] < 32, "the server's peak memory grew with what it refused"


# -- 2. sessions -----------------------------------------------------------------------------------------------


async def initialize(http: httpx2.AsyncClient, url: str, key: str) -> httpx2.Response:
    return await http.post(url, json=INITIALIZE, headers={**HEADERS, "Authorization": f"Bearer {key}"})


async def test_one_key_holds_at_most_its_sessions_and_another_tenant_still_opens_one(database: TestDatabase) -> None:
    _, greedy = await new_key(database, name())
    _, other = await new_key(database, name())
    limits = {"CARD_MCP_MAX_SESSIONS": "20", "CARD_MCP_MAX_SESSIONS_PER_KEY": "5"}
    with http_server(database, **limits) as server:
        before = memory_mib(server.process.pid)
        statuses: list[int] = []
        async with httpx2.AsyncClient(timeout=60) as http:

            async def opener(count: int) -> None:
                for _ in range(count):
                    statuses.append((await initialize(http, server.url, greedy)).status_code)

            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(opener, 250)
            elapsed = time.perf_counter() - started
            after = memory_mib(server.process.pid)
            refused = await initialize(http, server.url, greedy)
            welcome = await initialize(http, server.url, other)
    print(
        f"\n2,000 initialize requests with one key in {elapsed:.1f} s: {statuses.count(200)} sessions opened, "
        f"{statuses.count(429)} refused; RSS {before[0]:.1f} -> {after[0]:.1f} MiB, "
        f"peak {before[1]:.1f} -> {after[1]:.1f} MiB"
    )
    assert statuses.count(200) == 5 and statuses.count(429) == 1995
    assert refused.status_code == 429 and "Retry-After" in refused.headers
    assert welcome.status_code == 200 and welcome.headers.get("mcp-session-id")
    assert after[1] - before[1] < 32, "the server's peak memory grew with the sessions it refused"


async def test_an_ended_or_idle_session_makes_room_for_the_next(database: TestDatabase) -> None:
    _, key = await new_key(database, name())
    limits = {"CARD_MCP_MAX_SESSIONS": "3", "CARD_MCP_MAX_SESSIONS_PER_KEY": "2", "CARD_MCP_SESSION_IDLE_SECONDS": "2"}
    with http_server(database, **limits) as server:
        async with httpx2.AsyncClient(timeout=60) as http:
            first, second = [await initialize(http, server.url, key) for _ in range(2)]
            assert (first.status_code, second.status_code) == (200, 200)
            assert (await initialize(http, server.url, key)).status_code == 429
            ended = await http.delete(
                server.url,
                headers={
                    **HEADERS,
                    "Authorization": f"Bearer {key}",
                    "mcp-session-id": first.headers["mcp-session-id"],
                    "mcp-protocol-version": "2025-11-25",
                },
            )
            assert ended.status_code == 200
            assert (await initialize(http, server.url, key)).status_code == 200  # the deleted one's room
            assert (await initialize(http, server.url, key)).status_code == 429

            async def reopened() -> bool:
                return (await initialize(http, server.url, key)).status_code == 200

            await until(reopened, "an idle session to expire", seconds=60)  # no request for 2 s: closed


async def test_a_call_racing_its_sessions_delete_is_answered_whole_or_404_and_logs_no_error(
    database: TestDatabase,
) -> None:
    """A client that ends its session while its last request is on the way (the SDK's client sends its last
    notification and its DELETE at once) gets that request answered in full, or 404 if the DELETE came first:
    never a 500, a cut-off stream or a traceback in the log. A call answered ran once; a call refused wrote
    nothing."""
    tenant = name()
    _, key = await new_key(database, tenant)
    cards = make_cards(300, label="race")
    answers: list[tuple[str, int, str]] = []
    with http_server(database) as server:
        async with httpx2.AsyncClient(timeout=60) as http:
            for n, card in enumerate(cards):
                opened = await initialize(http, server.url, key)
                assert opened.status_code == 200
                headers = {
                    **HEADERS,
                    "Authorization": f"Bearer {key}",
                    "mcp-session-id": opened.headers["mcp-session-id"],
                    "mcp-protocol-version": "2025-11-25",
                }
                initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call"}
                message = initialized if n % 3 == 0 else {**call, "params": {"name": "create_card", "arguments": card}}
                if n % 3:
                    assert (await http.post(server.url, json=initialized, headers=headers)).status_code == 202
                offset = (n % 10 - 5) / 2000  # the DELETE up to 2.5 ms before or after the request
                async with anyio.create_task_group() as group:
                    group.start_soon(post_after, max(0.0, -offset), http, server.url, message, headers, answers)
                    group.start_soon(delete_after, max(0.0, offset), http, server.url, headers)
            after = await initialize(http, server.url, key)
        errors = [line for line in server.log if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
    outcomes = Counter((method, status) for method, status, _ in answers)
    print(f"\n300 requests racing their session's DELETE: {dict(outcomes)}")
    assert set(outcomes) <= {
        ("notifications/initialized", 202),
        ("notifications/initialized", 404),
        ("tools/call", 200),
        ("tools/call", 404),
    }
    answered = [text for method, status, text in answers if method == "tools/call" and status == 200]
    results = [json.loads(text.split("data: ", 1)[1])["result"]["structuredContent"] for text in answered]
    assert [result["status"] for result in results] == ["created"] * len(answered)
    assert errors == [], "".join(errors)
    assert after.status_code == 200
    assert len(await usage_rows(database.admin_url, tenant)) == len(answered)
    assert await cards_of(database, tenant) == len(answered)


async def test_a_delete_waits_for_the_sessions_call_in_flight_and_a_refused_one_ends_nothing(
    database: TestDatabase,
) -> None:
    """A call held in flight (its table locked by another transaction) while its session gets a DELETE: a DELETE
    the SDK refuses (a foreign Origin, 403) leaves the session serving, the requests sent meanwhile included; a
    DELETE it accepts waits for the call, which is answered in full before the session ends."""
    tenant = name()
    _, key = await new_key(database, tenant)
    cards = make_cards(2, label="held")
    with http_server(database) as server:
        async with httpx2.AsyncClient(timeout=60) as http, superuser(database) as lock:
            opened = await initialize(http, server.url, key)
            headers = {
                **HEADERS,
                "Authorization": f"Bearer {key}",
                "mcp-session-id": opened.headers["mcp-session-id"],
                "mcp-protocol-version": "2025-11-25",
            }
            initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
            assert (await http.post(server.url, json=initialized, headers=headers)).status_code == 202

            async def waiting_on_the_lock() -> bool:
                return bool(
                    await lock.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                )

            answers: dict[str, httpx2.Response] = {}

            async def send(label: str, method: str, message: dict[str, object] | None, extra: dict[str, str]) -> None:
                sent = {**headers, **extra}
                if method == "DELETE":
                    answers[label] = await http.delete(server.url, headers=sent)
                else:
                    answers[label] = await http.post(server.url, json=message, headers=sent)

            for n, (label, delete_headers) in enumerate(
                (("refused", {"Origin": "http://evil.example"}), ("accepted", {}))
            ):
                call = {"jsonrpc": "2.0", "id": 10 + n, "method": "tools/call"}
                async with anyio.create_task_group() as group:
                    transaction = lock.transaction()
                    await transaction.start()
                    await lock.execute("LOCK TABLE card_mcp.cards IN ACCESS EXCLUSIVE MODE")
                    group.start_soon(
                        send,
                        f"call {label}",
                        "POST",
                        {**call, "params": {"name": "create_card", "arguments": cards[n]}},
                        {},
                    )
                    await until(waiting_on_the_lock, "the call to wait on the lock")
                    group.start_soon(send, f"delete {label}", "DELETE", None, delete_headers)
                    await until(lambda n=n: deletes_waiting(server, n + 1), "the DELETE to wait for the call")
                    group.start_soon(
                        send, f"ping {label}", "POST", {"jsonrpc": "2.0", "id": 20 + n, "method": "ping"}, {}
                    )
                    await anyio.sleep(0.2)  # the ping on its way (it is answered alike if it comes later)
                    assert not [sent for sent in answers if sent.endswith(label)]  # all three wait on the call
                    await transaction.rollback()
        errors = [line for line in server.log if re.search(r" (ERROR|CRITICAL) |Traceback", line)]
    statuses = {label: answer.status_code for label, answer in answers.items()}
    assert statuses == {
        "call refused": 200,
        "delete refused": 403,
        "ping refused": 200,  # served: the refused DELETE ended nothing
        "call accepted": 200,
        "delete accepted": 200,
        "ping accepted": 404,  # sent after the DELETE: answered once the session has ended
    }
    for label in ("call refused", "call accepted"):
        result = json.loads(answers[label].text.split("data: ", 1)[1])["result"]  # the whole answer, not cut off
        assert result["structuredContent"]["status"] == "created"
    assert json.loads(answers["ping refused"].text.split("data: ", 1)[1])["result"] == {}
    assert errors == [], "".join(errors)
    assert len(await usage_rows(database.admin_url, tenant)) == 2


async def deletes_waiting(server: HttpServer, count: int) -> bool:
    return sum("DELETE waits for its" in line for line in server.log) >= count


async def post_after(
    delay: float,
    http: httpx2.AsyncClient,
    url: str,
    message: dict[str, object],
    headers: dict[str, str],
    answers: list[tuple[str, int, str]],
) -> None:
    await anyio.sleep(delay)
    answer = await http.post(url, json=message, headers=headers)
    answers.append((str(message["method"]), answer.status_code, answer.text))


async def delete_after(delay: float, http: httpx2.AsyncClient, url: str, headers: dict[str, str]) -> None:
    await anyio.sleep(delay)
    assert (await http.delete(url, headers=headers)).status_code in (200, 404)


async def cards_of(database: TestDatabase, tenant: str) -> int:
    conn = await db.connect(database.admin_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM card_mcp.cards c JOIN card_mcp.tenants t USING (tenant_id) WHERE t.name = $1",
            tenant,
        )
        return count
    finally:
        await conn.close()


# -- 3. unknown resources and prompt arguments -----------------------------------------------------------------


async def test_unknown_resource_uris_and_prompt_arguments_get_spec_codes_bounded_usage_rows_and_clean_logs(
    database: TestDatabase,
) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    uris = [
        f"nope://{MARK}" + "u" * 5_000_000,
        f"nope://{MARK}\n2026-12-03 10:00:00,000 INFO card_mcp: forged {MARK}",
        f"nope://{MARK}\x00nul",
        f"card://{MARK}/a/b",
    ]
    with http_server(database) as server:
        async with mcp_client(server.url, key) as client:
            for uri in uris:
                with pytest.raises(MCPError) as refused:
                    await client.read_resource(uri)
                assert refused.value.error.data["error"]["code"] == "not_found"  # type: ignore[index]
                assert MARK not in json.dumps(refused.value.error.model_dump())
            for arguments in ({f"tone{MARK}": "warm"}, {"topic": "x" * 5000}):
                with pytest.raises(MCPError) as refused:
                    await client.get_prompt("brand_brief", arguments)
                assert refused.value.error.data["error"]["code"] == "invalid_argument"  # type: ignore[index]
                assert MARK not in json.dumps(refused.value.error.model_dump())
            await client.get_prompt("brand_brief", {"topic": "spring"})  # the prompt still works
        log = list(server.log)
    rows = [(r["tool"], r["status"], r["error_code"]) for r in await usage_rows(database.admin_url, tenant)]
    assert rows == [
        ("resource:unknown", "error", "not_found"),
        ("resource:unknown", "error", "not_found"),
        ("resource:unknown", "error", "not_found"),
        ("resource:card", "error", "not_found"),
        ("prompt:brand_brief", "error", "invalid_argument"),
        ("prompt:brand_brief", "error", "invalid_argument"),
        ("prompt:brand_brief", "ok", None),
    ]
    print(f"\nthe server's log: {len(log)} lines, the longest {max(len(line) for line in log)} characters")
    assert not any(line.startswith("2026-12-03 10:00:00,000") for line in log), "a client forged a log line"
    assert max(len(line) for line in log) < 20_000
    assert not any("\x00" in line for line in log)


# -- 4. stdio --------------------------------------------------------------------------------------------------


@pytest.fixture
def stdio_server(database: TestDatabase) -> Iterator[tuple[Serve, Path]]:
    folder = make_tempdir("card-mcp-edges-")
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_DATA_DIR": str(folder),
        "CARD_MCP_TENANT": f"edges-{uuid.uuid4().hex[:8]}",
        "CARD_MCP_SEMANTIC": "off",
    }
    log = folder / "stderr.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [CARD_MCP, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink, env=env
        )
    serve = Serve(proc)
    try:
        hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}
        response, _ = serve.answer(serve.request("initialize", hello))
        assert "result" in response, response
        serve.send(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')
        yield serve, log
    finally:
        try:
            assert serve.stop() == 0, log.read_text()
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def call_line(request_id: int, arguments: str) -> bytes:
    head = '{"jsonrpc": "2.0", "id": %d, "method": "tools/call", "params": {"name": "create_card", "arguments": '
    return (head % request_id + arguments + "}}\n").encode()


def test_a_stdio_line_over_128_mib_is_answered_for_its_id_and_the_server_reads_on(
    stdio_server: tuple[Serve, Path],
) -> None:
    serve, _ = stdio_server
    before = memory_mib(serve.proc.pid)
    content = json.dumps({"text": MARK * (129 * 1024 * 1024 // len(MARK.encode()))})
    serve.send(call_line(41, f'{{"card_type": "voice", "title": "Huge", "content": {content}}}'))
    del content
    answer, _ = serve.answer(41)
    assert answer["error"]["code"] == -32700 and MARK not in json.dumps(answer)
    serve.serves()
    serve.send(b"x" * (129 * 1024 * 1024) + b"\n")  # no id to read: answered with id null
    probe = serve.request("tools/call", {"name": "search_cards", "arguments": {"limit": 1}})
    response, others = serve.answer(probe)
    after = memory_mib(serve.proc.pid)
    print(f"\ntwo stdio lines of 129 MiB: RSS {before[0]:.1f} -> {after[0]:.1f} MiB, peak {after[1]:.1f} MiB")
    assert "result" in response and [o["error"]["code"] for o in others] == [-32700]


def test_stdio_json_the_parser_cannot_read_is_answered_for_its_own_id(stdio_server: tuple[Serve, Path]) -> None:
    serve, _ = stdio_server
    nested = '{"a":' * 10_000 + "1" + "}" * 10_000
    cases = {
        42: call_line(42, f'{{"card_type": "voice", "title": "Deep", "content": {nested}}}'),
        43: call_line(43, '{"card_type": "voice", "title": "Lone \\ud800", "content": {}}'),
        44: b'{"jsonrpc": "2.0", "method": "tools/call", "id": "forty-four", "params": {"arguments": '
        + nested.encode()
        + b"}}\n",
    }
    for request_id, line in cases.items():
        serve.send(line)
        answer, _ = serve.answer(request_id if request_id != 44 else "forty-four")  # type: ignore[arg-type]
        assert answer["error"]["code"] == -32700, answer
        serve.serves()


# -- 5. a stored row Python cannot read ------------------------------------------------------------------------

_INSERT = """
INSERT INTO card_mcp.cards (tenant_id, card_type, title, content, content_hash)
VALUES ($1, $2, $3, $4::text::jsonb, $5) RETURNING id
"""


async def test_rows_with_a_5000_digit_number_or_deep_nesting_do_not_break_search_voice_or_the_brief(
    database: TestDatabase,
) -> None:
    tenant = name()
    _, key = await new_key(database, tenant)
    tenant_id = await db.tenant_id_for(database.admin_url, tenant)
    digits = "7" * 5000
    odd = {
        "voice": f'{{"tone": "warm", "n": {digits}}}',
        "company": '{"deep": ' + "[" * 5000 + "]" * 5000 + "}",
    }
    async with superuser(database) as conn:
        ids = {}
        for card_type, text in odd.items():
            ids[card_type] = await conn.fetchval(
                _INSERT, tenant_id, card_type, f"Odd {card_type}", text, hashlib.sha256(text.encode()).hexdigest()
            )
    with http_server(database) as server:
        async with mcp_client(server.url, key) as client:
            found = ok(await client.call_tool("search_cards", {"limit": 10}))["cards"]
            assert {card["card_type"] for card in found} == {"voice", "company"}
            voice = next(card for card in found if card["card_type"] == "voice")
            assert str(voice["content"]["n"]) == digits  # the number, as text
            listed = await client.read_resource("cards://voice")
            assert digits in listed.contents[0].text  # type: ignore[union-attr]
            brief = await client.get_prompt("brand_brief", {"topic": "tone"})
            assert len(brief.messages) == 3  # instructions, the company card and the voice card
            kept = await client.call_tool("update_card", {"card_id": str(ids["voice"]), "title": "Renamed"})
            assert error_code(kept) == "invalid_argument"  # the stored content cannot be written back as read
            replaced = ok(
                await client.call_tool(
                    "update_card", {"card_id": str(ids["voice"]), "title": "Renamed", "content": {"tone": "warm"}}
                )
            )
            assert replaced["card"]["version"] == 2
        log = "".join(server.log)
    assert "cannot be read" in log and "too long to read" in log  # logged warnings


# -- 6. lock files ---------------------------------------------------------------------------------------------


def test_lock_files_are_private_and_a_held_lock_times_out_with_a_clear_message() -> None:
    folder = make_tempdir("card-mcp-locks-")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CARD_MCP_")},
        "CARD_MCP_DATA_DIR": str(folder),
        "CARD_MCP_LOCK_TIMEOUT_SECONDS": "1",
    }
    try:
        listed = subprocess.run([CARD_MCP, "tenants", "list"], env=env, capture_output=True, text=True, timeout=120)
        assert listed.returncode == 0, listed.stderr
        locks = folder / "locks"
        assert oct(locks.stat().st_mode & 0o777) == "0o700"
        for lock in ("control.lock", "users.lock"):
            assert oct((locks / lock).stat().st_mode & 0o777) == "0o600"
        if os.geteuid() == 0 and shutil.which("setpriv"):  # another local user cannot take either lock
            for path in (locks / "control.lock", folder / "control.lock"):
                taken = subprocess.run(
                    [
                        "setpriv",
                        "--reuid=nobody",
                        "--regid=nogroup",
                        "--clear-groups",
                        "flock",
                        "-n",
                        str(path),
                        "true",
                    ],
                    capture_output=True,
                    timeout=30,
                )
                assert taken.returncode != 0, path
        with (locks / "control.lock").open("r+b") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # a stuck card-mcp of this user
            waited = subprocess.run([CARD_MCP, "tenants", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert waited.returncode == 1
        message = waited.stderr.strip().splitlines()
        assert len(message) == 1 and "control.lock" in message[0] and "waited 1 s" in message[0], waited.stderr
    finally:
        subprocess.run([CARD_MCP, "tenants", "list"], env=env, capture_output=True, timeout=120)  # stops it
        shutil.rmtree(folder, ignore_errors=True)


# -- 7. Host and redirects -------------------------------------------------------------------------------------


async def test_hosts_are_matched_exactly_and_the_slash_redirect_goes_to_the_public_url(database: TestDatabase) -> None:
    _, key = await new_key(database, name())
    with http_server(database) as server:
        host, port = address(server)
        async with httpx2.AsyncClient(timeout=30) as http:
            sent = {**HEADERS, "Authorization": f"Bearer {key}"}
            statuses = {}
            for forged in (f"{host}:{port}@evil.com", f"{host}:{port}.evil.com", f"{host}:evil", "evil.com"):
                response = await http.post(server.url, json=INITIALIZE, headers={**sent, "Host": forged})
                statuses[forged] = response.status_code
            fine = await http.post(server.url, json=INITIALIZE, headers=sent)
            moved = await http.get(f"{server.base}/mcp/", headers={"Host": "evil.com"})
    assert set(statuses.values()) == {421}, statuses
    assert fine.status_code == 200
    assert moved.status_code in (307, 308) and moved.headers["location"] == f"http://{host}:{port}/mcp"


# -- 8. errors never echo --------------------------------------------------------------------------------------


async def test_errors_name_what_was_wrong_but_never_echo_the_input(database: TestDatabase) -> None:
    _, key = await new_key(database, name())
    with http_server(database) as server:
        async with mcp_client(server.url, key) as client:
            bad_uuid = await client.call_tool("get_card", {"card_id": "12345678-1234-1234-1234-12345678901\u00a7"})
            assert error_code(bad_uuid) == "invalid_argument"
            assert "\u00a7" not in bad_uuid.content[0].text  # type: ignore[union-attr]
            with pytest.raises(MCPError) as unknown:
                await client.call_tool(f"steal_{MARK}", {})
            assert MARK not in json.dumps(unknown.value.error.model_dump())
            with pytest.raises(MCPError) as unknown:
                await client.get_prompt(f"brief_{MARK}", {})
            assert MARK not in json.dumps(unknown.value.error.model_dump())
        async with httpx2.AsyncClient(timeout=30) as http:
            sent = {**HEADERS, "Authorization": f"Bearer {key}"}
            bodies = {
                "not JSON": f"{MARK} is not JSON",
                "JSON, no JSON-RPC": json.dumps({"jsonrpc": "2.0", "id": 1, "method": [MARK]}),
                "a string": json.dumps(MARK),
            }
            for what, body in bodies.items():
                response = await http.post(server.url, content=body.encode(), headers=sent)
                assert response.status_code == 400, what
                assert MARK not in response.text and "EDGE" not in response.text, (what, response.text)
                assert response.json()["error"]["code"] in (-32700, -32600, -32602), what


def test_client_text_in_a_log_record_or_its_traceback_cannot_forge_a_line_or_flood_the_log() -> None:
    """The filter `card-mcp serve` puts on its stderr handler (cli._serve), on the records that carry client text
    where a test cannot make the server log it on purpose: a failure's message and traceback."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logs.keep_lines_clean([handler])
    record_logger = logging.getLogger("card_mcp.test_edges")
    record_logger.addHandler(handler)
    forged = f"{MARK}\n2026-12-03 10:00:00,000 INFO card_mcp: forged\x1b[2J\u2028"
    try:
        record_logger.warning("read %s", forged + "u" * 5_000_000)
        try:
            raise ValueError(forged)
        except ValueError:
            record_logger.exception("failed")
    finally:
        record_logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert not any(line.startswith("2026-12-03 10:00:00,000") for line in lines)
    assert not any("\x1b" in line for line in lines)
    assert max(len(line) for line in lines) < 10_000
    assert "\\n2026-12-03 10:00:00,000 INFO card_mcp: forged\\x1b[2J" in lines[0]
