"""Fixtures: a real PostgreSQL for every test (never a mock).

By default the tests start the embedded PostgreSQL in a temporary folder; with CARD_MCP_TEST_DATABASE_URL set
(a superuser URL, e.g. postgresql://postgres@127.0.0.1:5432/postgres) they use that server. Either way the
session creates one fresh database, migrates it as the owner role and drops it at the end; tests isolate
themselves by making their own tenants.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from card_mcp import db, migrate
from card_mcp.bootstrap import ROLES_SQL, VECTOR_SQL
from card_mcp.config import Settings
from card_mcp.embedded import SUPERUSER, EmbeddedPostgres


def with_user(url: str, user: str, database: str | None = None) -> str:
    """``url`` with another user (and database); passwords are not carried over."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}@{host}" + (f":{parts.port}" if parts.port else "")
    path = f"/{database}" if database is not None else parts.path
    query = urlencode(parse_qsl(parts.query))
    return urlunsplit((parts.scheme, netloc, path, query, ""))


@dataclass(frozen=True)
class TestDatabase:
    """A migrated database and the URLs of each role on it."""

    __test__ = False  # not a test class

    superuser_url: str  # the server's maintenance database, as a superuser
    name: str
    owner_url: str
    app_url: str
    admin_url: str
    embedded: bool

    def url_as(self, user: str) -> str:
        return with_user(self.superuser_url, user, self.name)


def make_tempdir(prefix: str) -> Path:
    """A temporary folder the embedded PostgreSQL's service user can reach when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def superuser_url() -> Iterator[str]:
    external = os.environ.get("CARD_MCP_TEST_DATABASE_URL")
    if external:
        yield external
        return
    folder = make_tempdir("card-mcp-test-")
    pg = EmbeddedPostgres(folder)
    pg.start()
    try:
        yield pg.url(SUPERUSER, "postgres")
    finally:
        pg.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def create_migrated_database(superuser_url: str, name: str) -> None:
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(ROLES_SQL)
        await conn.execute(f'CREATE DATABASE "{name}" OWNER card_mcp_owner')
    finally:
        await conn.close()
    conn = await asyncpg.connect(with_user(superuser_url, urlsplit(superuser_url).username or SUPERUSER, name))
    try:
        await conn.execute(VECTOR_SQL)  # as the embedded PostgreSQL does: pgvector where the server has it
    finally:
        await conn.close()
    owner = await db.connect(with_user(superuser_url, db.OWNER_ROLE, name))
    try:
        await migrate.migrate(owner)
    finally:
        await owner.close()


async def drop_database(superuser_url: str, name: str) -> None:
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@asynccontextmanager
async def new_database(superuser_url: str, prefix: str = "card_mcp_test") -> AsyncIterator[TestDatabase]:
    """A freshly migrated database of its own on the server at ``superuser_url``, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await create_migrated_database(superuser_url, name)
    try:
        yield TestDatabase(
            superuser_url=superuser_url,
            name=name,
            owner_url=with_user(superuser_url, db.OWNER_ROLE, name),
            app_url=with_user(superuser_url, db.APP_ROLE, name),
            admin_url=with_user(superuser_url, db.ADMIN_ROLE, name),
            embedded="CARD_MCP_TEST_DATABASE_URL" not in os.environ,
        )
    finally:
        await drop_database(superuser_url, name)


@pytest.fixture(scope="session")
async def database(superuser_url: str) -> AsyncIterator[TestDatabase]:
    async with new_database(superuser_url) as created:
        yield created


def settings_for(database: TestDatabase) -> Settings:
    """The servers' settings on ``database``. Semantic search off: the suite's answers must not depend on whether
    the semantic extra is installed (tests/test_semantic.py turns it on)."""
    return Settings(
        database_url=database.app_url,
        admin_database_url=database.admin_url,
        owner_database_url=database.owner_url,
        pool_max_size=8,
        semantic="off",
    )


@pytest.fixture(scope="session")
def settings(database: TestDatabase) -> Settings:
    return settings_for(database)


@asynccontextmanager
async def app_pool_for(database: TestDatabase, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool of the application role on ``database``, closed afterwards."""
    pool = await db.create_pool(database.app_url, settings)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(scope="session")
async def app_pool(database: TestDatabase, settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    async with app_pool_for(database, settings) as pool:
        yield pool


@pytest.fixture
async def admin_conn(database: TestDatabase) -> AsyncIterator[asyncpg.Connection]:
    conn = await db.connect(database.admin_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def tenant_a(database: TestDatabase) -> uuid.UUID:
    return await db.tenant_id_for(database.admin_url, f"a-{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def tenant_b(database: TestDatabase) -> uuid.UUID:
    return await db.tenant_id_for(database.admin_url, f"b-{uuid.uuid4().hex[:10]}")
