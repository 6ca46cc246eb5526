"""Who is calling over HTTP: the SDK's token-verifier hook, which turns a presented API key into its tenant.

The server looks a key up with ``card_mcp.api_key_lookup`` (the admin role's narrow function) and keeps the answer
for a short while (CARD_MCP_KEY_CACHE_SECONDS), but only while it receives the database's announcements of revoked
keys, which make it forget a key at once: a revoked key stops working within milliseconds, and never later than
the cache time.
"""

from __future__ import annotations

import logging
import secrets
import time
from uuid import UUID

import anyio
import asyncpg
from mcp.server.auth.provider import AccessToken

from . import db
from .errors import CardMcpError
from .keys import KEY_SHAPE, key_hash

logger = logging.getLogger(__name__)


class KeyToken(AccessToken):
    """A verified API key: the tenant it belongs to and its id, for the tool call and its usage row."""

    tenant_id: UUID
    key_id: UUID


_LOOKUP = "SELECT * FROM card_mcp.api_key_lookup($1)"  # the tenant and key id of an unrevoked key's hash
_NOTIFY = "SELECT pg_notify($1, $2)"

# Revoked (or deleted) keys are announced with their id on a channel whose name is a secret that only the admin role
# can read (schema/0007_people_roles.sql): nobody else can listen to it, or forge an announcement.
_CHANNEL = "SELECT channel FROM card_mcp.notify_channels WHERE purpose = 'api_keys'"
_PROBE_EVERY = 10.0  # seconds between proofs that announcements still arrive
_PROBE_WAIT = 5.0  # how long a probe may take to come back before caching stops
_RETRY_AFTER = 5.0  # seconds before listening again after the connection failed
_MAX_CACHED = 10_000  # keys; beyond this the cache starts over rather than grow


class KeyVerifier:
    """The SDK's token-verifier hook: a bearer token is valid when it is an unrevoked key. Looks the key up on
    the admin pool the server's lifespan attaches, and keeps what it found for ``cache_seconds`` while
    ``follow_revocations`` runs and proves that revocations reach this process (otherwise every request looks up)."""

    def __init__(self, cache_seconds: float = 0.0) -> None:
        self.pool: asyncpg.Pool | None = None
        self.cache_seconds = cache_seconds
        self._cache: dict[bytes, tuple[UUID, UUID, float]] = {}  # key hash -> tenant, key id, good until
        self._listening = False  # revocations are known to arrive: caching is safe
        self._proven_until = 0.0  # monotonic time until which the last probe vouches for the listener
        self._changes = 0  # bumped by every revocation and every change of _listening

    async def verify_token(self, token: str) -> AccessToken | None:
        if self.pool is None or not KEY_SHAPE.fullmatch(token):
            return None
        digest = key_hash(token)
        now = time.monotonic()
        cached = self._cache.get(digest) if self._listening and now < self._proven_until else None
        if cached is not None and cached[2] > now:
            return _key_token(token, cached[0], cached[1])
        changes = self._changes
        with db.translate_errors():  # an unreachable database is `unavailable`, not a wrong key
            async with self.pool.acquire(timeout=db.ACQUIRE_TIMEOUT) as conn:
                row = await conn.fetchrow(_LOOKUP, digest)
        if row is None:
            return None
        # Kept only if no revocation arrived (and listening did not stop) while the lookup ran: the key may be
        # the one revoked, announced after the lookup read it as valid.
        if self._listening and self.cache_seconds > 0 and self._changes == changes:
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            self._cache[digest] = (row["tenant_id"], row["key_id"], time.monotonic() + self.cache_seconds)
        return _key_token(token, row["tenant_id"], row["key_id"])

    def forget(self, key_id: str) -> None:
        """A key was revoked (or deleted): never answer from the cache for it again."""
        self._changes += 1
        for digest, (_, cached_id, _) in list(self._cache.items()):
            if str(cached_id) == key_id:
                del self._cache[digest]

    def _stop_caching(self) -> None:
        self._listening = False
        self._changes += 1
        self._cache.clear()

    async def follow_revocations(self, admin_url: str) -> None:
        """For the server's lifetime: LISTEN for revoked keys on a connection of its own, and cache keys only while
        a probe (a NOTIFY sent through the admin pool, as a revocation is) comes back on it within seconds. When
        that connection closes, caching stops at once; a connection behind a transaction-pooling proxy, or one
        that silently stopped delivering, fails the next probe, and a probe older than 15 s vouches for nothing:
        no caching either."""
        if self.cache_seconds <= 0:
            return
        while True:
            try:
                await self._listen(admin_url)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, CardMcpError) as exc:
                logger.warning("not caching API keys: revocations cannot be followed (%s); retrying", exc)
            finally:
                self._stop_caching()
            await anyio.sleep(_RETRY_AFTER)

    async def _listen(self, admin_url: str) -> None:
        conn = await db.connect(admin_url)
        channel: str = await conn.fetchval(_CHANNEL)
        probes: dict[str, anyio.Event] = {}

        def announced(_conn: db.Connection, _pid: int, _channel: str, payload: object) -> None:
            payload = str(payload)
            if payload in probes:
                probes[payload].set()
            else:
                self.forget(payload)

        lost = anyio.Event()

        def closed(_conn: db.Connection) -> None:  # at once, not at the next probe: announcements may be missed
            self._stop_caching()
            lost.set()

        conn.add_termination_listener(closed)
        try:
            await conn.add_listener(channel, announced)
            while True:
                probe = f"probe-{secrets.token_hex(8)}"
                probes[probe] = anyio.Event()
                if self.pool is None:
                    raise TimeoutError("no admin pool")
                try:
                    with anyio.fail_after(_PROBE_WAIT):  # sent and come back, or caching stops
                        async with self.pool.acquire() as sender:
                            await sender.execute(_NOTIFY, channel, probe)
                        await probes[probe].wait()
                finally:
                    del probes[probe]
                # Vouches until the next probe is due and has had its time: never longer, even if this loop stalls.
                self._proven_until = time.monotonic() + _PROBE_EVERY + _PROBE_WAIT
                if not self._listening:
                    logger.info("caching API keys for %ss; revocations arrive at once", self.cache_seconds)
                    self._listening = True
                    self._changes += 1
                with anyio.move_on_after(_PROBE_EVERY):
                    await lost.wait()
                if lost.is_set():
                    raise ConnectionError("the connection that listens for revoked keys closed")
        finally:
            conn.terminate()  # no goodbye needed: LISTEN ends with the session


def _key_token(token: str, tenant_id: UUID, key_id: UUID) -> KeyToken:
    return KeyToken(token=token, client_id=str(key_id), scopes=[], tenant_id=tenant_id, key_id=key_id)
