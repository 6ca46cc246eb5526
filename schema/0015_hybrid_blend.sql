-- Hybrid ranking that generalizes (issue #16): a strong vector match may outrank a card with one more common word,
-- while a card that has every word of the query keeps the lead lexical search gives it.
--
-- Before (0011), a hybrid score was 0.2 x the lexical score + 0.8 x the scaled vector similarity. The lexical score
-- comes in tiers, e/(n+1) and up, e being how many of the n searched words a card has, so each extra common word
-- ("people", "customers") a card shared with a long paraphrase was worth about as much as the gap between the
-- model's first and fifth card; and a card with every word of a short query could still lose to one the model liked
-- a little better (deep-content and natural queries, tuned half). Now, with S the vector similarity scaled from the
-- model's floor to its ceiling (0..1), L the lexical score and c = e/n the share of the words the card has:
--   score = (S + 0.5 x c^4 + 0.1 x L) / 1.6
-- c^4 is about nothing for a card with a few of many words (3 of 8: 0.02), and a clear lead for a card with all of
-- them (1) or all but one of several (4 of 5: 0.41); L keeps the order lexical search gives within a share (title
-- before content, typos' similarity). Chosen on the tuned half of tests/data/relevance.json only (every variant
-- tried, and its figures, in docs/benchmarks.md); both held-out parts are reported, never tuned on. Still a
-- function of the query and the card alone: keyset paging on (score, id) never serves a card twice.
--
-- e is read back from L: card_mcp.search_cards scores a card in [e/(n+1), (e+1)/(n+1)), and n is counted here as it
-- counts the words it searches (card_mcp.search_words, 0014).
--
-- And a hybrid search's database part, on a 1,000-card tenant (docs/benchmarks.md, "Hybrid latency"):
-- - the query vector is read from its text once (it was cast from text for every vector compared, and again for
--   every candidate: about 50 ms for 1,000 vectors), and each similarity is computed once;
-- - the page's sizes are read for its hits only, not for every candidate;
-- - a hybrid search plans each statement for the call's own values (plan_cache_mode = force_custom_plan, set for
--   the hybrid branch only): after five calls on a connection PostgreSQL may keep a generic plan, which took the
--   hybrid statement from 15 to 111-141 ms at p50. Not for the lexical page: on 0014's postings the generic plan is
--   the faster one (1,000,000 cards, a 1,000-card tenant: p50 2.9 against 5.4 ms, p95 5.2 against 19.7 ms; the
--   100,000-card tenant: p50 23.7 against 34.9 ms), planning each call costing more than it saves.

-- One page of a search, as (id, score, kept, typos), best first, as in 0014 (whose description holds but for the
-- hybrid score): words and a query vector: (S + 0.5 x c^4 + 0.1 x L) / 1.6, in [0, 1], as above.
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
          FROM (SELECT s.id, s.score, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM card_mcp.search_cards(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit + 1,
                                             v_typos)
                       AS s
                  JOIN card_mcp.cards AS c ON c.tenant_id = v_tenant AND c.id = s.id
                 WHERE c.is_active
                WINDOW w AS (ORDER BY s.score DESC, s.id DESC)) AS h
         ORDER BY h.n;
    ELSE
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
