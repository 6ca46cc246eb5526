-- requires extension: vector 0.8.0
--
-- Semantic search (the optional `semantic` extra): one embedding per active card, in pgvector, beside the model
-- that made it and the card version it embeds; and a queue of cards to embed, filled by triggers in the writing
-- transaction, drained by a background worker through the admin role. card-mcp applies this file only where the
-- vector extension is installed (or can be: the embedded PostgreSQL creates it as its superuser), records it as
-- applied only then, and tries again on every later start; without it, search is lexical and nothing else changes.
-- pgvector 0.8.0 or newer: halfvec (0.7) and iterative index scans (0.8).

CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA card_mcp;

-- One row per card: the newest embedding of it. A card's vector is current while card_version equals the card's
-- version and model the model in use; older ones are still searched until the worker replaces them.
CREATE TABLE card_mcp.card_vectors (
    tenant_id     uuid NOT NULL,
    card_id       uuid NOT NULL,
    model         text NOT NULL,
    card_version  integer NOT NULL,
    embedding     card_mcp.halfvec(384) NOT NULL,
    embedded_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT card_vectors_pkey PRIMARY KEY (tenant_id, card_id),
    CONSTRAINT card_vectors_card_fkey FOREIGN KEY (tenant_id, card_id)
        REFERENCES card_mcp.cards (tenant_id, id) ON DELETE CASCADE
);

-- Nearest cards by cosine distance. One index over every tenant: row-level security filters the index scan's
-- rows, and hnsw.iterative_scan (set by the search) keeps the scan going until a tenant's page is full.
CREATE INDEX card_vectors_embedding_idx ON card_mcp.card_vectors
    USING hnsw (embedding card_mcp.halfvec_cosine_ops);

-- Cards waiting for an embedding. Rows are written by the triggers below as the writing role (the application
-- role, under its tenant policy) and taken by the worker (the admin role) with FOR UPDATE SKIP LOCKED. No NOTIFY:
-- it would serialize every writer's commit on a database-wide lock; the worker looks every second instead.
CREATE TABLE card_mcp.embedding_queue (
    tenant_id  uuid NOT NULL,
    card_id    uuid NOT NULL,
    queued_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT embedding_queue_pkey PRIMARY KEY (tenant_id, card_id),
    CONSTRAINT embedding_queue_card_fkey FOREIGN KEY (tenant_id, card_id)
        REFERENCES card_mcp.cards (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX embedding_queue_queued_at_idx ON card_mcp.embedding_queue (queued_at);

ALTER TABLE card_mcp.card_vectors ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.card_vectors FORCE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.embedding_queue ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.embedding_queue FORCE ROW LEVEL SECURITY;

CREATE POLICY card_vectors_current ON card_mcp.card_vectors FOR SELECT
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY card_vectors_admin ON card_mcp.card_vectors FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);
CREATE POLICY embedding_queue_current ON card_mcp.embedding_queue FOR ALL
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY embedding_queue_admin ON card_mcp.embedding_queue FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);

GRANT SELECT ON card_mcp.card_vectors TO card_mcp_app;
GRANT SELECT, INSERT ON card_mcp.embedding_queue TO card_mcp_app;  -- ON CONFLICT reads the row it meets
GRANT SELECT, INSERT, UPDATE, DELETE ON card_mcp.card_vectors TO card_mcp_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON card_mcp.embedding_queue TO card_mcp_admin;  -- UPDATE: FOR UPDATE

-- Queue what a statement created, or changed in what is embedded (title, tags, content), once per statement.
-- SECURITY INVOKER: the rows go in under the writer's own policy (the tenant's cards only).
CREATE FUNCTION card_mcp.queue_inserted_cards() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
    SELECT n.id, n.tenant_id FROM new_cards AS n WHERE n.is_active
    ON CONFLICT (tenant_id, card_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE FUNCTION card_mcp.queue_updated_cards() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.embedding_queue (card_id, tenant_id)
    SELECT n.id, n.tenant_id
      FROM new_cards AS n JOIN old_cards AS o ON o.id = n.id
     WHERE n.is_active AND (n.title, n.tags, n.content) IS DISTINCT FROM (o.title, o.tags, o.content)
    ON CONFLICT (tenant_id, card_id) DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER cards_queue_inserted AFTER INSERT ON card_mcp.cards
    REFERENCING NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.queue_inserted_cards();
CREATE TRIGGER cards_queue_updated AFTER UPDATE ON card_mcp.cards
    REFERENCING OLD TABLE AS old_cards NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.queue_updated_cards();
