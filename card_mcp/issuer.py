"""OAuth with an external authorization server (CARD_MCP_AUTH_ISSUER_URL): card-mcp as a resource server only, that
verifies the issuer's JWT access tokens and takes the tenant from a claim, through the admin role."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import jwt
from mcp.server.auth.provider import AccessToken

from . import db
from .auth import KeyVerifier
from .config import Settings
from .errors import Unavailable
from .keys import KEY_PREFIX
from .oauth import ConnectionToken, resource_url

logger = logging.getLogger(__name__)

_TENANT_ID = "SELECT tenant_id FROM card_mcp.tenants WHERE name = $1"


class JwtVerifier:
    """Bearer tokens when CARD_MCP_AUTH_ISSUER_URL names an external issuer: JWT access tokens signed by a key of
    its JWKS, with this issuer, this server's resource as audience, unexpired; the tenant is the claim
    CARD_MCP_AUTH_TENANT_CLAIM names, looked up by the admin role (an unknown tenant is refused). API keys keep
    working beside them."""

    def __init__(self, settings: Settings, keys: KeyVerifier) -> None:
        assert settings.auth_issuer_url is not None
        self.keys = keys
        self.issuer = settings.auth_issuer_url
        self.audience = resource_url(settings)
        self.claim = settings.auth_tenant_claim
        jwks_url = settings.auth_jwks_url or self.issuer.rstrip("/") + "/.well-known/jwks.json"
        self.jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300, timeout=10)

    async def verify_token(self, token: str) -> AccessToken | None:
        if token.startswith(KEY_PREFIX):
            return await self.keys.verify_token(token)
        try:
            key = await anyio.to_thread.run_sync(self.jwks.get_signing_key_from_jwt, token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWKClientConnectionError as exc:
            logger.warning("cannot fetch the issuer's JWKS: %s", exc)
            raise Unavailable("the authorization server's keys cannot be fetched", hint="Retry later.") from exc
        except jwt.PyJWTError:
            return None
        name = claims.get(self.claim)
        if not isinstance(name, str) or self.keys.pool is None:
            return None
        with db.translate_errors():
            async with self.keys.pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
                tenant_id = await conn.fetchval(_TENANT_ID, name)
        if tenant_id is None:
            return None
        client = str(claims.get("client_id") or claims.get("azp") or "unknown")[:100]
        subject = str(claims["sub"]) if "sub" in claims else None
        scope = claims.get("scope")
        return ConnectionToken(
            token=token,
            client_id=client,
            scopes=scope.split() if isinstance(scope, str) else [],
            expires_at=int(claims["exp"]),
            resource=self.audience,
            subject=subject,
            claims={"iss": self.issuer},
            tenant_id=tenant_id,
            connection_id=None,
            limit_key=uuid.uuid5(uuid.NAMESPACE_URL, f"{self.issuer}#{client}#{subject}"),
        )
