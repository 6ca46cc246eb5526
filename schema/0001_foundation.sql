-- card-mcp foundation: tenants, cards, the idempotency store and the usage log, all guarded by row-level
-- security that is enabled, forced and fails closed.
--
-- Runs as the schema owner (card-mcp migrate). Three roles:
--   card_mcp_owner (whoever runs this file) owns every object;
--   card_mcp_app   runs every tool query: owns nothing, sees one tenant at a time;
--   card_mcp_admin does the cross-tenant work through policies written TO it and through the SECURITY
--                  DEFINER functions below, which it owns.
-- Every primary key, unique constraint and foreign key begins with tenant_id, so Citus can distribute the
-- tenant tables by tenant_id (and keep tenants as a reference table) without a schema change.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_app') THEN
        CREATE ROLE card_mcp_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_admin') THEN
        CREATE ROLE card_mcp_admin NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    -- The owner hands the SECURITY DEFINER functions below to card_mcp_admin, which needs membership.
    IF NOT pg_has_role(current_user, 'card_mcp_admin', 'MEMBER') THEN
        EXECUTE format('GRANT card_mcp_admin TO %I', current_user);
    END IF;
END
$$;

GRANT USAGE ON SCHEMA card_mcp TO card_mcp_app, card_mcp_admin;
-- The server checks at start-up that nothing is pending (the ledger is created by card-mcp migrate itself).
GRANT SELECT ON card_mcp.schema_migrations TO card_mcp_app, card_mcp_admin;

-- A tenant is a brand's workspace. Tenants is a tenant table too: the application role reads only its own row.
CREATE TABLE card_mcp.tenants (
    tenant_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    name        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT tenants_pkey PRIMARY KEY (tenant_id),
    CONSTRAINT tenants_name_valid CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$')
);
-- Not a constraint including tenant_id: tenants becomes a Citus reference table, where any index is allowed.
CREATE UNIQUE INDEX tenants_name_key ON card_mcp.tenants (name);

CREATE TABLE card_mcp.cards (
    tenant_id     uuid        NOT NULL,
    id            uuid        NOT NULL DEFAULT gen_random_uuid(),
    card_type     text        NOT NULL,
    title         text        NOT NULL,
    content       jsonb       NOT NULL,
    tags          text[]      NOT NULL DEFAULT '{}',
    content_hash  text        NOT NULL,
    version       integer     NOT NULL DEFAULT 1,
    is_active     boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    deleted_at    timestamptz,
    CONSTRAINT cards_pkey PRIMARY KEY (tenant_id, id),
    CONSTRAINT cards_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT cards_card_type_valid CHECK (card_type IN ('company', 'audience', 'voice', 'insight')),
    CONSTRAINT cards_title_valid CHECK (char_length(title) BETWEEN 1 AND 200),
    CONSTRAINT cards_content_object CHECK (jsonb_typeof(content) = 'object'),
    CONSTRAINT cards_tags_valid CHECK (cardinality(tags) <= 20),
    CONSTRAINT cards_content_hash_valid CHECK (content_hash ~ '^[0-9a-f]{64}$'),
    CONSTRAINT cards_version_valid CHECK (version >= 1),
    CONSTRAINT cards_soft_delete CHECK (is_active = (deleted_at IS NULL))
);
-- Dedup: among a tenant's active cards, one card per (type, content).
CREATE UNIQUE INDEX cards_dedup_key ON card_mcp.cards (tenant_id, card_type, content_hash) WHERE is_active;
-- Listing newest-updated first, all types or one type.
CREATE INDEX cards_recent_idx ON card_mcp.cards (tenant_id, updated_at DESC, id DESC) WHERE is_active;
CREATE INDEX cards_type_recent_idx ON card_mcp.cards (tenant_id, card_type, updated_at DESC, id DESC)
    WHERE is_active;

CREATE FUNCTION card_mcp.touch_updated_at() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER cards_touch_updated_at
    BEFORE UPDATE ON card_mcp.cards
    FOR EACH ROW
    WHEN (OLD.* IS DISTINCT FROM NEW.*)
    EXECUTE FUNCTION card_mcp.touch_updated_at();

-- Responses of batch_create_cards stored under the caller's idempotency key.
CREATE TABLE card_mcp.idempotency_store (
    tenant_id        uuid        NOT NULL,
    idempotency_key  text        NOT NULL,
    tool             text        NOT NULL,
    request_hash     text        NOT NULL,
    response         jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    CONSTRAINT idempotency_store_pkey PRIMARY KEY (tenant_id, idempotency_key),
    CONSTRAINT idempotency_store_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT idempotency_store_key_valid CHECK (char_length(idempotency_key) BETWEEN 1 AND 255)
);
CREATE INDEX idempotency_store_expires_idx ON card_mcp.idempotency_store (expires_at);

-- One row per call of a card tool, resource read or prompt.
CREATE TABLE card_mcp.card_usage (
    tenant_id       uuid             NOT NULL,
    usage_id        bigint           GENERATED ALWAYS AS IDENTITY,
    tool            text             NOT NULL,
    status          text             NOT NULL,
    error_code      text,
    card_ids        uuid[]           NOT NULL DEFAULT '{}',
    duration_ms     double precision NOT NULL,
    client_name     text             NOT NULL DEFAULT 'unknown',
    client_version  text,
    transport       text             NOT NULL,
    api_key_id      uuid,
    called_at       timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT card_usage_pkey PRIMARY KEY (tenant_id, usage_id),
    CONSTRAINT card_usage_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT card_usage_status_valid CHECK (status IN ('ok', 'error')),
    CONSTRAINT card_usage_error_code_valid CHECK ((status = 'ok') = (error_code IS NULL)),
    CONSTRAINT card_usage_transport_valid CHECK (transport IN ('stdio', 'http', 'memory'))
);
CREATE INDEX card_usage_tenant_time_idx ON card_mcp.card_usage (tenant_id, called_at);

-- Row-level security: enabled and forced (FORCE binds the owner too), failing closed. With no tenant set,
-- current_setting(..., true) is NULL (or '' on a pooled connection after a transaction-local set_config),
-- the comparison is NULL, no row is visible and no row passes WITH CHECK. The sub-select makes the tenant an
-- InitPlan, evaluated once per statement, and uuid equality is leakproof, so the primary key can be used.
ALTER TABLE card_mcp.tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.tenants FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.cards ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.cards FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.idempotency_store ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.idempotency_store FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.card_usage ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.card_usage FORCE ROW LEVEL SECURITY;

CREATE POLICY tenants_current ON card_mcp.tenants FOR SELECT
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY tenants_admin ON card_mcp.tenants FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);

CREATE POLICY cards_current ON card_mcp.cards FOR ALL
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY cards_admin ON card_mcp.cards FOR SELECT TO card_mcp_admin
    USING (true);

CREATE POLICY idempotency_store_current ON card_mcp.idempotency_store FOR ALL
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY idempotency_store_admin ON card_mcp.idempotency_store FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);

CREATE POLICY card_usage_current ON card_mcp.card_usage FOR ALL
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY card_usage_admin ON card_mcp.card_usage FOR SELECT TO card_mcp_admin
    USING (true);

-- The application role never deletes a card (deletion is soft) and never changes a usage row.
GRANT SELECT ON card_mcp.tenants TO card_mcp_app;
GRANT SELECT, INSERT, UPDATE ON card_mcp.cards TO card_mcp_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON card_mcp.idempotency_store TO card_mcp_app;
GRANT SELECT, INSERT ON card_mcp.card_usage TO card_mcp_app;

GRANT SELECT, INSERT, UPDATE ON card_mcp.tenants TO card_mcp_admin;
GRANT SELECT ON card_mcp.cards TO card_mcp_admin;
GRANT SELECT, DELETE ON card_mcp.idempotency_store TO card_mcp_admin;
GRANT SELECT ON card_mcp.card_usage TO card_mcp_admin;

-- The tenant id for a name, creating the tenant on first use (stdio's --tenant). Runs as card_mcp_admin, whose
-- policy sees every tenant. Only the admin role may call it: an application-role session (a BI tool's, say)
-- must not turn a guessable name into the id that row-level security keys on.
CREATE FUNCTION card_mcp.tenant_id_for(p_name text) RETURNS uuid
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found uuid;
BEGIN
    SELECT t.tenant_id INTO found FROM card_mcp.tenants AS t WHERE t.name = p_name;
    IF found IS NULL THEN
        INSERT INTO card_mcp.tenants (name) VALUES (p_name)
            ON CONFLICT (name) DO NOTHING
            RETURNING tenant_id INTO found;
        IF found IS NULL THEN  -- created concurrently by another caller
            SELECT t.tenant_id INTO found FROM card_mcp.tenants AS t WHERE t.name = p_name;
        END IF;
    END IF;
    RETURN found;
END
$$;

-- Removes expired idempotency entries of every tenant; returns how many. Narrow: it deletes only what expired.
CREATE FUNCTION card_mcp.delete_expired_idempotency_keys() RETURNS bigint
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM card_mcp.idempotency_store WHERE expires_at < now() RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

-- A new owner needs CREATE on the schema at the moment it receives a function, and not afterwards.
GRANT CREATE ON SCHEMA card_mcp TO card_mcp_admin;
ALTER FUNCTION card_mcp.tenant_id_for(text) OWNER TO card_mcp_admin;
ALTER FUNCTION card_mcp.delete_expired_idempotency_keys() OWNER TO card_mcp_admin;
REVOKE CREATE ON SCHEMA card_mcp FROM card_mcp_admin;
REVOKE ALL ON FUNCTION card_mcp.tenant_id_for(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.delete_expired_idempotency_keys() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.tenant_id_for(text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.delete_expired_idempotency_keys() TO card_mcp_admin;
