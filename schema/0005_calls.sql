-- Tool calls in fewer round trips. Each statement and its answer cost a round trip; a read of one card is now a
-- single statement (card_mcp.get_card_call sets the tenant, reads and records in one implicit transaction), and
-- so is the usage row of a failed call (card_mcp.record_call_alone). Values always arrive as bind parameters.

-- The one way a usage row is written (SPEC section 5), from Python and from the functions below.
CREATE FUNCTION card_mcp.record_call(
    p_tenant_id uuid,
    p_tool text,
    p_status text,
    p_error_code text,
    p_card_ids uuid[],
    p_duration_ms double precision,
    p_client_name text,
    p_client_version text,
    p_transport text,
    p_api_key_id uuid
) RETURNS void
    LANGUAGE plpgsql  -- not sql: PL/pgSQL keeps the INSERT's plan for the session (PostgreSQL 15 would re-plan it)
    SECURITY INVOKER
AS $$
BEGIN
    INSERT INTO card_mcp.card_usage
           (tenant_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport,
            api_key_id)
    VALUES (p_tenant_id, p_tool, p_status, p_error_code, p_card_ids, p_duration_ms, p_client_name,
            p_client_version, p_transport, p_api_key_id);
END
$$;

-- get_card (and the card:// resource) as one statement: the tenant set transaction-locally first, so every
-- statement after it runs under the caller's row-level security for that tenant; the active card (no row when
-- there is none for this tenant); its usage row, `ok` with the card's id or `not_found`, committed with the
-- statement. SECURITY INVOKER: the caller's policies apply, as to any tool query. The call only reads, so its
-- commit does not wait for the WAL flush (synchronous_commit off, for this transaction only): a crash of the
-- database itself can lose the newest usage rows of reads, never a card or an acknowledged write.
-- p_elapsed_ms is the call's time before this statement; the statement adds its own.
CREATE FUNCTION card_mcp.get_card_call(
    p_tenant_id uuid,
    p_card_id uuid,
    p_tool text,
    p_client_name text,
    p_client_version text,
    p_transport text,
    p_api_key_id uuid,
    p_elapsed_ms double precision
) RETURNS TABLE (
    id uuid,
    card_type text,
    title text,
    content jsonb,
    tags text[],
    version integer,
    content_hash text,
    created_at timestamptz,
    updated_at timestamptz
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
        p_tenant_id,
        p_tool,
        CASE WHEN found_card THEN 'ok' ELSE 'error' END,
        CASE WHEN found_card THEN NULL ELSE 'not_found' END,
        CASE WHEN found_card THEN ARRAY[p_card_id] ELSE '{}'::uuid[] END,
        p_elapsed_ms + 1000 * extract(epoch FROM pg_catalog.clock_timestamp() - pg_catalog.statement_timestamp()),
        p_client_name,
        p_client_version,
        p_transport,
        p_api_key_id
    );
END
$$;

-- The usage row of a call that wrote nothing (a failed call, after its rollback), as one statement: sets the tenant
-- transaction-locally, then records; the implicit transaction commits it.
CREATE FUNCTION card_mcp.record_call_alone(
    p_tenant_id uuid,
    p_tool text,
    p_status text,
    p_error_code text,
    p_card_ids uuid[],
    p_duration_ms double precision,
    p_client_name text,
    p_client_version text,
    p_transport text,
    p_api_key_id uuid
) RETURNS void
    LANGUAGE plpgsql
    SECURITY INVOKER
AS $$
BEGIN
    PERFORM pg_catalog.set_config('app.current_tenant_id', p_tenant_id::text, true);
    PERFORM card_mcp.record_call(p_tenant_id, p_tool, p_status, p_error_code, p_card_ids, p_duration_ms,
                                 p_client_name, p_client_version, p_transport, p_api_key_id);
END
$$;

REVOKE ALL ON FUNCTION card_mcp.record_call(uuid, text, text, text, uuid[], double precision, text, text, text, uuid)
    FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.record_call_alone(uuid, text, text, text, uuid[], double precision, text, text, text,
    uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.record_call_alone(uuid, text, text, text, uuid[], double precision, text, text,
    text, uuid) TO card_mcp_app;
REVOKE ALL ON FUNCTION card_mcp.get_card_call(uuid, uuid, text, text, text, text, uuid, double precision) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.record_call(uuid, text, text, text, uuid[], double precision, text, text, text, uuid)
    TO card_mcp_app;
GRANT EXECUTE ON FUNCTION card_mcp.get_card_call(uuid, uuid, text, text, text, text, uuid, double precision)
    TO card_mcp_app;

-- HTTP servers keep a verified API key for a short while instead of looking it up on every request (a round trip
-- on the admin pool), and forget it the moment it is revoked: a revocation (or a deleted key) is announced on
-- channel card_mcp_api_keys with the key's id, which the servers LISTEN to (card_mcp/keys.py). A server caches
-- keys only while it has proven that it receives these notifications.
CREATE FUNCTION card_mcp.announce_api_key_change() RETURNS trigger
    LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'DELETE' OR NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        PERFORM pg_catalog.pg_notify('card_mcp_api_keys', OLD.key_id::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_keys_announce_change
    AFTER UPDATE OR DELETE ON card_mcp.api_keys
    FOR EACH ROW EXECUTE FUNCTION card_mcp.announce_api_key_change();

-- A retried batch is answered before its 1000 cards are validated again: the stored answer is found by the key
-- and the hash of the arguments exactly as they were sent (keys sorted), which only a request that was valid and
-- answered can have. Any other request takes the full path, where request_hash (over the validated cards)
-- decides between a replay and idempotency_conflict, as before.
ALTER TABLE card_mcp.idempotency_store ADD COLUMN arguments_hash text;
