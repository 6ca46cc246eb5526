"""OAuth 2.1 for remote MCP clients (issue #23): card-mcp as the authorization server of its tenants, on the SDK's
provider interface and routes (metadata, /register, /authorize, /token, /revoke). (With CARD_MCP_AUTH_ISSUER_URL
it is a resource server of an external issuer instead: issuer.py.)

Everything secret is random and stored only as a hash, through the narrow functions of schema/0008_oauth.sql (the
admin role writes no table directly). A connection is one tenant, one client and this server's resource; its
access tokens live CARD_MCP_OAUTH_ACCESS_TOKEN_SECONDS, its refresh tokens rotate at each use, and the reuse of a
used one (or of an authorization code) revokes the connection. API keys keep working beside OAuth: a bearer token
shaped like a key is looked up as one.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import asyncpg
from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    RefreshToken,
    RegistrationError,
    TokenError,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from pydantic import AnyHttpUrl, AnyUrl
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from . import db
from .auth import KeyVerifier
from .config import Settings
from .connections import normalize_proof
from .errors import Unavailable
from .keys import KEY_PREFIX

logger = logging.getLogger(__name__)

_TENANT_ID = "SELECT tenant_id FROM card_mcp.tenants WHERE name = $1"
_REQUEST_GET = "SELECT * FROM card_mcp.oauth_request_get($1, $2)"
_SIGN_IN = "SELECT card_mcp.oauth_sign_in($1, $2, $3, $4)"
_DECIDE = "SELECT * FROM card_mcp.oauth_decide($1, $2, $3, $4, $5)"

ACCESS_PREFIX = "cma_"
REFRESH_PREFIX = "cmr_"
_REQUEST_TTL = timedelta(minutes=15)  # from /authorize to consent
_CODE_TTL = timedelta(minutes=2)  # an authorization code, until the client exchanges it


class ConnectionToken(AccessToken):
    """A verified OAuth access token: the tenant, and what the usage row names (the connection, the client)."""

    tenant_id: UUID
    connection_id: UUID | None  # None for an external issuer's JWT (no connection of ours)
    limit_key: UUID  # what CallLimiter counts calls per


class _Code(AuthorizationCode):
    tenant_id: UUID
    connection_id: UUID
    used: bool


class _Refresh(RefreshToken):
    tenant_id: UUID
    connection_id: UUID
    used: bool


def resource_url(settings: Settings) -> str:
    """This server's resource (the audience of its tokens): the MCP endpoint's URL."""
    return settings.url + "/mcp"


def own_issuer_possible(settings: Settings) -> bool:
    """The SDK (RFC 8414) wants an https issuer, or http on loopback."""
    parts = urlsplit(settings.url)
    return parts.scheme == "https" or parts.hostname in ("localhost", "127.0.0.1", "::1")


def auth_settings(settings: Settings) -> AuthSettings:
    """The SDK's auth settings: this server as the authorization server (registration and revocation on), or the
    external issuer named by CARD_MCP_AUTH_ISSUER_URL. Tokens' audience is checked by the verifiers themselves
    (an API key has none)."""
    if settings.auth_issuer_url or not own_issuer_possible(settings):
        return AuthSettings(
            issuer_url=AnyHttpUrl(settings.auth_issuer_url or settings.url),
            resource_server_url=AnyHttpUrl(resource_url(settings)),
            validate_token_resource=False,
        )
    return AuthSettings(
        issuer_url=AnyHttpUrl(settings.url),
        resource_server_url=AnyHttpUrl(resource_url(settings)),
        validate_token_resource=False,
        client_registration_options=ClientRegistrationOptions(enabled=True),
        revocation_options=RevocationOptions(enabled=True),
    )


def _same_resource(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


class TooManyClients(Exception):
    """One address registered its day's share of clients."""


_registering_from: ContextVar[str] = ContextVar("card_mcp_registering_from", default="unknown")


class RegistrationAddress:
    """ASGI middleware: tells the provider which address a /register request came from (the SDK's handler does
    not pass the request on), and answers 429 when that address has registered too many clients."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != "/register":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _registering_from.set(str(client[0]) if client else "unknown")
        try:
            await self.app(scope, receive, send)
        except TooManyClients:
            response = JSONResponse(
                {"error": "invalid_client_metadata", "error_description": "too many clients registered from here"},
                status_code=429,
                headers={"Retry-After": "3600"},
            )
            await response(scope, receive, send)
        finally:
            _registering_from.reset(token)


class CardOAuthProvider:
    """The SDK's OAuthAuthorizationServerProvider, on card-mcp's database (through the admin pool the server's
    lifespan gives ``keys``). Its load_access_token is also the server's bearer-token check: API keys included."""

    def __init__(self, settings: Settings, keys: KeyVerifier) -> None:
        self.settings = settings
        self.keys = keys
        self.resource = resource_url(settings)

    def _pool(self) -> asyncpg.Pool:
        if self.keys.pool is None:
            raise Unavailable("the server is not ready", hint="Retry in a few seconds.")
        return self.keys.pool

    async def _fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        with db.translate_errors():
            async with self._pool().acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
                rows: list[asyncpg.Record] = await conn.fetch(query, *args)
                return rows

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        rows = await self._fetch("SELECT metadata FROM card_mcp.oauth_clients WHERE client_id = $1", client_id)
        return OAuthClientInformationFull.model_validate(rows[0]["metadata"]) if rows else None

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        _check_registration(client_info)
        ok = await self._fetch(
            "SELECT card_mcp.oauth_register_client($1, $2, $3, $4, $5) AS ok",
            client_info.client_id,
            client_info.model_dump(mode="json", exclude_none=True),
            _registering_from.get(),
            self.settings.oauth_clients_per_address,
            timedelta(days=self.settings.oauth_client_idle_days),
        )
        if not ok[0]["ok"]:
            raise TooManyClients

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        resource = params.resource or self.resource
        if not _same_resource(resource, self.resource):
            raise AuthorizeError("invalid_target", f"this server issues tokens only for {self.resource}")
        request = secrets.token_urlsafe(32)
        stored = {
            "state": params.state,
            "scopes": params.scopes or [],
            "code_challenge": params.code_challenge,
            "redirect_uri": str(params.redirect_uri),
            "redirect_uri_provided_explicitly": params.redirect_uri_provided_explicitly,
            "resource": self.resource,
        }
        await self._fetch(
            "SELECT card_mcp.oauth_request_create($1, $2, $3, $4)", request, client.client_id, stored, _REQUEST_TTL
        )
        return f"{self.settings.url}/signin?request={request}"

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> _Code | None:
        rows = await self._fetch(
            "SELECT * FROM card_mcp.oauth_code_lookup($1, $2)", client.client_id, authorization_code
        )
        if not rows:
            return None
        row = rows[0]
        return _Code(
            code=authorization_code,
            scopes=list(row["scopes"]),
            expires_at=row["expires_at"].timestamp(),
            client_id=client.client_id,
            code_challenge=row["code_challenge"],
            redirect_uri=AnyUrl(row["redirect_uri"]),
            redirect_uri_provided_explicitly=row["redirect_explicit"],
            resource=row["resource"],
            tenant_id=row["tenant_id"],
            connection_id=row["connection_id"],
            used=row["used"],
        )

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: _Code
    ) -> OAuthToken:
        return await self._issue(client, "code", authorization_code.code, authorization_code.scopes)

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> _Refresh | None:
        if not refresh_token.startswith(REFRESH_PREFIX):
            return None
        rows = await self._fetch("SELECT * FROM card_mcp.oauth_refresh_lookup($1, $2)", client.client_id, refresh_token)
        if not rows:
            return None
        row = rows[0]
        return _Refresh(
            token=refresh_token,
            client_id=client.client_id,
            scopes=list(row["scopes"]),
            expires_at=int(row["expires_at"].timestamp()),
            resource=row["resource"],
            tenant_id=row["tenant_id"],
            connection_id=row["connection_id"],
            used=row["used"],
        )

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: _Refresh, scopes: list[str]
    ) -> OAuthToken:
        return await self._issue(client, "refresh", refresh_token.token, scopes)

    async def _issue(self, client: OAuthClientInformationFull, kind: str, grant: str, scopes: list[str]) -> OAuthToken:
        access = ACCESS_PREFIX + secrets.token_urlsafe(32)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        rows = await self._fetch(
            "SELECT card_mcp.oauth_issue($1, $2, $3, $4, $5, $6, $7) AS status",
            client.client_id,
            kind,
            grant,
            access,
            refresh,
            timedelta(seconds=self.settings.oauth_access_token_seconds),
            timedelta(days=self.settings.oauth_refresh_token_days),
        )
        status = rows[0]["status"]
        what = "authorization code" if kind == "code" else "refresh token"
        if status == "reused":
            logger.warning(
                "a used %s was presented again by client %s; its connection is revoked", what, client.client_id
            )
            raise TokenError("invalid_grant", f"this {what} was already used; the connection is revoked")
        if status != "ok":
            raise TokenError("invalid_grant", f"this {what} is not valid")
        return OAuthToken(
            access_token=access,
            expires_in=self.settings.oauth_access_token_seconds,
            refresh_token=refresh,
            scope=" ".join(scopes) or None,
        )

    async def load_access_token(self, token: str) -> AccessToken | None:
        if token.startswith(KEY_PREFIX):
            return await self.keys.verify_token(token)
        if not token.startswith(ACCESS_PREFIX) or len(token) > 100:
            return None
        rows = await self._fetch("SELECT * FROM card_mcp.oauth_access_lookup($1)", token)
        if not rows or not _same_resource(rows[0]["resource"], self.resource):
            return None  # unknown, expired, revoked, or issued for another resource (audience)
        row = rows[0]
        return ConnectionToken(
            token=token,
            client_id=row["client_id"],
            scopes=list(row["scopes"]),
            expires_at=int(row["expires_at"].timestamp()),
            resource=row["resource"],
            subject=str(row["connection_id"]),  # the SDK binds sessions to (client, issuer, subject): one connection
            tenant_id=row["tenant_id"],
            connection_id=row["connection_id"],
            limit_key=row["connection_id"],
        )

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        await self._fetch("SELECT card_mcp.oauth_revoke_token($1, $2)", token.client_id, token.token)

    async def exchange_identity_assertion(self, client: OAuthClientInformationFull, params: Any) -> OAuthToken:
        raise TokenError("unsupported_grant_type", "the JWT bearer grant is not supported")


_UNSAFE_SCHEMES = {"javascript", "data", "vbscript", "file", "blob"}


def _check_registration(info: OAuthClientInformationFull) -> None:
    """What a client may register: a short name (it is shown on the consent screen), a few redirect URIs, none
    of a scheme a browser would run or read locally."""
    if info.client_name is not None and len(info.client_name) > 200:
        raise RegistrationError("invalid_client_metadata", "client_name is longer than 200 characters")
    uris = info.redirect_uris or []
    if not 1 <= len(uris) <= 10:
        raise RegistrationError("invalid_redirect_uri", "register 1 to 10 redirect_uris")
    for uri in uris:
        if len(str(uri)) > 2000 or uri.scheme.lower() in _UNSAFE_SCHEMES or uri.fragment:
            raise RegistrationError(
                "invalid_redirect_uri", "a redirect URI is too long, has a fragment or a bad scheme"
            )


# --- Sign-in: the pending request, the proof, the consent (for signin.py) ---


@dataclass(frozen=True)
class PendingRequest:
    client: OAuthClientInformationFull
    params: dict[str, Any]
    tenant: str | None  # set once signed in


async def pending(pool: asyncpg.Pool, request: str, browser: str) -> PendingRequest | None:
    """The pending authorization ``request`` if it is alive and this browser's (the first to open it binds it)."""
    with db.translate_errors():
        async with pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(_REQUEST_GET, request, browser)
    if row is None:
        return None
    return PendingRequest(
        OAuthClientInformationFull.model_validate(row["client_metadata"]), dict(row["params"]), row["tenant_name"]
    )


async def sign_in(pool: asyncpg.Pool, request: str, browser: str, tenant: str, proof: str) -> str:
    """'ok', 'denied' (no such tenant, or a wrong, used, expired or other tenant's code or key: nothing written) or
    'invalid' (no pending request for this browser)."""
    with db.translate_errors():
        async with pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
            tenant_id = await conn.fetchval(_TENANT_ID, tenant)
            status: str = await conn.fetchval(
                _SIGN_IN,
                request,
                browser,
                tenant_id or uuid.UUID(int=0),  # an unknown tenant fails like a wrong code
                normalize_proof(proof),
            )
    return status


async def decide(pool: asyncpg.Pool, request: str, browser: str, approve: bool) -> tuple[dict[str, Any], str] | None:
    """End a signed-in request: approved, with a new authorization code, or refused. (params, code) or None."""
    code = secrets.token_urlsafe(32)
    with db.translate_errors():
        async with pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
            row = await conn.fetchrow(_DECIDE, request, browser, approve, code, _CODE_TTL)
    return None if row is None else (dict(row["params"]), code)


def csrf_matches(form_token: str, cookie: str | None) -> bool:
    return cookie is not None and hmac.compare_digest(form_token.encode(), cookie.encode())
