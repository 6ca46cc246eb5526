-- API keys for the HTTP transport: each key belongs to exactly one tenant and is stored only as its SHA-256
-- (a key is 256 random bits, so a fast hash is enough: nothing to brute-force). The application role has no
-- access at all; the admin role creates, lists and revokes keys, and the server looks a presented key up
-- through card_mcp.api_key_lookup before any tenant is known.
--
-- Citus: like tenants, api_keys is a small table read before the tenant is known, so it becomes a reference
-- table (replicated, any index allowed); its keys still begin with tenant_id.

CREATE TABLE card_mcp.api_keys (
    tenant_id     uuid        NOT NULL,
    key_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    prefix        text        NOT NULL,
    key_hash      bytea       NOT NULL,
    label         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    revoked_at    timestamptz,
    CONSTRAINT api_keys_pkey PRIMARY KEY (tenant_id, key_id),
    CONSTRAINT api_keys_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT api_keys_hash_valid CHECK (octet_length(key_hash) = 32),
    CONSTRAINT api_keys_prefix_valid CHECK (char_length(prefix) BETWEEN 4 AND 32),
    CONSTRAINT api_keys_label_valid CHECK (label IS NULL OR char_length(label) BETWEEN 1 AND 200)
);
CREATE UNIQUE INDEX api_keys_hash_key ON card_mcp.api_keys (key_hash);
CREATE UNIQUE INDEX api_keys_key_id_key ON card_mcp.api_keys (key_id);

ALTER TABLE card_mcp.api_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.api_keys FORCE ROW LEVEL SECURITY;
-- Only the admin role has a policy (and privileges): for anyone else the table is empty and read-only.
CREATE POLICY api_keys_admin ON card_mcp.api_keys FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, UPDATE ON card_mcp.api_keys TO card_mcp_admin;

-- The tenant and key id for a presented key's hash, if it is not revoked; nothing otherwise. Records the use at
-- most once a minute, so a busy key does not rewrite its row on every request.
CREATE FUNCTION card_mcp.api_key_lookup(p_key_hash bytea) RETURNS TABLE (tenant_id uuid, key_id uuid)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH found AS (
        SELECT k.tenant_id, k.key_id, k.last_used_at
          FROM card_mcp.api_keys AS k
         WHERE k.key_hash = p_key_hash AND k.revoked_at IS NULL
    ), touched AS (
        UPDATE card_mcp.api_keys AS k SET last_used_at = now()
          FROM found AS f
         WHERE k.tenant_id = f.tenant_id AND k.key_id = f.key_id
           AND (f.last_used_at IS NULL OR f.last_used_at < now() - interval '1 minute')
    )
    SELECT f.tenant_id, f.key_id FROM found AS f
$$;

GRANT CREATE ON SCHEMA card_mcp TO card_mcp_admin;
ALTER FUNCTION card_mcp.api_key_lookup(bytea) OWNER TO card_mcp_admin;
REVOKE CREATE ON SCHEMA card_mcp FROM card_mcp_admin;
REVOKE ALL ON FUNCTION card_mcp.api_key_lookup(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.api_key_lookup(bytea) TO card_mcp_admin;
