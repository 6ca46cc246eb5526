"""What a superuser prepares, once, on a PostgreSQL server before card-mcp's migrations run there (SPEC section 6):
the roles, card-mcp's database, and pgvector where the server has it. The embedded PostgreSQL runs it at each
start (embedded.py, idempotent, skipped when nothing changed); the tests and benchmarks run it on the servers they
are given. The README shows the same roles made by hand, with passwords, for a server of one's own.
"""

from __future__ import annotations

# What only a superuser may do in card-mcp's database: create pgvector (not a trusted extension) for the optional
# semantic search, in card-mcp's schema, where the bundled PostgreSQL has it. Run in that database; idempotent.
VECTOR_SQL = """
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_available_extensions WHERE name = 'vector') THEN
        CREATE SCHEMA IF NOT EXISTS card_mcp AUTHORIZATION card_mcp_owner;
        CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA card_mcp;
    END IF;
END
$$;
"""

# card-mcp's database, made by psql (\gexec: CREATE DATABASE cannot run inside a DO block), owned by the owner role;
# run after ROLES_SQL, whose DO block its leading semicolon ends.
DATABASE_SQL = """;
SELECT 'CREATE DATABASE card_mcp OWNER card_mcp_owner'
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'card_mcp') \\gexec
"""

# The roles of SPEC section 6, as a superuser creates them: the owner of the schema (migrate and `readers`), the
# application role that runs tool queries, the admin role for the server's cross-tenant work, and the people's roles:
# the analyst (a login here: the socket only admits this user) and the group of per-tenant readers. The owner may
# hand functions to the admin role (membership), and creates and drops readers: CREATEROLE, and ADMIN OPTION on the
# readers' group (PostgreSQL 16+ asks for it to grant the group; 15 lets CREATEROLE grant any non-superuser role).
ROLES_SQL = """
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_owner') THEN
        CREATE ROLE card_mcp_owner LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB CREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_app') THEN
        CREATE ROLE card_mcp_app LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_admin') THEN
        CREATE ROLE card_mcp_admin LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_analyst') THEN
        CREATE ROLE card_mcp_analyst LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_reader') THEN
        CREATE ROLE card_mcp_reader NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT (SELECT rolcreaterole FROM pg_roles WHERE rolname = 'card_mcp_owner') THEN
        ALTER ROLE card_mcp_owner CREATEROLE;  -- made before readers existed
    END IF;
    IF NOT pg_has_role('card_mcp_owner', 'card_mcp_admin', 'MEMBER') THEN
        GRANT card_mcp_admin TO card_mcp_owner;
    END IF;
    IF NOT pg_has_role('card_mcp_owner', 'card_mcp_reader', 'MEMBER WITH ADMIN OPTION') THEN
        GRANT card_mcp_reader TO card_mcp_owner WITH ADMIN OPTION;
    END IF;
END
$$
"""
