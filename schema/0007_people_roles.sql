-- Roles by who holds them (issue #17). Before this file, the URLs handed to people were keys to every tenant: the
-- application role sets app.current_tenant_id itself, and the admin role could write api_keys and owned the
-- SECURITY DEFINER functions. Now:
--   the owner (whoever runs `card-mcp migrate`) owns every object, the SECURITY DEFINER functions included, and is
--        held by no running server;
--   card_mcp_app     (the server) runs tool queries; the tenant-setting policies apply to it alone;
--   card_mcp_admin   (the server) reads what its jobs need; it mints and revokes keys and creates tenants only
--                    through the narrow functions below, and writes nothing else but the embedding tables;
--   card_mcp_analyst (people) reads every tenant's cards, tenants and usage; writes nothing;
--   card_mcp_reader  (people, as a group) one login role per dashboard, mapped to one tenant in card_mcp.readers
--                    (which only the owner writes): its policies find the tenant from current_user, so setting
--                    app.current_tenant_id changes nothing for it.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_analyst') THEN
        CREATE ROLE card_mcp_analyst NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'card_mcp_reader') THEN
        CREATE ROLE card_mcp_reader NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    END IF;
END
$$;

-- The policies that trust app.current_tenant_id were written TO PUBLIC: any role with SELECT on a table could
-- choose its tenant. Only the application role may; every other role gets a policy of its own below.
ALTER POLICY tenants_current ON card_mcp.tenants TO card_mcp_app;
ALTER POLICY cards_current ON card_mcp.cards TO card_mcp_app;
ALTER POLICY idempotency_store_current ON card_mcp.idempotency_store TO card_mcp_app;
ALTER POLICY card_usage_current ON card_mcp.card_usage TO card_mcp_app;
DO $$
BEGIN
    -- 0006 is optional (pgvector); where it ran before this file, its tables get the same treatment.
    IF to_regclass('card_mcp.card_vectors') IS NOT NULL THEN
        ALTER POLICY card_vectors_current ON card_mcp.card_vectors TO card_mcp_app;
        ALTER POLICY embedding_queue_current ON card_mcp.embedding_queue TO card_mcp_app;
    END IF;
END
$$;

-- The SECURITY DEFINER functions pass to the owner: a runtime role that owns a function can replace it, drop it
-- or grant it on. (The owner keeps its membership in card_mcp_admin, whose policies let these functions see every
-- tenant; the membership runs one way: the admin role is no member of the owner.)
ALTER FUNCTION card_mcp.tenant_id_for(text) OWNER TO CURRENT_USER;
ALTER FUNCTION card_mcp.delete_expired_idempotency_keys() OWNER TO CURRENT_USER;
ALTER FUNCTION card_mcp.api_key_lookup(bytea) OWNER TO CURRENT_USER;
ALTER FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer) OWNER TO CURRENT_USER;
-- A new owner takes over the old owner's own EXECUTE: the admin role's (and the application role's) are granted again.
GRANT EXECUTE ON FUNCTION card_mcp.tenant_id_for(text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.delete_expired_idempotency_keys() TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.api_key_lookup(bytea) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer)
    TO card_mcp_app, card_mcp_admin;

-- The admin role writes no tenant, key or idempotency row directly any more: the functions below (and
-- tenant_id_for, delete_expired_idempotency_keys) do, each one narrow thing.
REVOKE INSERT, UPDATE, DELETE ON card_mcp.tenants FROM card_mcp_admin;
REVOKE INSERT, UPDATE, DELETE ON card_mcp.api_keys FROM card_mcp_admin;
REVOKE INSERT, UPDATE, DELETE ON card_mcp.idempotency_store FROM card_mcp_admin;

-- A new tenant; unique_violation if the name is taken, check_violation if it is not a valid name.
CREATE FUNCTION card_mcp.create_tenant(p_name text)
    RETURNS TABLE (tenant_id uuid, name text, created_at timestamptz)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    INSERT INTO card_mcp.tenants AS t (name) VALUES (p_name) RETURNING t.tenant_id, t.name, t.created_at
$$;

-- A new API key for the tenant called p_tenant, made here: the caller never chooses the key or its hash, so a key
-- exists only as this function made it, listed with its label and time. 'cmk_' and 43 URL-safe base64 characters
-- of two version-4 UUIDs from the strong random source (244 random bits), stored as its SHA-256 only; returned once.
-- no_data_found (P0002) when there is no such tenant.
CREATE FUNCTION card_mcp.create_api_key(p_tenant text, p_label text)
    RETURNS TABLE (key_id uuid, key text)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    v_key text;
    v_key_id uuid;
BEGIN
    SELECT t.tenant_id INTO v_tenant FROM card_mcp.tenants AS t WHERE t.name = p_tenant;
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'no tenant %', p_tenant USING ERRCODE = 'no_data_found';
    END IF;
    v_key := 'cmk_' || rtrim(translate(encode(uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
                                              'base64'), '+/', '-_'), '=');
    INSERT INTO card_mcp.api_keys AS k (tenant_id, prefix, key_hash, label)
    VALUES (v_tenant, left(v_key, 12), sha256(convert_to(v_key, 'UTF8')), p_label)
    RETURNING k.key_id INTO v_key_id;
    RETURN QUERY SELECT v_key_id, v_key;
END
$$;

-- Revoke a key (a second revocation keeps the first time); no row for an unknown id. There is no way back: a
-- revoked key stays revoked.
CREATE FUNCTION card_mcp.revoke_api_key(p_key_id uuid) RETURNS timestamptz
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE card_mcp.api_keys AS k SET revoked_at = coalesce(k.revoked_at, now())
     WHERE k.key_id = p_key_id
    RETURNING k.revoked_at
$$;

REVOKE ALL ON FUNCTION card_mcp.create_tenant(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.create_api_key(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.revoke_api_key(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.create_tenant(text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.create_api_key(text, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.revoke_api_key(uuid) TO card_mcp_admin;

-- Revocations were announced on a channel anyone could LISTEN to (and NOTIFY on: LISTEN and NOTIFY take no
-- privilege in PostgreSQL). They now go to a channel whose name is a secret made here, readable by the admin role
-- only: a person's session can neither hear the server's announcements nor forge one.
CREATE TABLE card_mcp.notify_channels (
    purpose  text NOT NULL,
    channel  text NOT NULL,
    CONSTRAINT notify_channels_pkey PRIMARY KEY (purpose)
);
INSERT INTO card_mcp.notify_channels (purpose, channel)
VALUES ('api_keys', 'card_mcp_api_keys_' || replace(gen_random_uuid()::text, '-', ''));
GRANT SELECT ON card_mcp.notify_channels TO card_mcp_admin;

-- SECURITY DEFINER (owned by the owner, like the table): whoever revokes or deletes a key needs no access to the
-- secret.
CREATE OR REPLACE FUNCTION card_mcp.announce_api_key_change() RETURNS trigger
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        PERFORM pg_catalog.pg_notify(
            (SELECT c.channel FROM card_mcp.notify_channels AS c WHERE c.purpose = 'api_keys'), OLD.key_id::text
        );
    END IF;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION card_mcp.announce_api_key_change() FROM PUBLIC;  -- a trigger needs no EXECUTE to fire

-- Per-tenant readers: which login role reads which tenant. Written by the owner only (`card-mcp readers`, through
-- the owner's URL); a reader sees its own row, which its policies look up. Like tenants and api_keys, a small table
-- read before the tenant is known (a Citus reference table), so role_name alone may be unique.
CREATE TABLE card_mcp.readers (
    tenant_id   uuid        NOT NULL,
    role_name   text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT readers_pkey PRIMARY KEY (tenant_id, role_name),
    CONSTRAINT readers_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id)
);
CREATE UNIQUE INDEX readers_role_name_key ON card_mcp.readers (role_name);
ALTER TABLE card_mcp.readers ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.readers FORCE ROW LEVEL SECURITY;
CREATE POLICY readers_self ON card_mcp.readers FOR SELECT TO card_mcp_reader
    USING (role_name = current_user::text);
DO $$
BEGIN
    -- The owner's name is whoever migrates (card_mcp_owner, or a hosted provider's postgres role).
    EXECUTE format('CREATE POLICY readers_owner ON card_mcp.readers FOR ALL TO %I USING (true) WITH CHECK (true)',
                   current_user);
END
$$;
GRANT SELECT ON card_mcp.readers TO card_mcp_reader;

-- What people read: tenants, cards (deleted ones too: they are kept for audit) and the usage log, and the views
-- over it (security_invoker, so these policies apply to them too). Nothing else: no key, no idempotency entry.
GRANT USAGE ON SCHEMA card_mcp TO card_mcp_analyst, card_mcp_reader;
GRANT SELECT ON card_mcp.tenants, card_mcp.cards, card_mcp.card_usage,
                card_mcp.usage_daily, card_mcp.usage_by_card, card_mcp.usage_by_client
    TO card_mcp_analyst, card_mcp_reader;

CREATE POLICY tenants_analyst ON card_mcp.tenants FOR SELECT TO card_mcp_analyst USING (true);
CREATE POLICY cards_analyst ON card_mcp.cards FOR SELECT TO card_mcp_analyst USING (true);
CREATE POLICY card_usage_analyst ON card_mcp.card_usage FOR SELECT TO card_mcp_analyst USING (true);

-- The reader's tenant, from current_user through the mapping: an InitPlan, evaluated once per statement.
CREATE POLICY tenants_reader ON card_mcp.tenants FOR SELECT TO card_mcp_reader
    USING (tenant_id = (SELECT r.tenant_id FROM card_mcp.readers AS r WHERE r.role_name = current_user::text));
CREATE POLICY cards_reader ON card_mcp.cards FOR SELECT TO card_mcp_reader
    USING (tenant_id = (SELECT r.tenant_id FROM card_mcp.readers AS r WHERE r.role_name = current_user::text));
CREATE POLICY card_usage_reader ON card_mcp.card_usage FOR SELECT TO card_mcp_reader
    USING (tenant_id = (SELECT r.tenant_id FROM card_mcp.readers AS r WHERE r.role_name = current_user::text));
