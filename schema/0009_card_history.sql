-- Card history (issue #21): every change of a card kept as a version row, written in the same transaction as the
-- change by statement-level triggers on card_mcp.cards. Whatever writes cards (a tool's INSERT or UPDATE, the
-- batch's bulk INSERT, a COPY, a future import) writes its versions with it, one INSERT per statement, through the
-- transition tables: no code path can forget them, and a 1000-card statement costs one more INSERT, not 1000.
--
-- Who made the change comes from the transaction-local setting card_mcp.actor (JSON), which the call edge sets in
-- the statement that sets the tenant (db.begin: no extra round trip): {transport, api_key_id, connection_id,
-- oauth_client_id, client_name, client_version}. A write with no actor set (psql as the owner, a script) is
-- recorded as transport 'database' with the session's role. card_mcp.version_op names the operation of writes
-- that are not what they look like ('import' for an import's INSERTs); card_mcp.restored_from marks a restore to
-- an older version. Both are transaction-local too.
--
-- A card's version counts every change now, delete and restore included, so (card, version) names one history
-- entry. Versions are never changed; the application role may only add and read them, and old ones are removed
-- only by card_mcp.prune_card_versions (CARD_MCP_HISTORY_KEEP_VERSIONS), through the admin role.

CREATE TABLE card_mcp.card_versions (
    tenant_id       uuid        NOT NULL,
    card_id         uuid        NOT NULL,
    version         integer     NOT NULL,
    op              text        NOT NULL,
    card_type       text        NOT NULL,
    title           text        NOT NULL,
    content         jsonb       NOT NULL,
    tags            text[]      NOT NULL,
    content_hash    text        NOT NULL,
    is_active       boolean     NOT NULL,
    restored_from   integer,
    changed_at      timestamptz NOT NULL DEFAULT now(),
    transport       text        NOT NULL,
    api_key_id      uuid,
    connection_id   uuid,
    oauth_client_id text,
    client_name     text,
    client_version  text,
    db_role         text        NOT NULL DEFAULT session_user,
    -- No foreign key to cards: a version row is only ever made from its card's row, in the statement that wrote
    -- it, and a referential check per row would cost the 1000-card batch a thousand index probes.
    CONSTRAINT card_versions_pkey PRIMARY KEY (tenant_id, card_id, version),
    CONSTRAINT card_versions_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT card_versions_op_valid CHECK (op IN ('create', 'update', 'delete', 'restore', 'import')),
    CONSTRAINT card_versions_transport_valid CHECK (transport IN ('stdio', 'http', 'memory', 'cli', 'database'))
);

ALTER TABLE card_mcp.card_versions ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.card_versions FORCE ROW LEVEL SECURITY;

-- The application role adds and reads its tenant's versions; no UPDATE or DELETE policy, no such grant.
CREATE POLICY card_versions_current ON card_mcp.card_versions FOR SELECT TO card_mcp_app
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY card_versions_current_insert ON card_mcp.card_versions FOR INSERT TO card_mcp_app
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
-- The admin role (card-mcp history, across tenants), the analyst and a tenant's readers read, like cards.
CREATE POLICY card_versions_admin ON card_mcp.card_versions FOR SELECT TO card_mcp_admin USING (true);
CREATE POLICY card_versions_analyst ON card_mcp.card_versions FOR SELECT TO card_mcp_analyst USING (true);
CREATE POLICY card_versions_reader ON card_mcp.card_versions FOR SELECT TO card_mcp_reader
    USING (tenant_id = (SELECT r.tenant_id FROM card_mcp.readers AS r WHERE r.role_name = current_user::text));

GRANT SELECT, INSERT ON card_mcp.card_versions TO card_mcp_app;
GRANT SELECT ON card_mcp.card_versions TO card_mcp_admin, card_mcp_analyst, card_mcp_reader;

-- The version rows of a statement's cards. SECURITY INVOKER: they go in under the writer's own policy (its tenant
-- only). The actor is read once per statement.
CREATE FUNCTION card_mcp.keep_inserted_versions() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    actor jsonb := NULLIF(current_setting('card_mcp.actor', true), '')::jsonb;
BEGIN
    INSERT INTO card_mcp.card_versions
           (tenant_id, card_id, version, op, card_type, title, content, tags, content_hash, is_active, transport,
            api_key_id, connection_id, oauth_client_id, client_name, client_version)
    SELECT n.tenant_id, n.id, n.version, COALESCE(NULLIF(current_setting('card_mcp.version_op', true), ''), 'create'),
           n.card_type, n.title, n.content, n.tags, n.content_hash, n.is_active,
           COALESCE(actor->>'transport', 'database'), (actor->>'api_key_id')::uuid, (actor->>'connection_id')::uuid,
           actor->>'oauth_client_id', actor->>'client_name', actor->>'client_version'
      FROM new_cards AS n;
    RETURN NULL;
END
$$;

-- Only rows that changed: an UPDATE that rewrites a card as it was adds nothing. A change that does not count the
-- version up fails on the primary key: every change is a version, or the statement does not happen.
CREATE FUNCTION card_mcp.keep_updated_versions() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    actor jsonb := NULLIF(current_setting('card_mcp.actor', true), '')::jsonb;
    restored integer := NULLIF(current_setting('card_mcp.restored_from', true), '')::integer;
BEGIN
    INSERT INTO card_mcp.card_versions
           (tenant_id, card_id, version, op, card_type, title, content, tags, content_hash, is_active, restored_from,
            transport, api_key_id, connection_id, oauth_client_id, client_name, client_version)
    SELECT n.tenant_id, n.id, n.version,
           CASE WHEN o.is_active AND NOT n.is_active THEN 'delete'
                WHEN restored IS NOT NULL OR (n.is_active AND NOT o.is_active) THEN 'restore'
                ELSE COALESCE(NULLIF(current_setting('card_mcp.version_op', true), ''), 'update') END,
           n.card_type, n.title, n.content, n.tags, n.content_hash, n.is_active, restored,
           COALESCE(actor->>'transport', 'database'), (actor->>'api_key_id')::uuid, (actor->>'connection_id')::uuid,
           actor->>'oauth_client_id', actor->>'client_name', actor->>'client_version'
      FROM new_cards AS n JOIN old_cards AS o ON o.tenant_id = n.tenant_id AND o.id = n.id
     WHERE (n.version, n.card_type, n.title, n.tags, n.content_hash, n.is_active)
           IS DISTINCT FROM (o.version, o.card_type, o.title, o.tags, o.content_hash, o.is_active);
    RETURN NULL;
END
$$;

CREATE TRIGGER cards_keep_inserted_versions AFTER INSERT ON card_mcp.cards
    REFERENCING NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.keep_inserted_versions();
CREATE TRIGGER cards_keep_updated_versions AFTER UPDATE ON card_mcp.cards
    REFERENCING OLD TABLE AS old_cards NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.keep_updated_versions();

-- The owner (whoever migrates; FORCE binds it too) writes the rows below and prunes (prune_card_versions).
CREATE POLICY card_versions_owner ON card_mcp.card_versions FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);

-- The cards that exist already get their present state as a version row (op 'import', transport 'database'), so
-- every card has a history to restore from.
INSERT INTO card_mcp.card_versions
       (tenant_id, card_id, version, op, card_type, title, content, tags, content_hash, is_active, transport)
SELECT c.tenant_id, c.id, c.version, 'import', c.card_type, c.title, c.content, c.tags, c.content_hash, c.is_active,
       'database'
  FROM card_mcp.cards AS c;

-- The label of an API key of the caller's tenant, for history entries (the application role cannot read api_keys;
-- the admin role passes the tenant of the entry it reads). NULL for any other key.
CREATE FUNCTION card_mcp.api_key_label(p_tenant_id uuid, p_key_id uuid) RETURNS text
    LANGUAGE sql STABLE
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    SELECT k.label
      FROM card_mcp.api_keys AS k
     WHERE k.tenant_id = p_tenant_id AND k.key_id = p_key_id
       AND (p_tenant_id = NULLIF(current_setting('app.current_tenant_id', true), '')::uuid
            OR pg_has_role(session_user, 'card_mcp_admin', 'MEMBER'))
$$;

-- Retention (CARD_MCP_HISTORY_KEEP_VERSIONS): keep the newest p_keep versions of every card, remove the older
-- ones; returns how many. Narrow: it removes only versions past the newest p_keep of their card.
CREATE FUNCTION card_mcp.prune_card_versions(p_keep integer) RETURNS bigint
    LANGUAGE sql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
    WITH gone AS (
        DELETE FROM card_mcp.card_versions AS v
         USING (SELECT tenant_id, card_id, max(version) - GREATEST(p_keep, 1) AS below
                  FROM card_mcp.card_versions
                 GROUP BY tenant_id, card_id) AS k
         WHERE v.tenant_id = k.tenant_id AND v.card_id = k.card_id AND v.version <= k.below
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;

REVOKE ALL ON FUNCTION card_mcp.keep_inserted_versions() FROM PUBLIC;  -- triggers need no EXECUTE to fire
REVOKE ALL ON FUNCTION card_mcp.keep_updated_versions() FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.api_key_label(uuid, uuid) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.prune_card_versions(integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.api_key_label(uuid, uuid) TO card_mcp_app, card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.prune_card_versions(integer) TO card_mcp_admin;

-- Semantic search (0006, where pgvector is): a deleted card's vector is removed by the embedding worker, so an
-- undeleted card is queued again, as a changed one is. (Where 0006 comes later, the worker's periodic sweep
-- queues it instead.)
DO $$
BEGIN
    IF to_regprocedure('card_mcp.queue_updated_cards()') IS NOT NULL THEN
        CREATE OR REPLACE FUNCTION card_mcp.queue_updated_cards() RETURNS trigger
            LANGUAGE plpgsql SECURITY INVOKER
            SET search_path = pg_catalog, card_mcp, pg_temp
        AS $fn$
        BEGIN
            INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
            SELECT n.id, n.tenant_id
              FROM new_cards AS n JOIN old_cards AS o ON o.id = n.id
             WHERE n.is_active
               AND (NOT o.is_active OR (n.title, n.tags, n.content) IS DISTINCT FROM (o.title, o.tags, o.content))
            ON CONFLICT (tenant_id, card_id) DO NOTHING;
            RETURN NULL;
        END
        $fn$;
    END IF;
END
$$;
