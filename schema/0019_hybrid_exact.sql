-- A hybrid search's database part, on a tenant whose vectors are all compared (issue #16, docs/benchmarks.md
-- "Hybrid latency"). On a 1,000-card tenant it took about 4 ms where a lexical page takes 1: the lexical ranking
-- itself was not the cost (card_mcp.search_cards scores every card with a word of the query in about the time it
-- takes to score the first 11: its cost is the query's parse and typo lookups, not the cards), but
-- - its statement was planned on every call (plan_cache_mode = force_custom_plan, 0015): about 1 ms of planning a
--   statement of seven parts. Its generic plan had been slower still (0015: 15 against 111-141 ms), because it
--   matched the candidates to the tenant's cards by a nested loop over every active card (a generic plan cannot
--   tell how many cards a type filter keeps, and guessed three);
-- - the words were counted (n) by a statement of their own.
-- Now a tenant of at most 5,000 vectors (search.EXACT_VECTORS) is searched by card_mcp.search_hybrid_exact, whose
-- statement keeps its generic plan (made once per session): the candidates are ranked from the postings and the
-- vectors alone, and the cards are then read in that order, one probe of the primary key each, until the page is
-- full (a lateral subquery, which no plan can turn into a scan of the tenant's cards). n is counted inside it. The
-- score, the candidates and every page are unchanged: the same expressions on the same values (every page of the
-- relevance set's queries, at limits 1, 3, 10 and 50, compared with 0016's, tests/test_semantic.py). A bigger
-- tenant's search is 0015's statement, unchanged.

-- One page of a tenant's hybrid search when every vector is compared (search_page's words and query vector, for a
-- tenant of at most 5,000 vectors), as (id, score, kept), best first: the hybrid score of 0015,
-- (S + 0.5 x c^4 + 0.1 x L) / 1.6, of every card with a word of the query or a vector above the floor.
CREATE FUNCTION card_mcp.search_hybrid_exact(
    p_words text, p_card_type text, p_tags text[], p_after_score double precision, p_after_id uuid, p_limit integer,
    p_max_bytes integer, p_vector text, p_model text, p_floor double precision, p_ceiling double precision,
    p_typos integer[]
) RETURNS TABLE (id uuid, score double precision, kept boolean)
    LANGUAGE plpgsql
    STABLE
    SECURITY INVOKER
    ROWS 11
    SET search_path = pg_catalog, card_mcp, pg_temp
    SET plan_cache_mode = force_generic_plan  -- planned once per session: planning cost more than the search
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
BEGIN
    RETURN QUERY
    WITH query AS MATERIALIZED (  -- the vector read from its text once; n, as card_mcp.search_cards counts its words
        SELECT p_vector::card_mcp.halfvec AS vector,
               (SELECT count(DISTINCT w.k) FROM card_mcp.search_words(p_words) AS w)::integer AS n
    ), lexical AS MATERIALIZED (
        SELECT s.id, s.score
          FROM card_mcp.search_cards(p_words, p_card_type, p_tags, NULL, NULL, NULL, p_typos) AS s
    ), vectors AS MATERIALIZED (  -- every vector above the floor
        SELECT a.id, a.similarity
          FROM (SELECT v.card_id AS id, 1 - (v.embedding OPERATOR(card_mcp.<=>) q.vector) AS similarity
                  FROM card_mcp.card_vectors AS v, query AS q
                 WHERE v.model = p_model
                OFFSET 0) AS a  -- not flattened: each similarity computed once, then compared
         WHERE a.similarity > p_floor
    ), fused AS (  -- S the similarity scaled to 0..1, c the share of the words the card has, L its lexical score
        SELECT k.id,
               ((least(greatest((k.similarity - p_floor) / (p_ceiling - p_floor), 0), 1)
                 + 0.5 * power(least(floor(k.lexical * (q.n + 1) + 1e-6), q.n) / greatest(q.n, 1), 4)
                 + 0.1 * k.lexical) / 1.6)::double precision AS score
          FROM (SELECT coalesce(l.id, x.id) AS id, coalesce(l.score, 0) AS lexical,
                       coalesce(x.similarity, p_floor) AS similarity
                  FROM lexical AS l
                  FULL JOIN vectors AS x ON x.id = l.id) AS k,
               query AS q
    ), ranked AS (  -- every candidate after the cursor, best first, before any card is read
        SELECT f.id, f.score
          FROM fused AS f
         WHERE p_after_score IS NULL OR (f.score, f.id) < (p_after_score, p_after_id)
         ORDER BY f.score DESC, f.id DESC
        OFFSET 0
    ), best AS (  -- the page's hits and one more, and their sizes: the cards read in that order until it is full
        SELECT r.id, r.score, c.bytes
          FROM ranked AS r
         CROSS JOIN LATERAL (  -- one probe of the primary key per card read (a deleted card's vector may remain)
               SELECT octet_length(c.content::text) + octet_length(c.title) + 300 AS bytes
                 FROM card_mcp.cards AS c
                WHERE c.tenant_id = v_tenant AND c.id = r.id AND c.is_active
                  AND (p_card_type IS NULL OR c.card_type = p_card_type)
                  AND (p_tags IS NULL OR c.tags @> p_tags)
               OFFSET 0) AS c  -- not flattened into a join the planner may hash
         ORDER BY r.score DESC, r.id DESC
         LIMIT p_limit + 1
    )
    SELECT h.id, h.score, h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes)
      FROM (SELECT b.id, b.score, row_number() OVER w AS n, sum(b.bytes) OVER w AS bytes
              FROM best AS b
            WINDOW w AS (ORDER BY b.score DESC, b.id DESC)) AS h
     ORDER BY h.n;
END
$$;
REVOKE ALL ON FUNCTION card_mcp.search_hybrid_exact(text, text, text[], double precision, uuid, integer, integer, text,
                                                     text, double precision, double precision, integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_hybrid_exact(text, text, text[], double precision, uuid, integer, integer,
                                                        text, text, double precision, double precision, integer[])
    TO card_mcp_app;

-- One page of a search, as in 0016, but for a hybrid search on a tenant of at most 5,000 vectors: the page of
-- card_mcp.search_hybrid_exact.
CREATE OR REPLACE FUNCTION card_mcp.search_page(
    p_words text, p_card_type text, p_tags text[], p_after_score double precision, p_after_updated timestamptz,
    p_after_id uuid, p_limit integer, p_max_bytes integer, p_vector text, p_model text, p_floor double precision,
    p_ceiling double precision, p_depth integer, p_typos integer[]
) RETURNS TABLE (id uuid, score double precision, kept boolean, typos integer[])
    LANGUAGE plpgsql
    SECURITY INVOKER
    ROWS 11
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
    v_typos integer[];  -- the words looked up as typos: pinned by the cursor, else decided now (and returned)
    v_n integer;        -- how many words card_mcp.search_cards searches (hybrid only)
BEGIN
    IF coalesce(p_words, '') <> '' THEN
        v_typos := coalesce(p_typos, card_mcp.search_typos(p_words));
    END IF;
    IF coalesce(p_words, '') = '' THEN
        RETURN QUERY
        SELECT h.id, 0::double precision,
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
          FROM (SELECT c.id, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM card_mcp.cards AS c
                 WHERE c.is_active
                   AND (p_card_type IS NULL OR c.card_type = p_card_type)
                   AND (p_tags IS NULL OR c.tags @> p_tags)
                   AND (p_after_updated IS NULL OR (c.updated_at, c.id) < (p_after_updated, p_after_id))
                WINDOW w AS (ORDER BY c.updated_at DESC, c.id DESC)
                 ORDER BY c.updated_at DESC, c.id DESC
                 LIMIT p_limit + 1) AS h
         ORDER BY h.n;
    ELSIF p_vector IS NULL THEN
        RETURN QUERY
        SELECT h.id, h.score,
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
          FROM (SELECT s.id, s.score, s.n, sum(c.bytes) OVER (ORDER BY s.n) AS bytes
                  FROM card_mcp.search_cards(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit + 1,
                                             v_typos)
                       WITH ORDINALITY AS s(id, score, n)
                 CROSS JOIN LATERAL (  -- a probe of the primary key per hit, never a scan of the tenant's cards
                       SELECT octet_length(c.content::text) + octet_length(c.title) + 300 AS bytes
                         FROM card_mcp.cards AS c
                        WHERE c.tenant_id = v_tenant AND c.id = s.id AND c.is_active
                        LIMIT 1) AS c) AS h
         ORDER BY h.n;
    ELSE
        -- A tenant of at most search.EXACT_VECTORS vectors (every vector compared): card_mcp.search_hybrid_exact.
        IF (SELECT count(*) <= 5000 FROM (SELECT FROM card_mcp.card_vectors LIMIT 5001) AS v) THEN
            RETURN QUERY
            SELECT h.id, h.score, h.kept, v_typos
              FROM card_mcp.search_hybrid_exact(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit,
                                                p_max_bytes, p_vector, p_model, p_floor, p_ceiling, v_typos)
                   WITH ORDINALITY AS h(id, score, kept, n)
             ORDER BY h.n;  -- its rows in the order it returned them, in so many words, as every branch
            RETURN;
        END IF;
        -- A bigger tenant: its nearest vectors through the HNSW index, as in 0015 (this statement's "few" is false).
        -- As card_mcp.search_cards counts them: the query's first 16 distinct words, less the stop words.
        SELECT count(DISTINCT w.k) INTO v_n FROM card_mcp.search_words(p_words) AS w;
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '100', true),
                set_config('hnsw.max_scan_tuples', '2147483647', true),
                set_config('plan_cache_mode', 'force_custom_plan', true);
        RETURN QUERY
        WITH query AS MATERIALIZED (  -- the vector read from its text once, not once per row compared
            SELECT p_vector::card_mcp.halfvec AS vector
        ), lexical AS MATERIALIZED (
            SELECT s.id, s.score
              FROM card_mcp.search_cards(p_words, p_card_type, p_tags, NULL, NULL, NULL, v_typos) AS s
        ), few AS MATERIALIZED (
            SELECT count(*) <= 5000 AS yes FROM (SELECT FROM card_mcp.card_vectors LIMIT 5001) AS v
        ), vectors AS MATERIALIZED (  -- cards above the floor, and their similarity, each computed once
            SELECT v.card_id AS id, 1 - (v.embedding OPERATOR(card_mcp.<=>) q.vector) AS similarity
              FROM card_mcp.card_vectors AS v, query AS q
             WHERE (SELECT f.yes FROM few AS f) AND v.model = p_model
               AND 1 - (v.embedding OPERATOR(card_mcp.<=>) q.vector) > p_floor
            UNION ALL
            SELECT n.id, n.similarity
              FROM (SELECT c.id, 1 - (v.embedding OPERATOR(card_mcp.<=>) q.vector) AS similarity
                      FROM query AS q, card_mcp.card_vectors AS v
                      JOIN card_mcp.cards AS c ON c.tenant_id = v.tenant_id AND c.id = v.card_id
                     WHERE NOT (SELECT f.yes FROM few AS f) AND c.is_active AND v.model = p_model
                       AND (p_card_type IS NULL OR c.card_type = p_card_type)
                       AND (p_tags IS NULL OR c.tags @> p_tags)
                     ORDER BY v.embedding OPERATOR(card_mcp.<=>) q.vector
                     LIMIT p_depth) AS n
             WHERE n.similarity > p_floor
        ), candidates AS (  -- every lexical match and every vector above the floor, with both signals
            SELECT coalesce(l.id, x.id) AS id, coalesce(l.score, 0) AS lexical,
                   coalesce(x.similarity,
                            -- a lexical match not among a big tenant's nearest may still be above the floor; in a
                            -- small tenant every vector above it is in x already
                            CASE WHEN NOT (SELECT f.yes FROM few AS f)
                                 THEN (SELECT 1 - (v.embedding OPERATOR(card_mcp.<=>) q.vector)
                                         FROM card_mcp.card_vectors AS v, query AS q
                                        WHERE v.tenant_id = v_tenant AND v.card_id = l.id AND v.model = p_model) END,
                            p_floor) AS similarity
              FROM lexical AS l
              FULL JOIN vectors AS x ON x.id = l.id
        ), fused AS (  -- S the similarity scaled to 0..1, c the share of the words the card has, L its lexical score
            SELECT k.id,
                   ((least(greatest((k.similarity - p_floor) / (p_ceiling - p_floor), 0), 1)
                     + 0.5 * power(least(floor(k.lexical * (v_n + 1) + 1e-6), v_n) / greatest(v_n, 1), 4)
                     + 0.1 * k.lexical) / 1.6)::double precision AS score
              FROM candidates AS k
        ), best AS (  -- the page's hits and one more, before their sizes are read
            SELECT f.id, f.score
              FROM fused AS f
              JOIN card_mcp.cards AS c ON c.tenant_id = v_tenant AND c.id = f.id
             WHERE c.is_active AND (p_after_score IS NULL OR (f.score, f.id) < (p_after_score, p_after_id))
               AND (p_card_type IS NULL OR c.card_type = p_card_type)
               AND (p_tags IS NULL OR c.tags @> p_tags)
             ORDER BY f.score DESC, f.id DESC
             LIMIT p_limit + 1
        )
        SELECT h.id, h.score,
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
          FROM (SELECT b.id, b.score, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM best AS b
                  JOIN card_mcp.cards AS c ON c.tenant_id = v_tenant AND c.id = b.id
                WINDOW w AS (ORDER BY b.score DESC, b.id DESC)) AS h
         ORDER BY h.n;
    END IF;
END
$$;
