"""OAuth 2.1 for remote MCP clients (issue #23), end to end against real `card-mcp serve --transport http` processes:
the SDK's own OAuth client through discovery, registration, PKCE, the sign-in page (driven over HTTP), tokens, tool
calls, refresh and revocation; the refusals the RFCs name; two tenants through two clients; an external issuer's
JWTs; and the sign-in pages rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import asyncpg
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from mcp.types import Implementation
from pydantic import AnyUrl

from card_mcp import connections, db
from tests.chromium import Chromium
from tests.conftest import TestDatabase
from tests.helpers import ok
from tests.test_http import CARD_MCP, INITIALIZE, HttpServer, http_server, mcp_client, name, new_key

REDIRECT = "http://127.0.0.1:9/callback"  # never reached: the test reads the redirect's Location
ARTIFACTS = Path(os.environ.get("CARD_MCP_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture(scope="module")
def server(database: TestDatabase) -> Iterator[HttpServer]:
    with http_server(database, CARD_MCP_MAX_CALLS_PER_KEY="64") as running:
        yield running


@asynccontextmanager
async def as_superuser(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database.url_as(urlsplit(database.superuser_url).username or "postgres"))
    try:
        yield conn
    finally:
        await conn.close()


async def counts(database: TestDatabase) -> dict[str, int]:
    """Rows of every OAuth table and of card_usage: what a refused request must leave as it was."""
    async with as_superuser(database) as conn:
        tables = ["oauth_requests", "oauth_connections", "oauth_codes", "oauth_tokens", "card_usage"]
        return {t: await conn.fetchval(f"SELECT count(*) FROM card_mcp.{t}") for t in tables}  # noqa: S608 - fixed names


def connect_code(database: TestDatabase, tenant: str) -> str:
    """`card-mcp connect --tenant NAME`: the code alone on stdout."""
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_OWNER_DATABASE_URL": database.owner_url,
    }
    done = subprocess.run(
        [CARD_MCP, "connect", "--tenant", tenant], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "shown only this once" in done.stderr
    return done.stdout.strip()


async def new_tenant(database: TestDatabase) -> str:
    tenant = name()
    await db.tenant_id_for(database.admin_url, tenant)
    return tenant


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


@dataclass
class Browser:
    """A person's browser, over HTTP: keeps the sign-in cookie, submits the forms as a browser would."""

    http: httpx2.AsyncClient
    base: str

    async def open(self, authorize_url: str) -> httpx2.Response:
        response = await self.http.get(authorize_url)
        assert response.status_code == 302, response.text
        page = await self.http.get(response.headers["location"])
        return page

    @staticmethod
    def form(page: httpx2.Response) -> dict[str, str]:
        return {m[0]: html.unescape(m[1]) for m in re.findall(r'name="(request|csrf|step)" value="([^"]*)"', page.text)}

    async def sign_in(self, page: httpx2.Response, tenant: str, proof: str) -> httpx2.Response:
        response = await self.http.post(
            f"{self.base}/signin", data={**self.form(page), "tenant": tenant, "proof": proof}
        )
        if response.status_code == 303:
            return await self.http.get(self.base + response.headers["location"])
        return response

    async def consent(self, page: httpx2.Response, decision: str = "approve") -> dict[str, str]:
        response = await self.http.post(f"{self.base}/signin", data={**self.form(page), "decision": decision})
        assert response.status_code == 303, response.text
        query = parse_qs(urlsplit(response.headers["location"]).query)
        return {k: v[0] for k, v in query.items()}


@asynccontextmanager
async def browser(server: HttpServer) -> AsyncIterator[Browser]:
    async with httpx2.AsyncClient(timeout=30, headers={"Origin": server.base}) as http:
        yield Browser(http, server.base)


async def register(server: HttpServer, client_name: str = "pytest raw client") -> OAuthClientInformationFull:
    async with httpx2.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{server.base}/register",
            json={"redirect_uris": [REDIRECT], "client_name": client_name, "token_endpoint_auth_method": "none"},
        )
    assert response.status_code == 201, response.text
    return OAuthClientInformationFull.model_validate(response.json())


def authorize_url(server: HttpServer, client: OAuthClientInformationFull, challenge: str, **extra: str) -> str:
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": REDIRECT,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st-" + secrets.token_hex(4),
        "resource": server.url,
        **extra,
    }
    return f"{server.base}/authorize?{urlencode(query)}"


async def token(server: HttpServer, **form: str) -> httpx2.Response:
    async with httpx2.AsyncClient(timeout=30) as http:
        return await http.post(f"{server.base}/token", data=form)


async def connected(
    server: HttpServer, database: TestDatabase, tenant: str, client_name: str = "raw"
) -> dict[str, Any]:
    """A raw client registered, signed in with a fresh connect code, its code exchanged: the token response."""
    client = await register(server, client_name)
    verifier, challenge = pkce()
    async with browser(server) as person:
        page = await person.open(authorize_url(server, client, challenge))
        consent = await person.sign_in(page, tenant, await make_code(database, tenant))
        redirect = await person.consent(consent)
    response = await token(
        server,
        grant_type="authorization_code",
        code=redirect["code"],
        redirect_uri=REDIRECT,
        client_id=client.client_id,
        code_verifier=verifier,
    )
    assert response.status_code == 200, response.text
    return {**response.json(), "client_id": client.client_id}


async def make_code(database: TestDatabase, tenant: str) -> str:
    conn = await db.connect(database.owner_url)
    try:
        code, _ = await connections.create_connect_code(conn, tenant, 10)
    finally:
        await conn.close()
    return code


async def status_of(server: HttpServer, access_token: str) -> int:
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {access_token}"}
    async with httpx2.AsyncClient(timeout=30) as http:
        return (await http.post(server.url, json=INITIALIZE, headers=headers)).status_code


class MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def sdk_oauth(server: HttpServer, person: Browser, tenant: str, code: str, client_name: str) -> OAuthClientProvider:
    """The SDK's OAuth client; its 'browser' is the test's, signing in with ``code`` and approving."""
    redirected: dict[str, str] = {}

    async def redirect_handler(url: str) -> None:
        page = await person.http.get(url)
        assert page.status_code == 302
        page = await person.http.get(page.headers["location"])
        consent = await person.sign_in(page, tenant, code)
        assert "Allow access?" in consent.text, consent.text
        redirected.update(await person.consent(consent))

    async def callback_handler() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(code=redirected["code"], state=redirected.get("state"))

    metadata = OAuthClientMetadata(
        client_name=client_name,
        redirect_uris=[AnyUrl(REDIRECT)],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="client_secret_post",
    )
    return OAuthClientProvider(server.url, metadata, MemoryStorage(), redirect_handler, callback_handler)


@asynccontextmanager
async def sdk_client(server: HttpServer, auth: OAuthClientProvider) -> AsyncIterator[Client]:
    info = Implementation(name="pytest-oauth", version="1.0")
    async with (
        httpx2.AsyncClient(auth=auth, timeout=60) as http,
        Client(streamable_http_client(server.url, http_client=http), mode="legacy", client_info=info) as client,
    ):
        yield client


async def test_a_remote_client_signs_in_once_with_the_sdks_oauth_client_and_calls_refreshes_and_is_revoked(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = await new_tenant(database)
    code = connect_code(database, tenant)
    async with httpx2.AsyncClient(timeout=30) as http:
        metadata = (await http.get(f"{server.base}/.well-known/oauth-authorization-server")).json()
        resource = (await http.get(f"{server.base}/.well-known/oauth-protected-resource/mcp")).json()
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    assert metadata["registration_endpoint"] == f"{server.base}/register"
    assert metadata["revocation_endpoint"] == f"{server.base}/revoke"
    assert [a.rstrip("/") for a in resource["authorization_servers"]] == [server.base]

    async with browser(server) as person:
        auth = sdk_oauth(server, person, tenant, code, "SDK test client")
        async with sdk_client(server, auth) as client:
            created = ok(await client.call_tool("create_card", {"card_type": "voice", "title": "Calm", "content": {}}))
        first = auth.context.current_tokens
        assert first is not None and first.access_token.startswith("cma_") and first.refresh_token
        assert first.expires_in == 3600

        auth.context.token_expiry_time = time.time() - 1  # the client's own clock says: refresh now
        async with sdk_client(server, auth) as client:
            found = ok(await client.call_tool("get_card", {"card_id": created["card"]["id"]}))
        second = auth.context.current_tokens
        assert second is not None and second.access_token != first.access_token
        assert second.refresh_token != first.refresh_token  # rotated
        assert found["card"]["title"] == "Calm"

    conn = await db.connect(database.admin_url)
    try:
        listed = await connections.list_connections(conn, tenant)
        rows = await conn.fetch(
            "SELECT u.tool, u.api_key_id, u.connection_id, u.oauth_client_id FROM card_mcp.card_usage u"
            " JOIN card_mcp.tenants t USING (tenant_id) WHERE t.name = $1 ORDER BY u.usage_id",
            tenant,
        )
    finally:
        await conn.close()
    assert (
        len(listed) == 1 and listed[0].client_name == "SDK test client" and listed[0].signed_in_with == "connect_code"
    )
    assert auth.context.client_info is not None
    assert [(r["tool"], r["api_key_id"], r["connection_id"], r["oauth_client_id"]) for r in rows] == [
        (tool, None, listed[0].connection_id, auth.context.client_info.client_id)
        for tool in ("create_card", "get_card")
    ]

    # RFC 7009: the client revokes its refresh token; the connection (and its access token) stops at once.
    assert await status_of(server, second.access_token) == 200
    async with httpx2.AsyncClient(timeout=30) as http:
        revoked = await http.post(
            f"{server.base}/revoke",
            data={
                "token": second.refresh_token or "",
                "token_type_hint": "refresh_token",
                "client_id": auth.context.client_info.client_id,
                "client_secret": auth.context.client_info.client_secret or "",
            },
        )
    assert revoked.status_code == 200
    assert await status_of(server, second.access_token) == 401


async def test_connections_are_listed_and_revoked_by_the_command_and_stop_at_once(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = await new_tenant(database)
    tokens = await connected(server, database, tenant, "listed client")
    env = {
        **os.environ,
        "CARD_MCP_DATABASE_URL": database.app_url,
        "CARD_MCP_ADMIN_DATABASE_URL": database.admin_url,
        "CARD_MCP_OWNER_DATABASE_URL": database.owner_url,
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CARD_MCP, *args], env=env, capture_output=True, text=True, check=False)

    listing = cli("connections", "list", "--tenant", tenant, "--format", "json")
    assert listing.returncode == 0, listing.stderr
    (row,) = json.loads(listing.stdout)["connections"]
    assert row["client_name"] == "listed client" and row["revoked_at"] is None and row["last_used_at"] is None
    assert await status_of(server, tokens["access_token"]) == 200
    assert cli("connections", "revoke", row["connection_id"]).returncode == 0
    assert await status_of(server, tokens["access_token"]) == 401
    missing = cli("connections", "revoke", str(uuid.uuid4()))
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert cli("connections", "revoke", "not-an-id").returncode == 1
    assert cli("connections").returncode == 2
    assert cli("connect", "--tenant", "no-such-tenant-" + uuid.uuid4().hex).returncode == 1


async def test_sign_in_refuses_a_wrong_or_reused_connect_code_and_another_tenants_code_writing_nothing(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant, other = await new_tenant(database), await new_tenant(database)
    client = await register(server)
    _, challenge = pkce()
    others_code = await make_code(database, other)
    code = await make_code(database, tenant)
    async with browser(server) as person:
        page = await person.open(authorize_url(server, client, challenge))
        before = await counts(database)
        for proof in ("AAAAA-BBBBB-CCCCC-DDDDD", others_code, "cmk_" + "x" * 43):
            refused = await person.sign_in(page, tenant, proof)
            assert refused.status_code == 401 and "do not match" in refused.text
        refused = await person.sign_in(page, "no-such-tenant", code)
        assert refused.status_code == 401
        assert await counts(database) == before
        consent = await person.sign_in(page, tenant, code.lower().replace("-", " "))  # typed loosely, still the code
        assert "Allow access?" in consent.text
        await person.consent(consent)
        # The code worked once: a second sign-in with it fails.
        page = await person.open(authorize_url(server, client, challenge))
        assert (await person.sign_in(page, tenant, code)).status_code == 401
        # The other tenant's code was left unused by the refusals: it still signs in to its own tenant.
        consent = await person.sign_in(page, other, others_code)
        assert "Allow access?" in consent.text
        # Denied: the client hears access_denied (RFC 6749 4.1.2.1) with its state, and no connection is made.
        before = await counts(database)
        denied = await person.consent(consent, "deny")
        assert denied["error"] == "access_denied" and denied["state"].startswith("st-") and "code" not in denied
        after = await counts(database)
        assert (
            after["oauth_connections"] == before["oauth_connections"] and after["oauth_codes"] == before["oauth_codes"]
        )
    # Another browser (no cookie) can neither see nor use the pending request; a forged form is refused.
    async with browser(server) as stranger:
        page = await stranger.open(authorize_url(server, client, challenge))
        form = Browser.form(page)
        forged = await stranger.http.post(
            f"{server.base}/signin", data={**form, "csrf": "x", "tenant": tenant, "proof": "y"}
        )
        assert forged.status_code == 403
        elsewhere = await stranger.http.post(
            f"{server.base}/signin",
            data={**form, "tenant": tenant, "proof": "y"},
            headers={"Origin": "http://evil.test"},
        )
        assert elsewhere.status_code == 403
    async with browser(server) as thief:
        stolen = await thief.http.get(f"{server.base}/signin?request={form['request']}")
        assert stolen.status_code == 400


async def test_the_token_endpoint_refuses_what_the_rfcs_name_and_writes_nothing(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = await new_tenant(database)
    client = await register(server)
    verifier, challenge = pkce()

    async with browser(server) as person:
        # A redirect URI that was not registered: no redirect, an error page (RFC 6749 4.1.2.1), nothing written.
        before = await counts(database)
        response = await person.http.get(
            authorize_url(server, client, challenge, redirect_uri="http://127.0.0.1:9/evil")
        )
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"
        # A token for another resource (RFC 8707): invalid_target, back to the client.
        response = await person.http.get(authorize_url(server, client, challenge, resource="http://127.0.0.1:1/mcp"))
        assert response.status_code == 302
        assert parse_qs(urlsplit(response.headers["location"]).query)["error"] == ["invalid_target"]
        # Plain PKCE is not offered: S256 only.
        response = await person.http.get(authorize_url(server, client, challenge, code_challenge_method="plain"))
        assert parse_qs(urlsplit(response.headers["location"]).query)["error"] == ["invalid_request"]
        assert await counts(database) == before

        page = await person.open(authorize_url(server, client, challenge))
        redirect = await person.consent(await person.sign_in(page, tenant, await make_code(database, tenant)))
    grant = {
        "grant_type": "authorization_code",
        "code": redirect["code"],
        "redirect_uri": REDIRECT,
        "client_id": client.client_id,
    }

    before = await counts(database)
    missing = await token(server, **grant)
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    wrong = await token(server, **grant, code_verifier=pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert await counts(database) == before

    first = await token(server, **grant, code_verifier=verifier)
    assert first.status_code == 200
    tokens = first.json()
    assert await status_of(server, tokens["access_token"]) == 200
    before = await counts(database)
    reused = await token(server, **grant, code_verifier=verifier)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    after = await counts(database)
    assert after["oauth_tokens"] == before["oauth_tokens"] and after["card_usage"] == before["card_usage"]
    # RFC 6749 4.1.2: a code used twice revokes what it granted.
    assert await status_of(server, tokens["access_token"]) == 401

    # A refresh token used twice: the second use is refused and revokes the whole family (RFC 9700 4.14.2).
    tokens = await connected(server, database, tenant)
    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": tokens["refresh_token"],
        "client_id": tokens["client_id"],
    }
    rotated = await token(server, **refresh)
    assert rotated.status_code == 200
    newer = rotated.json()
    assert newer["refresh_token"] != tokens["refresh_token"]
    assert await status_of(server, newer["access_token"]) == 200
    before = await counts(database)
    again = await token(server, **refresh)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert (await counts(database))["oauth_tokens"] == before["oauth_tokens"]
    assert await status_of(server, newer["access_token"]) == 401
    assert (await token(server, **{**refresh, "refresh_token": newer["refresh_token"]})).json()[
        "error"
    ] == "invalid_grant"

    # An expired access token, and one bound to another resource, are refused (401) without a usage row.
    tokens = await connected(server, database, tenant)
    assert await status_of(server, tokens["access_token"]) == 200
    async with as_superuser(database) as conn:
        await conn.execute(
            "UPDATE card_mcp.oauth_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = sha256($1)",
            tokens["access_token"].encode(),
        )
    before = await counts(database)
    assert await status_of(server, tokens["access_token"]) == 401
    tokens = await connected(server, database, tenant)
    async with as_superuser(database) as conn:
        await conn.execute(
            "UPDATE card_mcp.oauth_connections SET resource = 'http://127.0.0.1:1/mcp' WHERE connection_id ="
            " (SELECT connection_id FROM card_mcp.oauth_tokens WHERE token_hash = sha256($1))",
            tokens["access_token"].encode(),
        )
    assert await status_of(server, tokens["access_token"]) == 401
    assert (await counts(database))["card_usage"] == before["card_usage"]


async def test_two_tenants_connected_through_two_clients_never_see_each_others_cards(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant_a, tenant_b = await new_tenant(database), await new_tenant(database)
    a = await connected(server, database, tenant_a, "client A")
    b = await connected(server, database, tenant_b, "client B")
    async with mcp_client(server.url, a["access_token"]) as client:
        card_a = ok(
            await client.call_tool("create_card", {"card_type": "insight", "title": "A's", "content": {"a": 1}})
        )
    async with mcp_client(server.url, b["access_token"]) as client:
        ok(await client.call_tool("create_card", {"card_type": "insight", "title": "B's", "content": {"b": 1}}))
        seen = ok(await client.call_tool("search_cards", {}))
        assert [c["title"] for c in seen["cards"]] == ["B's"]
        missing = await client.call_tool("get_card", {"card_id": card_a["card"]["id"]})
        assert missing.is_error and json.loads(missing.content[0].text)["error"]["code"] == "not_found"  # type: ignore[union-attr]
    async with mcp_client(server.url, a["access_token"]) as client:
        assert [c["title"] for c in ok(await client.call_tool("search_cards", {}))["cards"]] == ["A's"]


async def test_an_api_key_of_the_tenant_signs_in_too_and_keys_keep_working_beside_oauth(
    database: TestDatabase, server: HttpServer
) -> None:
    tenant = await new_tenant(database)
    _, key = await new_key(database, tenant)
    _, other_key = await new_key(database, await new_tenant(database))
    client = await register(server)
    _, challenge = pkce()
    async with browser(server) as person:
        page = await person.open(authorize_url(server, client, challenge))
        assert (await person.sign_in(page, tenant, other_key)).status_code == 401
        assert "Allow access?" in (await person.sign_in(page, tenant, key)).text
    async with mcp_client(server.url, key) as keyed:
        ok(await keyed.call_tool("search_cards", {}))


async def test_the_admin_role_cannot_write_oauth_tables_nor_make_connect_codes(database: TestDatabase) -> None:
    conn = await db.connect(database.admin_url)
    try:
        tenant_id = await db.tenant_id_for(database.admin_url, name())
        for statement, args in (
            (
                "INSERT INTO card_mcp.connect_codes (tenant_id, code_hash, expires_at) VALUES ($1, $2, now())",
                (tenant_id, b"x" * 32),
            ),
            ("UPDATE card_mcp.oauth_connections SET revoked_at = NULL", ()),
            ("SELECT count(*) FROM card_mcp.oauth_tokens", ()),
            ("SELECT card_mcp.oauth_connect_code_create($1, 'CODE', interval '1 hour')", (tenant_id,)),
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(statement, *args)
        # Signing in needs a real proof: a key's hash (which the admin role can read) is no key.
        key_hash = await conn.fetchval("SELECT key_hash FROM card_mcp.api_keys LIMIT 1")
        if key_hash is not None:
            assert (
                await conn.fetchval("SELECT card_mcp.oauth_sign_in('nope', 'nope', $1, $2)", tenant_id, key_hash.hex())
                == "invalid"
            )
    finally:
        await conn.close()


async def test_one_address_may_register_only_so_many_clients(database: TestDatabase) -> None:
    async with as_superuser(database) as conn:  # the other tests' registrations from here: a day ago
        await conn.execute("UPDATE card_mcp.oauth_clients SET created_at = now() - interval '2 days'")
    with http_server(database, CARD_MCP_OAUTH_CLIENTS_PER_ADDRESS="2") as running:
        async with httpx2.AsyncClient(timeout=30) as http:
            answers = [
                await http.post(f"{running.base}/register", json={"redirect_uris": [REDIRECT], "client_name": f"c{i}"})
                for i in range(3)
            ]
            bad = await http.post(f"{running.base}/register", json={"redirect_uris": ["javascript:alert(1)"]})
    assert [a.status_code for a in answers[:2]] == [201, 201]
    assert answers[2].status_code == 429 and answers[2].headers["retry-after"]
    assert bad.status_code in (400, 429)


# --- An external authorization server: JWT access tokens ---


@contextmanager
def jwks_server(jwks: dict[str, Any]) -> Iterator[str]:
    body = json.dumps(jwks).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


async def test_an_external_issuers_jwt_is_verified_and_names_the_tenant_through_the_admin_role(
    database: TestDatabase,
) -> None:
    tenant = await new_tenant(database)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    issuer = "https://issuer.test"
    with (
        jwks_server({"keys": [{**public, "kid": "k1", "use": "sig", "alg": "RS256"}]}) as jwks_url,
        http_server(
            database, CARD_MCP_AUTH_ISSUER_URL=issuer, CARD_MCP_AUTH_JWKS_URL=jwks_url, CARD_MCP_AUTH_TENANT_CLAIM="org"
        ) as running,
    ):

        def signed(signer: Any = key, **claims: Any) -> str:
            base = {
                "iss": issuer,
                "aud": running.url,
                "exp": int(time.time()) + 300,
                "sub": "person",
                "org": tenant,
                "client_id": "ext-client",
            }
            return jwt.encode({**base, **claims}, signer, algorithm="RS256", headers={"kid": "k1"})

        async with httpx2.AsyncClient(timeout=30) as http:
            metadata = (await http.get(f"{running.base}/.well-known/oauth-protected-resource/mcp")).json()
            assert [a.rstrip("/") for a in metadata["authorization_servers"]] == [issuer]
            assert (await http.get(f"{running.base}/.well-known/oauth-authorization-server")).status_code == 404
        async with mcp_client(running.url, signed()) as client:
            ok(await client.call_tool("create_card", {"card_type": "company", "title": "Ext", "content": {}}))
        for bad in (
            signed(stranger),
            signed(iss="https://other.test"),
            signed(aud="http://127.0.0.1:1/mcp"),
            signed(exp=int(time.time()) - 60),
            signed(org="no-such-tenant-" + uuid.uuid4().hex),
            signed(org=None),
        ):
            assert await status_of(running, bad) == 401
        _, api_key = await new_key(database, tenant)
        assert await status_of(running, api_key) == 200
    conn = await db.connect(database.admin_url)
    try:
        rows = await conn.fetch(
            "SELECT u.oauth_client_id, u.connection_id FROM card_mcp.card_usage u JOIN card_mcp.tenants t USING"
            " (tenant_id) WHERE t.name = $1",
            tenant,
        )
    finally:
        await conn.close()
    assert [(r["oauth_client_id"], r["connection_id"]) for r in rows] == [("ext-client", None)]


# --- The pages in a real browser ---

CHROMIUM = os.environ.get("CARD_MCP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
MARKUP_NAME = '<script>alert("x")</script><img src=x onerror=alert(1)><b id="injected">bold</b>&amp;'

# What the page shows, read by the test in the browser: no element the client name could have smuggled in.
PAGE_FACTS = """JSON.stringify({
    title: document.title,
    text: document.body.innerText,
    injected: document.getElementById('injected') !== null,
    images: document.images.length,
    scripts: document.scripts.length,
})"""


@contextmanager
def callback_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """The client's redirect URI: a local page that records what the browser brought back."""
    received: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if urlsplit(self.path).path == "/callback":  # not the browser's /favicon.ico
                received.append({k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()})
            body = b"<!doctype html><title>done</title><p>You can close this window.</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/callback", received
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="no chromium (CI installs it)")
async def test_a_person_signs_in_and_consents_in_headless_chromium_and_the_client_name_stays_text(
    database: TestDatabase, server: HttpServer, tmp_path: Path
) -> None:
    assert CHROMIUM is not None, "CI=true: chromium must be installed (apt-get install chromium)"
    tenant = await new_tenant(database)
    code = await make_code(database, tenant)
    verifier, challenge = pkce()
    os.makedirs(ARTIFACTS, exist_ok=True)
    with callback_server() as (callback, received):
        async with httpx2.AsyncClient(timeout=30) as http:
            registered = await http.post(
                f"{server.base}/register",
                json={"redirect_uris": [callback], "client_name": MARKUP_NAME, "token_endpoint_auth_method": "none"},
            )
        client = OAuthClientInformationFull.model_validate(registered.json())
        url = authorize_url(server, client, challenge, redirect_uri=callback)

        def person() -> list[dict[str, Any]]:
            assert CHROMIUM is not None
            browser = Chromium(CHROMIUM, tmp_path / "profile")
            pages = []
            try:
                browser.navigate(url)  # /authorize, then the sign-in page
                pages.append(json.loads(browser.evaluate(PAGE_FACTS)))
                browser.screenshot(ARTIFACTS / "signin.png")
                fill = "document.getElementById('tenant').value = {}; document.getElementById('proof').value = {};"
                browser.evaluate(fill.format(json.dumps(tenant), json.dumps("AAAAA-BBBBB-CCCCC-DDDDD")))
                browser.submit("document.querySelector('button[type=submit]')")
                pages.append(json.loads(browser.evaluate(PAGE_FACTS)))
                browser.screenshot(ARTIFACTS / "signin-refused.png")
                browser.evaluate(fill.format(json.dumps(tenant), json.dumps(code)))
                browser.submit("document.querySelector('button[type=submit]')")
                pages.append(json.loads(browser.evaluate(PAGE_FACTS)))
                browser.screenshot(ARTIFACTS / "consent.png")
                browser.submit("document.querySelector('button[value=approve]')")  # to the client's redirect URI
                pages.append(json.loads(browser.evaluate(PAGE_FACTS)))
            finally:
                browser.close()
            return pages

        sign_in, refused, consent, done = await anyio.to_thread.run_sync(person)
    for page in (sign_in, refused, consent):
        assert not page["injected"] and page["images"] == 0 and page["scripts"] == 0, page
        assert MARKUP_NAME in page["text"]  # shown, as the text it is
    assert sign_in["title"] == "Connect to card-mcp" and refused["title"] == "Connect to card-mcp"
    assert "do not match" in refused["text"]
    assert consent["title"] == "Allow access?" and tenant in consent["text"]
    assert done["title"] == "done"
    for shot in ("signin.png", "signin-refused.png", "consent.png"):
        assert (ARTIFACTS / shot).stat().st_size > 1000
    (query,) = received
    response = await token(
        server,
        grant_type="authorization_code",
        code=query["code"],
        redirect_uri=callback,
        client_id=client.client_id,
        code_verifier=verifier,
    )
    assert response.status_code == 200, response.text
    assert await status_of(server, response.json()["access_token"]) == 200
