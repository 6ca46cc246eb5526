-- OAuth 2.1 for remote MCP clients (issue #23): card-mcp is the authorization server of its own tenants.
--
-- A client registers itself (oauth_clients), sends a person to the sign-in page (oauth_requests, a pending
-- authorization), who proves the right to a tenant with a one-time connect code (connect_codes) or an API key of
-- that tenant and consents; that makes a connection (oauth_connections: one tenant, one client, one resource)
-- with a single-use authorization code (oauth_codes), exchanged for an access and a refresh token (oauth_tokens).
-- Every secret (request id, connect code, authorization code, token) is stored only as its SHA-256 and is hashed
-- here, inside the functions: knowing a hash (an admin can read api_keys.key_hash) proves nothing.
--
-- Who may write: nobody directly. Every write is one of the narrow SECURITY DEFINER functions below, owned by
-- the owner, with a fixed search_path, EXECUTE revoked from PUBLIC. The runtime admin role may run the functions
-- the server needs; each one requires the proof the step needs (a valid request bound to the browser, a connect
-- code or key of the tenant, an unused code, a live refresh token), so the admin role cannot mint a token for a
-- tenant nobody signed in to. Making connect codes (`card-mcp connect`) is the owner's alone.
--
-- Citus: clients and pending requests exist before any tenant is known (like tenants and api_keys, reference
-- tables); everything bound to a tenant has tenant_id leading its keys.

CREATE TABLE card_mcp.oauth_clients (
    client_id        text        NOT NULL,
    metadata         jsonb       NOT NULL,  -- what the client registered (RFC 7591), its secret included
    registered_from  text        NOT NULL,  -- the address it registered from, for the per-address limit
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_used_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT oauth_clients_pkey PRIMARY KEY (client_id),
    CONSTRAINT oauth_clients_id_valid CHECK (char_length(client_id) BETWEEN 1 AND 100)
);
CREATE INDEX oauth_clients_address_idx ON card_mcp.oauth_clients (registered_from, created_at);

CREATE TABLE card_mcp.oauth_requests (
    request_hash     bytea       NOT NULL,
    client_id        text        NOT NULL,
    params           jsonb       NOT NULL,  -- state, scopes, code_challenge, redirect_uri, resource
    browser_hash     bytea,                 -- the sign-in page's cookie, bound on first sight
    tenant_id        uuid,                  -- set once the person proved the right to a tenant
    signed_in_with   text,
    api_key_id       uuid,
    expires_at       timestamptz NOT NULL,
    CONSTRAINT oauth_requests_pkey PRIMARY KEY (request_hash),
    CONSTRAINT oauth_requests_client_fkey FOREIGN KEY (client_id)
        REFERENCES card_mcp.oauth_clients (client_id) ON DELETE CASCADE,
    CONSTRAINT oauth_requests_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES card_mcp.tenants (tenant_id) ON DELETE CASCADE
);

CREATE TABLE card_mcp.connect_codes (
    tenant_id   uuid        NOT NULL,
    code_hash   bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    used_at     timestamptz,
    CONSTRAINT connect_codes_pkey PRIMARY KEY (tenant_id, code_hash),
    CONSTRAINT connect_codes_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES card_mcp.tenants (tenant_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX connect_codes_hash_key ON card_mcp.connect_codes (code_hash);

CREATE TABLE card_mcp.oauth_connections (
    tenant_id       uuid        NOT NULL,
    connection_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
    client_id       text        NOT NULL,
    resource        text        NOT NULL,
    scopes          text[]      NOT NULL DEFAULT '{}',
    signed_in_with  text        NOT NULL,
    api_key_id      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz,
    CONSTRAINT oauth_connections_pkey PRIMARY KEY (tenant_id, connection_id),
    CONSTRAINT oauth_connections_tenant_fkey FOREIGN KEY (tenant_id)
        REFERENCES card_mcp.tenants (tenant_id) ON DELETE CASCADE,
    CONSTRAINT oauth_connections_client_fkey FOREIGN KEY (client_id)
        REFERENCES card_mcp.oauth_clients (client_id) ON DELETE CASCADE,
    CONSTRAINT oauth_connections_signed_in_with_valid CHECK (signed_in_with IN ('connect_code', 'api_key'))
);
CREATE UNIQUE INDEX oauth_connections_id_key ON card_mcp.oauth_connections (connection_id);
CREATE INDEX oauth_connections_client_idx ON card_mcp.oauth_connections (client_id);

CREATE TABLE card_mcp.oauth_codes (
    tenant_id          uuid        NOT NULL,
    code_hash          bytea       NOT NULL,
    connection_id      uuid        NOT NULL,
    code_challenge     text        NOT NULL,
    redirect_uri       text        NOT NULL,
    redirect_explicit  boolean     NOT NULL,
    expires_at         timestamptz NOT NULL,
    used_at            timestamptz,
    CONSTRAINT oauth_codes_pkey PRIMARY KEY (tenant_id, code_hash),
    CONSTRAINT oauth_codes_connection_fkey FOREIGN KEY (tenant_id, connection_id)
        REFERENCES card_mcp.oauth_connections (tenant_id, connection_id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX oauth_codes_hash_key ON card_mcp.oauth_codes (code_hash);

CREATE TABLE card_mcp.oauth_tokens (
    tenant_id      uuid        NOT NULL,
    token_hash     bytea       NOT NULL,
    connection_id  uuid        NOT NULL,
    kind           text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,  -- a refresh token, once rotated: using it again revokes the connection
    CONSTRAINT oauth_tokens_pkey PRIMARY KEY (tenant_id, token_hash),
    CONSTRAINT oauth_tokens_connection_fkey FOREIGN KEY (tenant_id, connection_id)
        REFERENCES card_mcp.oauth_connections (tenant_id, connection_id) ON DELETE CASCADE,
    CONSTRAINT oauth_tokens_kind_valid CHECK (kind IN ('access', 'refresh'))
);
CREATE UNIQUE INDEX oauth_tokens_hash_key ON card_mcp.oauth_tokens (token_hash);
CREATE INDEX oauth_tokens_connection_idx ON card_mcp.oauth_tokens (tenant_id, connection_id);

-- Row-level security, enabled and forced. The functions run as the owner (FORCE binds it too), through the owner's
-- policies; the admin role may only read clients and connections (for get_client and `connections list`).
ALTER TABLE card_mcp.oauth_clients ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_clients FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_requests ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_requests FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.connect_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.connect_codes FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_connections ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_connections FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_codes ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_codes FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_tokens ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.oauth_tokens FORCE ROW LEVEL SECURITY;

CREATE POLICY oauth_clients_owner ON card_mcp.oauth_clients FOR ALL TO card_mcp_owner USING (true) WITH CHECK (true);
CREATE POLICY oauth_requests_owner ON card_mcp.oauth_requests FOR ALL TO card_mcp_owner USING (true) WITH CHECK (true);
CREATE POLICY connect_codes_owner ON card_mcp.connect_codes FOR ALL TO card_mcp_owner USING (true) WITH CHECK (true);
CREATE POLICY oauth_connections_owner ON card_mcp.oauth_connections FOR ALL TO card_mcp_owner
    USING (true) WITH CHECK (true);
CREATE POLICY oauth_codes_owner ON card_mcp.oauth_codes FOR ALL TO card_mcp_owner USING (true) WITH CHECK (true);
CREATE POLICY oauth_tokens_owner ON card_mcp.oauth_tokens FOR ALL TO card_mcp_owner USING (true) WITH CHECK (true);
CREATE POLICY oauth_clients_admin_read ON card_mcp.oauth_clients FOR SELECT TO card_mcp_admin USING (true);
CREATE POLICY oauth_connections_admin_read ON card_mcp.oauth_connections FOR SELECT TO card_mcp_admin USING (true);
GRANT SELECT ON card_mcp.oauth_clients, card_mcp.oauth_connections TO card_mcp_admin;
-- Signing in with an API key reads api_keys as the owner (only the admin role had a policy there).
CREATE POLICY api_keys_owner_oauth_read ON card_mcp.api_keys FOR SELECT TO card_mcp_owner USING (true);

-- Registration (RFC 7591): at most p_per_address clients per address a day. Clients unused for p_idle and with no
-- live connection, and expired pending requests, are swept here first: registration is what makes them.
CREATE FUNCTION card_mcp.oauth_register_client(
    p_client_id text, p_metadata jsonb, p_address text, p_per_address integer, p_idle interval
) RETURNS boolean
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('card_mcp.oauth_register:' || p_address, 0));
    DELETE FROM card_mcp.oauth_requests WHERE expires_at < now();
    DELETE FROM card_mcp.oauth_clients AS c
     WHERE c.last_used_at < now() - p_idle
       AND NOT EXISTS (SELECT 1 FROM card_mcp.oauth_connections AS k
                        WHERE k.client_id = c.client_id AND k.revoked_at IS NULL);
    IF (SELECT count(*) FROM card_mcp.oauth_clients
         WHERE registered_from = p_address AND created_at > now() - interval '1 day') >= p_per_address THEN
        RETURN false;
    END IF;
    INSERT INTO card_mcp.oauth_clients (client_id, metadata, registered_from) VALUES (p_client_id, p_metadata, p_address);
    RETURN true;
END
$$;

-- /authorize: a pending authorization, found again by its id (in the sign-in page's URL).
CREATE FUNCTION card_mcp.oauth_request_create(p_request text, p_client_id text, p_params jsonb, p_ttl interval)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE card_mcp.oauth_clients SET last_used_at = now() WHERE client_id = p_client_id;
    INSERT INTO card_mcp.oauth_requests (request_hash, client_id, params, expires_at)
    VALUES (sha256(convert_to(p_request, 'UTF8')), p_client_id, p_params, now() + p_ttl);
$$;

-- The sign-in page: the pending request, if it is unexpired and this browser's (the first browser to open it
-- binds it). tenant_name is set once the person signed in (the consent screen).
CREATE FUNCTION card_mcp.oauth_request_get(p_request text, p_browser text)
    RETURNS TABLE (client_id text, params jsonb, client_metadata jsonb, tenant_name text)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    UPDATE card_mcp.oauth_requests SET browser_hash = sha256(convert_to(p_browser, 'UTF8'))
     WHERE request_hash = sha256(convert_to(p_request, 'UTF8')) AND browser_hash IS NULL AND expires_at > now();
    RETURN QUERY
        SELECT r.client_id, r.params, c.metadata, t.name
          FROM card_mcp.oauth_requests AS r
          JOIN card_mcp.oauth_clients AS c ON c.client_id = r.client_id
          LEFT JOIN card_mcp.tenants AS t ON t.tenant_id = r.tenant_id
         WHERE r.request_hash = sha256(convert_to(p_request, 'UTF8'))
           AND r.browser_hash = sha256(convert_to(p_browser, 'UTF8'))
           AND r.expires_at > now();
END
$$;

-- Sign-in: the person names a tenant and proves the right to it with a one-time connect code of that tenant
-- (consumed) or one of its unrevoked API keys. 'ok', 'denied' (wrong proof: nothing written) or 'invalid' (no such
-- pending request for this browser, or already signed in).
CREATE FUNCTION card_mcp.oauth_sign_in(p_request text, p_browser text, p_tenant_id uuid, p_proof text)
    RETURNS text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_request bytea := sha256(convert_to(p_request, 'UTF8'));
    v_proof bytea := sha256(convert_to(p_proof, 'UTF8'));
    v_key uuid;
BEGIN
    PERFORM 1 FROM card_mcp.oauth_requests
      WHERE request_hash = v_request AND browser_hash = sha256(convert_to(p_browser, 'UTF8'))
        AND expires_at > now() AND tenant_id IS NULL
      FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'invalid';
    END IF;
    IF p_proof LIKE 'cmk\_%' THEN
        SELECT k.key_id INTO v_key FROM card_mcp.api_keys AS k
         WHERE k.key_hash = v_proof AND k.tenant_id = p_tenant_id AND k.revoked_at IS NULL;
        IF v_key IS NULL THEN
            RETURN 'denied';
        END IF;
        UPDATE card_mcp.oauth_requests SET tenant_id = p_tenant_id, signed_in_with = 'api_key', api_key_id = v_key
         WHERE request_hash = v_request;
        RETURN 'ok';
    END IF;
    UPDATE card_mcp.connect_codes SET used_at = now()
     WHERE code_hash = v_proof AND tenant_id = p_tenant_id AND used_at IS NULL AND expires_at > now();
    IF NOT FOUND THEN
        RETURN 'denied';
    END IF;
    UPDATE card_mcp.oauth_requests SET tenant_id = p_tenant_id, signed_in_with = 'connect_code'
     WHERE request_hash = v_request;
    RETURN 'ok';
END
$$;

-- Consent (or refusal) of a signed-in request, which ends it. Approved: the connection and its single-use
-- authorization code (p_code, alive for p_code_ttl). Returns the request's params (for the redirect), or nothing
-- if there is no such signed-in request for this browser.
CREATE FUNCTION card_mcp.oauth_decide(
    p_request text, p_browser text, p_approve boolean, p_code text, p_code_ttl interval
) RETURNS TABLE (params jsonb, connection_id uuid)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    r card_mcp.oauth_requests;
    v_connection uuid;
BEGIN
    DELETE FROM card_mcp.oauth_requests AS q
     WHERE q.request_hash = sha256(convert_to(p_request, 'UTF8'))
       AND q.browser_hash = sha256(convert_to(p_browser, 'UTF8'))
       AND q.expires_at > now() AND q.tenant_id IS NOT NULL
    RETURNING q.* INTO r;
    IF r.request_hash IS NULL THEN
        RETURN;
    END IF;
    IF p_approve THEN
        INSERT INTO card_mcp.oauth_connections (tenant_id, client_id, resource, scopes, signed_in_with, api_key_id)
        VALUES (r.tenant_id, r.client_id, r.params ->> 'resource',
                ARRAY(SELECT jsonb_array_elements_text(coalesce(r.params -> 'scopes', '[]'::jsonb))),
                r.signed_in_with, r.api_key_id)
        RETURNING oauth_connections.connection_id INTO v_connection;
        INSERT INTO card_mcp.oauth_codes
               (tenant_id, code_hash, connection_id, code_challenge, redirect_uri, redirect_explicit, expires_at)
        VALUES (r.tenant_id, sha256(convert_to(p_code, 'UTF8')), v_connection, r.params ->> 'code_challenge',
                r.params ->> 'redirect_uri', (r.params ->> 'redirect_uri_provided_explicitly')::boolean,
                now() + p_code_ttl);
    END IF;
    RETURN QUERY SELECT r.params, v_connection;
END
$$;

-- The token endpoint's look-ups. A used code or refresh token is still found (with its use), so that its reuse can
-- revoke the connection; a revoked connection's are not found.
CREATE FUNCTION card_mcp.oauth_code_lookup(p_client_id text, p_code text)
    RETURNS TABLE (tenant_id uuid, connection_id uuid, code_challenge text, redirect_uri text,
                   redirect_explicit boolean, resource text, scopes text[], expires_at timestamptz, used boolean)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT c.tenant_id, c.connection_id, c.code_challenge, c.redirect_uri, c.redirect_explicit, k.resource, k.scopes,
           c.expires_at, c.used_at IS NOT NULL
      FROM card_mcp.oauth_codes AS c
      JOIN card_mcp.oauth_connections AS k USING (tenant_id, connection_id)
     WHERE c.code_hash = sha256(convert_to(p_code, 'UTF8')) AND k.client_id = p_client_id AND k.revoked_at IS NULL
$$;

CREATE FUNCTION card_mcp.oauth_refresh_lookup(p_client_id text, p_token text)
    RETURNS TABLE (tenant_id uuid, connection_id uuid, resource text, scopes text[], expires_at timestamptz,
                   used boolean)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT t.tenant_id, t.connection_id, k.resource, k.scopes, t.expires_at, t.used_at IS NOT NULL
      FROM card_mcp.oauth_tokens AS t
      JOIN card_mcp.oauth_connections AS k USING (tenant_id, connection_id)
     WHERE t.token_hash = sha256(convert_to(p_token, 'UTF8')) AND t.kind = 'refresh'
       AND k.client_id = p_client_id AND k.revoked_at IS NULL
$$;

-- A new access and refresh token pair for a connection, replacing what the grant (an authorization code or a
-- refresh token, p_grant) used up. 'ok'; 'reused' when the grant was used before: its connection is revoked (RFC 6749
-- 4.1.2 for codes, RFC 9700 4.14.2 for refresh tokens); 'invalid' when there is no such live grant.
CREATE FUNCTION card_mcp.oauth_issue(
    p_client_id text, p_grant_kind text, p_grant text, p_access text, p_refresh text,
    p_access_ttl interval, p_refresh_ttl interval
) RETURNS text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_grant bytea := sha256(convert_to(p_grant, 'UTF8'));
    v_tenant uuid;
    v_connection uuid;
    v_used timestamptz;
    v_expires timestamptz;
BEGIN
    IF p_grant_kind = 'code' THEN
        SELECT c.tenant_id, c.connection_id, c.used_at, c.expires_at INTO v_tenant, v_connection, v_used, v_expires
          FROM card_mcp.oauth_codes AS c
         WHERE c.code_hash = v_grant FOR UPDATE;
    ELSIF p_grant_kind = 'refresh' THEN
        SELECT t.tenant_id, t.connection_id, t.used_at, t.expires_at INTO v_tenant, v_connection, v_used, v_expires
          FROM card_mcp.oauth_tokens AS t
         WHERE t.token_hash = v_grant AND t.kind = 'refresh' FOR UPDATE;
    ELSE
        RAISE EXCEPTION 'unknown grant kind %', p_grant_kind;
    END IF;
    PERFORM 1 FROM card_mcp.oauth_connections AS k
      WHERE k.tenant_id = v_tenant AND k.connection_id = v_connection
        AND k.client_id = p_client_id AND k.revoked_at IS NULL
      FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'invalid';
    END IF;
    IF v_used IS NOT NULL THEN
        UPDATE card_mcp.oauth_connections SET revoked_at = now()
         WHERE tenant_id = v_tenant AND connection_id = v_connection;
        RETURN 'reused';
    END IF;
    IF v_expires <= now() THEN
        RETURN 'invalid';
    END IF;
    IF p_grant_kind = 'code' THEN
        UPDATE card_mcp.oauth_codes SET used_at = now() WHERE code_hash = v_grant;
    ELSE
        UPDATE card_mcp.oauth_tokens SET used_at = now() WHERE token_hash = v_grant;
        DELETE FROM card_mcp.oauth_tokens
         WHERE tenant_id = v_tenant AND connection_id = v_connection AND expires_at < now();
    END IF;
    INSERT INTO card_mcp.oauth_tokens (tenant_id, token_hash, connection_id, kind, expires_at)
    VALUES (v_tenant, sha256(convert_to(p_access, 'UTF8')), v_connection, 'access', now() + p_access_ttl),
           (v_tenant, sha256(convert_to(p_refresh, 'UTF8')), v_connection, 'refresh', now() + p_refresh_ttl);
    UPDATE card_mcp.oauth_clients SET last_used_at = now() WHERE client_id = p_client_id;
    RETURN 'ok';
END
$$;

-- A bearer access token: its tenant, connection and client, while it is unexpired and its connection is not
-- revoked. Records the connection's use at most once a minute.
CREATE FUNCTION card_mcp.oauth_access_lookup(p_token text)
    RETURNS TABLE (tenant_id uuid, connection_id uuid, client_id text, resource text, scopes text[],
                   expires_at timestamptz)
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH found AS (
        SELECT t.tenant_id, t.connection_id, k.client_id, k.resource, k.scopes, t.expires_at, k.last_used_at
          FROM card_mcp.oauth_tokens AS t
          JOIN card_mcp.oauth_connections AS k USING (tenant_id, connection_id)
         WHERE t.token_hash = sha256(convert_to(p_token, 'UTF8')) AND t.kind = 'access'
           AND t.expires_at > now() AND k.revoked_at IS NULL
    ), touched AS (
        UPDATE card_mcp.oauth_connections AS k SET last_used_at = now()
          FROM found AS f
         WHERE k.tenant_id = f.tenant_id AND k.connection_id = f.connection_id
           AND (f.last_used_at IS NULL OR f.last_used_at < now() - interval '1 minute')
    )
    SELECT f.tenant_id, f.connection_id, f.client_id, f.resource, f.scopes, f.expires_at FROM found AS f
$$;

-- RFC 7009: revoking either token of a connection revokes the connection (both tokens), if it is this client's.
CREATE FUNCTION card_mcp.oauth_revoke_token(p_client_id text, p_token text)
    RETURNS void
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE card_mcp.oauth_connections AS k SET revoked_at = coalesce(k.revoked_at, now())
      FROM card_mcp.oauth_tokens AS t
     WHERE t.token_hash = sha256(convert_to(p_token, 'UTF8'))
       AND k.tenant_id = t.tenant_id AND k.connection_id = t.connection_id AND k.client_id = p_client_id
$$;

-- `card-mcp connections revoke`: only ever takes access away.
CREATE FUNCTION card_mcp.oauth_revoke_connection(p_connection_id uuid)
    RETURNS timestamptz
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    UPDATE card_mcp.oauth_connections SET revoked_at = coalesce(revoked_at, now())
     WHERE connection_id = p_connection_id
    RETURNING revoked_at
$$;

-- `card-mcp connect --tenant NAME`: a one-time connect code. The owner's alone (not granted to the admin role,
-- which would otherwise sign in to any tenant with codes it made itself).
CREATE FUNCTION card_mcp.oauth_connect_code_create(p_tenant_id uuid, p_code text, p_ttl interval)
    RETURNS timestamptz
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    DELETE FROM card_mcp.connect_codes WHERE expires_at < now() - interval '1 day';
    INSERT INTO card_mcp.connect_codes (tenant_id, code_hash, expires_at)
    VALUES (p_tenant_id, sha256(convert_to(p_code, 'UTF8')), now() + p_ttl)
    RETURNING expires_at;
$$;

REVOKE ALL ON FUNCTION card_mcp.oauth_register_client(text, jsonb, text, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_request_create(text, text, jsonb, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_request_get(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_sign_in(text, text, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_decide(text, text, boolean, text, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_code_lookup(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_refresh_lookup(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_issue(text, text, text, text, text, interval, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_access_lookup(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_revoke_token(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_revoke_connection(uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.oauth_connect_code_create(uuid, text, interval) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_register_client(text, jsonb, text, integer, interval) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_request_create(text, text, jsonb, interval) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_request_get(text, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_sign_in(text, text, uuid, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_decide(text, text, boolean, text, interval) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_code_lookup(text, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_refresh_lookup(text, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_issue(text, text, text, text, text, interval, interval) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_access_lookup(text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_revoke_token(text, text) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.oauth_revoke_connection(uuid) TO card_mcp_admin;

-- Usage rows of OAuth calls name the connection and the registered client (SPEC section 5, like api_key_id).
-- The functions of 0005 keep their signatures; these overloads take the two more values.
ALTER TABLE card_mcp.card_usage ADD COLUMN connection_id uuid, ADD COLUMN oauth_client_id text;

CREATE FUNCTION card_mcp.record_call(
    p_tenant_id uuid, p_tool text, p_status text, p_error_code text, p_card_ids uuid[], p_duration_ms double precision,
    p_client_name text, p_client_version text, p_transport text, p_api_key_id uuid,
    p_connection_id uuid, p_oauth_client_id text
) RETURNS void
    LANGUAGE plpgsql
    SECURITY INVOKER
AS $$
BEGIN
    INSERT INTO card_mcp.card_usage
           (tenant_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport,
            api_key_id, connection_id, oauth_client_id)
    VALUES (p_tenant_id, p_tool, p_status, p_error_code, p_card_ids, p_duration_ms, p_client_name,
            p_client_version, p_transport, p_api_key_id, p_connection_id, p_oauth_client_id);
END
$$;

CREATE FUNCTION card_mcp.record_call_alone(
    p_tenant_id uuid, p_tool text, p_status text, p_error_code text, p_card_ids uuid[], p_duration_ms double precision,
    p_client_name text, p_client_version text, p_transport text, p_api_key_id uuid,
    p_connection_id uuid, p_oauth_client_id text
) RETURNS void
    LANGUAGE plpgsql
    SECURITY INVOKER
AS $$
BEGIN
    PERFORM pg_catalog.set_config('app.current_tenant_id', p_tenant_id::text, true);
    PERFORM card_mcp.record_call(p_tenant_id, p_tool, p_status, p_error_code, p_card_ids, p_duration_ms,
                                 p_client_name, p_client_version, p_transport, p_api_key_id,
                                 p_connection_id, p_oauth_client_id);
END
$$;

CREATE FUNCTION card_mcp.get_card_call(
    p_tenant_id uuid, p_card_id uuid, p_tool text, p_client_name text, p_client_version text, p_transport text,
    p_api_key_id uuid, p_elapsed_ms double precision, p_connection_id uuid, p_oauth_client_id text
) RETURNS TABLE (
    id uuid, card_type text, title text, content jsonb, tags text[], version integer, content_hash text,
    created_at timestamptz, updated_at timestamptz
)
    LANGUAGE plpgsql
    SECURITY INVOKER
AS $$
DECLARE
    found_card boolean;
BEGIN
    PERFORM pg_catalog.set_config('app.current_tenant_id', p_tenant_id::text, true),
            pg_catalog.set_config('synchronous_commit', 'off', true);
    RETURN QUERY
        SELECT c.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at
          FROM card_mcp.cards AS c
         WHERE c.id = p_card_id AND c.is_active;
    found_card := FOUND;
    PERFORM card_mcp.record_call(
        p_tenant_id, p_tool,
        CASE WHEN found_card THEN 'ok' ELSE 'error' END,
        CASE WHEN found_card THEN NULL ELSE 'not_found' END,
        CASE WHEN found_card THEN ARRAY[p_card_id] ELSE '{}'::uuid[] END,
        p_elapsed_ms + 1000 * extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()),
        p_client_name, p_client_version, p_transport, p_api_key_id, p_connection_id, p_oauth_client_id
    );
END
$$;

REVOKE ALL ON FUNCTION card_mcp.record_call(uuid, text, text, text, uuid[], double precision, text, text, text, uuid,
    uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.record_call_alone(uuid, text, text, text, uuid[], double precision, text, text, text,
    uuid, uuid, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.get_card_call(uuid, uuid, text, text, text, text, uuid, double precision, uuid, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.record_call(uuid, text, text, text, uuid[], double precision, text, text, text,
    uuid, uuid, text) TO card_mcp_app;
GRANT EXECUTE ON FUNCTION card_mcp.record_call_alone(uuid, text, text, text, uuid[], double precision, text, text,
    text, uuid, uuid, text) TO card_mcp_app;
GRANT EXECUTE ON FUNCTION card_mcp.get_card_call(uuid, uuid, text, text, text, text, uuid, double precision, uuid,
    text) TO card_mcp_app;
