"""Settings, read once from ``CARD_MCP_*`` environment variables (command-line flags override them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args, get_origin

import platformdirs
from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import SetupError

# Where root keeps the embedded database: outside every home folder, because the unprivileged user that
# PostgreSQL must run as has to reach it without loosening the permissions of /root.
ROOT_DATA_DIR = Path("/var/lib/card-mcp")


def default_data_dir() -> Path:
    """The platform's user data directory, or ``/var/lib/card-mcp`` for root."""
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return ROOT_DATA_DIR
    return Path(platformdirs.user_data_dir("card-mcp", appauthor=False))


class Settings(BaseSettings):
    """card-mcp's configuration; see the README's configuration table."""

    model_config = SettingsConfigDict(env_prefix="CARD_MCP_", extra="ignore")

    database_url: str | None = Field(
        default=None, description="PostgreSQL URL of the application role; unset: the embedded PostgreSQL."
    )
    admin_database_url: str | None = Field(
        default=None, description="Runtime admin role's URL: key lookups, tenants, keys, usage across tenants."
    )
    owner_database_url: str | None = Field(
        default=None, description="The schema owner's URL, for migrate and readers only; never held by serve."
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Where the embedded PostgreSQL lives.")
    tenant: str = Field(default="default", min_length=1, max_length=100, description="Tenant served over stdio.")
    create_tenant: bool = Field(
        default=True,
        description="stdio: create the --tenant on first use (false: refuse a tenant that does not exist).",
    )
    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_content_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    pool_min_size: int = Field(default=1, ge=0)
    pool_max_size: int = Field(default=10, ge=1)
    statement_cache_size: int = Field(default=100, ge=0, description="0 behind pgbouncer in transaction mode.")
    command_timeout: float = Field(default=30.0, gt=0, description="Seconds before a database call fails.")
    stateless: bool = Field(
        default=False, description="HTTP: no session state in the process, so any instance can answer any request."
    )
    public_url: str | None = Field(
        default=None, description="HTTP: the URL clients reach the server at; default http://HOST:PORT."
    )
    auth_issuer_url: str | None = Field(
        default=None,
        description="HTTP: trust this external OAuth authorization server (JWT access tokens) instead of being one.",
    )
    auth_jwks_url: str | None = Field(
        default=None, description="HTTP, external issuer: its JWKS URL; default ISSUER/.well-known/jwks.json."
    )
    auth_tenant_claim: str = Field(
        default="tenant", min_length=1, description="HTTP, external issuer: the JWT claim naming the tenant."
    )
    oauth_access_token_seconds: int = Field(
        default=3600, ge=60, le=86_400, description="HTTP: lifetime of an OAuth access token card-mcp issues."
    )
    oauth_refresh_token_days: float = Field(
        default=30.0, gt=0, le=365, description="HTTP: lifetime of an OAuth refresh token (rotated at each use)."
    )
    oauth_clients_per_address: int = Field(
        default=20, ge=1, description="HTTP: OAuth clients one address may register a day."
    )
    oauth_client_idle_days: float = Field(
        default=30.0, gt=0, description="HTTP: days an OAuth client with no live connection is kept unused."
    )
    connect_code_minutes: float = Field(
        default=10.0, gt=0, le=1440, description="How long a `card-mcp connect` code may be used."
    )
    allowed_hosts: str = Field(
        default="", description="HTTP: extra Host header values to accept (comma-separated; 'name:*' for any port)."
    )
    allowed_origins: str = Field(default="", description="HTTP: extra browser Origins to accept (comma-separated).")
    # A batch the contract allows (1000 cards of 64 KiB) is about 64 MiB of JSON.
    max_request_bytes: int = Field(default=80 * 1024 * 1024, ge=64 * 1024, description="HTTP: largest request body.")
    # Below the pool's size, so one key cannot hold every connection.
    key_cache_seconds: float = Field(
        default=30.0,
        ge=0,
        description="HTTP: seconds a verified API key is kept, while revocations are known to arrive (0: never).",
    )
    max_calls_per_key: int = Field(default=5, ge=1, description="HTTP: tool calls one API key may run at once.")
    # 10,000 sessions cost about 370 MB (issue #18); one key (or OAuth connection) may hold a bounded share, so
    # that no single credential can fill the process-wide bound.
    max_sessions: int = Field(default=2000, ge=2, description="HTTP: stateful sessions open at once, all keys.")
    max_sessions_per_key: int = Field(
        default=100, ge=1, description="HTTP: stateful sessions one API key or connection may hold open."
    )
    session_idle_seconds: float = Field(
        default=600.0, gt=0, le=86_400, description="HTTP: a session with no request in flight this long is closed."
    )
    lock_timeout_seconds: float = Field(
        default=120.0, gt=0, description="How long a command waits for the embedded database's control lock."
    )
    statement_timeout_ms: int = Field(
        default=15_000, ge=0, description="Milliseconds a tool's SQL statement may run (0: no limit)."
    )
    idempotency_ttl_hours: float = Field(
        default=24.0, ge=24.0, description="How long batch_create_cards keeps an idempotency key (at least 24)."
    )
    history_keep_versions: int = Field(
        default=0, ge=0, description="Newest versions kept per card in its history (0: keep every version)."
    )
    usage_retention_days: int | None = Field(
        default=None,
        ge=1,
        le=36_500,
        description="Days of usage rows kept (whole days; older daily partitions are dropped); unset: keep everything.",
    )
    semantic: Literal["auto", "off"] = Field(
        default="auto",
        description="Semantic search: on wherever the semantic extra and the vector extension are both there.",
    )
    embed_threads: int = Field(default=1, ge=1, le=64, description="CPU threads of the embedding model.")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _one_key_cannot_fill_the_server(self) -> Settings:
        if self.max_sessions_per_key >= self.max_sessions:
            raise ValueError("CARD_MCP_MAX_SESSIONS_PER_KEY must be below CARD_MCP_MAX_SESSIONS")
        return self

    @property
    def url(self) -> str:
        """Where HTTP clients reach this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (self.public_url or f"http://{host}:{self.port}").rstrip("/")

    @property
    def embedded(self) -> bool:
        """True when card-mcp runs (and owns) its own PostgreSQL."""
        return self.database_url is None


def invalid_setting(exc: ValidationError, flags: dict[str, str]) -> SetupError:
    """The first setting ``exc`` refuses, named as the user set it: by its flag when ``flags`` (setting name to
    flag) holds it (``--port``), else as ``CARD_MCP_PORT``; with what the setting accepts."""
    err = exc.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    where = flags.get(name, f"CARD_MCP_{name.upper()}")
    field = Settings.model_fields.get(name)
    takes = _accepts(field) if field is not None else "a valid value"
    default = f"; unset, it is {field.default}" if field is not None and field.default not in (None, "") else ""
    problem = err["msg"].split(",")[0].replace("Input should be", "it should be")
    return SetupError(f"{where} is not valid: {problem}", hint=f"it takes {takes}{default}")


def _accepts(field: FieldInfo) -> str:
    """What a setting accepts, in words: its type and bounds (``an integer from 0 to 65535``)."""
    annotation = field.annotation
    choices = get_args(annotation) if get_origin(annotation) is Literal else ()
    if choices:
        return "one of " + ", ".join(str(choice) for choice in choices)
    kind = {int: "an integer", float: "a number", bool: "true or false", Path: "a folder path"}.get(
        annotation if isinstance(annotation, type) else type(None), "text"
    )
    bounds = []
    for rule in field.metadata:
        for attribute, words in (("ge", "at least"), ("gt", "above"), ("le", "at most"), ("lt", "below")):
            value = getattr(rule, attribute, None)
            if value is not None:
                bounds.append(f"{words} {value}")
        if getattr(rule, "min_length", None):
            bounds.append(f"at least {rule.min_length} characters")
        if getattr(rule, "max_length", None):
            bounds.append(f"at most {rule.max_length} characters")
    return kind + (f", {' and '.join(bounds)}" if bounds else "")
