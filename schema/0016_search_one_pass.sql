-- Search that reads only the tiers a page can come from, in one aggregate, with plans made once (issue #16).
--
-- card_mcp.search_cards (0014) read every posting of every searched word and of every lexeme like a typo word, and
-- scored every card they named in three aggregates: per (card, word) for the words it has, per (card, word) again
-- with the typo lookups' rows, then per card. On a 100,000-card tenant a long query reads 20,000-50,000 postings of
-- the words and as many of the typo lookups. Now:
-- - One aggregate per card for the words it has: which of them is a bit set (word k is bit k; e is the number of
--   bits set), and w the plain sum of those postings' weights (the same sum as per word, then per card).
-- - The fewest words a card of the page can have: a card with e of the n words scores in [e/(n+1), (e+1)/(n+1)),
--   below every card with more, so once p_limit cards (that the cursor lets through) have e words or more, the cards
--   with fewer are not scored further and the typo lookups' postings are kept only for the cards that can still
--   make the page. Past a cursor, the cards in its own tier may come before or after it, so only lower tiers
--   count. With a type or tags filter every card is scored, as before (only the card can tell whether it passes).
-- - The typo lookups' postings are grouped per (card, word) for their best similarity and summed into f in the same
--   per-card aggregate; a word the card has is not also one it resembles (a cursor's pin can make a word a typo
--   after a card with it arrived: only then is f summed again for the card, without those words).
-- The score is unchanged, and so is every page: (e + 0.5 x f / n + 0.5 x w / (w + 1)) / (n + 1), summed in double
-- precision (exact for these float4 values, so the same in any row order).
--
-- And the plans: search_cards's statements are planned once per session (plan_cache_mode = force_generic_plan).
-- PostgreSQL chose a custom plan, made again on every call, because it priced the generic one higher: its join of
-- the words to their postings could hash the tenant's every posting (a generic plan does not know how many a word
-- has). Each word's range is now a lateral subquery the planner cannot flatten into such a join, so the generic
-- plan reads the same index ranges, and planning no longer costs every search about 0.5 ms.
--
-- And card_mcp.search_page, card_mcp.search_cards_call and search.py read the page's cards by hashing the tenant's
-- cards (a sequential scan of a small tenant: the planner cannot count a function's rows, and 11 probes of the
-- primary key cost more than scanning 250 cards, by its reckoning); now each hit is one probe of the primary key.

-- pg_trgm's library loaded in this session, so that its setting below is one PostgreSQL knows (a role that is not a
-- superuser may not set a placeholder): as a migration run alone on a database that is up to date but for it.
SELECT card_mcp.similarity('', '');

CREATE OR REPLACE FUNCTION card_mcp.search_cards(
    p_query text,
    p_card_type text,
    p_tags text[],
    p_after_score double precision,
    p_after_id uuid,
    p_limit integer,
    p_typos integer[] DEFAULT NULL  -- the words looked up as typos (card_mcp.search_typos); NULL: decide now
) RETURNS TABLE (id uuid, score double precision)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    ROWS 20
    SET search_path = pg_catalog, card_mcp, pg_temp
    SET pg_trgm.word_similarity_threshold = 0.5
    SET jit = off
    SET work_mem = '32MB'
    SET max_parallel_workers_per_gather = 0
    SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
    v_typos integer[];     -- the words looked up as typos: p_typos, or decided now
    v_fuzzy text[];        -- per searched word: its stem where it is looked up as a typo (v_typos), else NULL
    v_fuzzy_ts tsquery[];  -- per searched word looked up as a typo: its own prefixes, which a similar word must not have
    v_stem_n integer[];    -- (searched word's position, one of its stemmed lexemes): the postings' ranges
    v_stem text[];
    v_n integer;           -- how many words are searched
    v_similar_n integer[]; -- (searched word's position, tenant's lexeme, similarity) of the tenant's lexemes similar
    v_similar_w text[];    -- to a searched word's stem that the word's own prefixes do not match
    v_similar real[];
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- fail closed, like the policies
    END IF;
    v_typos := coalesce(p_typos, card_mcp.search_typos(p_query));  -- once, not per word
    -- The query read once: its first 16 distinct words in the order written, stop words (no lexeme) left out; every
    -- (word, lexeme); per word looked up as a typo, its stem and its own prefixes as a tsquery.
    WITH lexemes AS (
        SELECT * FROM card_mcp.search_words(p_query)
    ), per_word AS (
        SELECT k, min(w) AS w, min(l) AS stem,
               to_tsquery('simple', string_agg(quote_literal(l) || CASE WHEN length(l) >= 4 THEN ':*' ELSE '' END,
                                               ' | ')) AS q
          FROM lexemes
         GROUP BY k
    )
    SELECT (SELECT max(k) FROM per_word),
           (SELECT array_agg(CASE WHEN k = ANY (v_typos)
                                       AND length(w) >= 4 AND w !~ '[[:digit:]]'  -- a cursor's pin cannot widen it
                                  THEN stem END
                             ORDER BY k)
              FROM per_word),
           (SELECT array_agg(q ORDER BY k) FROM per_word),
           (SELECT array_agg(k ORDER BY k, l) FROM lexemes),
           (SELECT array_agg(l ORDER BY k, l) FROM lexemes)
      INTO v_n, v_fuzzy, v_fuzzy_ts, v_stem_n, v_stem;
    IF coalesce(v_n, 0) = 0 THEN
        RETURN;  -- no words, or stop words only
    END IF;

    -- Per fuzzy word: the tenant's lexemes at least 0.5 similar to its stem that its own prefixes do not match
    -- (cards with those have the word already), best first. One word at a time: each its own trigram index scan.
    FOR i IN 1 .. v_n LOOP
        CONTINUE WHEN v_fuzzy[i] IS NULL;
        SELECT v_similar_n || array_agg(i ORDER BY sim.similarity DESC, sim.word),
               v_similar_w || array_agg(sim.word ORDER BY sim.similarity DESC, sim.word),
               v_similar || array_agg(sim.similarity ORDER BY sim.similarity DESC, sim.word)
          INTO v_similar_n, v_similar_w, v_similar
          FROM (SELECT v.word, word_similarity(v_fuzzy[i], v.word) AS similarity
                  FROM card_mcp.search_vocabulary AS v
                 WHERE v.tenant_id = v_tenant AND v.word %> v_fuzzy[i]
                   AND NOT quote_literal(v.word)::tsvector @@ v_fuzzy_ts[i]) AS sim;
    END LOOP;

    -- Then the cards with some of the words, or words like them, from the postings alone (the index, no card read);
    -- a card is read only for a type or tags filter.
    RETURN QUERY
    WITH has AS MATERIALIZED (  -- per card: the searched words it has (word k as bit k), and their postings' weight
        SELECT p.card_id, bit_or(1 << s.n) AS has, sum(p.weight::double precision) AS w
          FROM unnest(v_stem_n, v_stem) AS s(n, stem)
         CROSS JOIN LATERAL (  -- a range of the index per stem, whatever the plan (never the tenant's every posting)
               SELECT p.card_id, p.weight
                 FROM card_mcp.search_postings AS p
                WHERE p.tenant_id = v_tenant AND p.word >= s.stem COLLATE "C"
                  AND p.word < (s.stem || CASE WHEN length(s.stem) >= 4 THEN chr(1114111) ELSE chr(1) END) COLLATE "C"
               OFFSET 0) AS p  -- not flattened into a join the planner may hash
         GROUP BY p.card_id
    ), fewest AS (
        -- The fewest words a card of the page can have: a card with e words scores in [e/(n+1), (e+1)/(n+1)), below
        -- every card with more, so once p_limit cards that the cursor lets through have e words or more, no card
        -- with fewer is read further (nor looked at for typos). 0 (every card) with a type or tags filter, which
        -- only the cards themselves can tell, or when fewer cards than that have any word.
        SELECT coalesce(max(t.e), 0) AS e
          FROM (SELECT x.e, sum(x.cards) OVER (ORDER BY x.e DESC) AS cards
                  FROM (SELECT bit_count(h.has::bit(32)) AS e, count(*) AS cards FROM has AS h GROUP BY 1) AS x
                 -- past a cursor, a card in its tier may or may not come after it; every card in a lower tier does
                 WHERE p_after_score IS NULL OR x.e < floor(p_after_score * (v_n + 1))) AS t
         WHERE t.cards >= p_limit AND p_card_type IS NULL AND p_tags IS NULL
    ), hits AS (
        SELECT h.card_id, h.has, h.w, 0 AS resembles, 0::double precision AS similarity
          FROM has AS h
         WHERE bit_count(h.has::bit(32)) >= (SELECT f.e FROM fewest AS f)
        UNION ALL
        -- per card and word looked up as a typo: the best similarity of the card's lexemes like it
        SELECT r.card_id, 0, 0, 1 << r.n, r.similarity
          FROM (SELECT p.card_id, s.n, max(s.similarity::double precision) AS similarity
                  FROM unnest(v_similar_n, v_similar_w, v_similar) AS s(n, word, similarity)
                 CROSS JOIN LATERAL (
                       SELECT p.card_id
                         FROM card_mcp.search_postings AS p
                        WHERE p.tenant_id = v_tenant AND p.word = s.word COLLATE "C"
                       OFFSET 0) AS p
                 WHERE (SELECT f.e FROM fewest AS f) = 0
                    OR p.card_id IN (SELECT h.card_id FROM has AS h
                                      WHERE bit_count(h.has::bit(32)) >= (SELECT f.e FROM fewest AS f))
                 GROUP BY p.card_id, s.n) AS r
    ), per_card AS (  -- one aggregate; sums in double precision, exact for these float4 values: the same in any
                      -- row order, so a card's score cannot move by a rounding step between two pages
        SELECT h.card_id, bit_or(h.has) AS has, sum(h.w) AS w, bit_or(h.resembles) AS resembles,
               sum(h.similarity) AS f
          FROM hits AS h
         GROUP BY h.card_id
    ), scored AS (
        SELECT m.card_id AS id,
               ((bit_count(m.has::bit(32))
                 + 0.5 * CASE WHEN m.has & m.resembles = 0 THEN m.f
                              -- a word the card has is not one it resembles (only when a cursor pinned the word
                              -- as a typo before a card with it arrived): f again, without those words
                              ELSE (SELECT coalesce(sum(x.similarity), 0)
                                      FROM (SELECT max(s.similarity::double precision) AS similarity
                                              FROM unnest(v_similar_n, v_similar_w, v_similar) AS s(n, word, similarity)
                                             WHERE m.has & (1 << s.n) = 0
                                               AND EXISTS (SELECT FROM card_mcp.search_postings AS p
                                                            WHERE p.tenant_id = v_tenant AND p.word = s.word COLLATE "C"
                                                              AND p.card_id = m.card_id)
                                             GROUP BY s.n) AS x) END / v_n
                 + 0.5 * m.w / (m.w + 1)) / (v_n + 1))::double precision AS score
          FROM per_card AS m
    )
    SELECT s.id, s.score
      FROM scored AS s
     WHERE (p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id))
       AND (p_card_type IS NULL AND p_tags IS NULL
            OR EXISTS (SELECT FROM card_mcp.cards AS c
                        WHERE c.tenant_id = v_tenant AND c.id = s.id AND c.is_active
                          AND (p_card_type IS NULL OR c.card_type = p_card_type)
                          AND (p_tags IS NULL OR c.tags @> p_tags)))
     ORDER BY s.score DESC, s.id DESC
     LIMIT p_limit;
END
$$;

-- One page of a search, as in 0015, but for the lexical page's sizes: read by one probe of the cards' primary key
-- per hit (a lateral subquery, which the planner cannot turn into a hash of the tenant's cards).
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

-- search_cards as one statement, as in 0014, but for reading the page's cards: one probe of the primary key per hit
-- (a hash join of the page's ids to the tenant's cards read every card of a small tenant).
CREATE OR REPLACE FUNCTION card_mcp.search_cards_call(
    p_tenant_id uuid, p_words text, p_card_type text, p_tags text[], p_after_score double precision,
    p_after_updated timestamptz, p_after_id uuid, p_limit integer, p_max_bytes integer, p_vector text, p_model text,
    p_floor double precision, p_ceiling double precision, p_depth integer, p_typos integer[],
    p_tool text, p_client_name text, p_client_version text, p_transport text, p_api_key_id uuid,
    p_elapsed_ms double precision, p_connection_id uuid, p_oauth_client_id text
) RETURNS TABLE (
    id uuid, card_type text, title text, content jsonb, tags text[], version integer, content_hash text,
    created_at timestamptz, updated_at timestamptz, score double precision, kept boolean, typos integer[]
)
    LANGUAGE plpgsql
    SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    v_ids uuid[];
    v_scores double precision[];
    v_kept boolean[];
    v_typos integer[];
BEGIN
    PERFORM set_config('app.current_tenant_id', p_tenant_id::text, true),
            set_config('synchronous_commit', 'off', true);
    SELECT array_agg(p.id ORDER BY n), array_agg(p.score ORDER BY n), array_agg(p.kept ORDER BY n), min(p.typos)
      INTO v_ids, v_scores, v_kept, v_typos
      FROM card_mcp.search_page(p_words, p_card_type, p_tags, p_after_score, p_after_updated, p_after_id, p_limit,
                                p_max_bytes, p_vector, p_model, p_floor, p_ceiling, p_depth, p_typos)
           WITH ORDINALITY AS p(id, score, kept, typos, n);
    PERFORM card_mcp.record_call(
        p_tenant_id, p_tool, 'ok', NULL,
        coalesce((SELECT array_agg(h.id ORDER BY h.n) FROM unnest(v_ids, v_kept) WITH ORDINALITY AS h(id, kept, n)
                   WHERE h.kept), '{}'::uuid[]),
        p_elapsed_ms + 1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()),
        p_client_name, p_client_version, p_transport, p_api_key_id, p_connection_id, p_oauth_client_id
    );
    RETURN QUERY
    SELECT c.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at,
           h.score, h.kept, v_typos
      FROM unnest(v_ids, v_scores, v_kept) WITH ORDINALITY AS h(id, score, kept, n)
     CROSS JOIN LATERAL (SELECT c.* FROM card_mcp.cards AS c WHERE c.tenant_id = p_tenant_id AND c.id = h.id
                         OFFSET 0) AS c  -- a probe per hit, never a hash of the tenant's cards
     ORDER BY h.n;
END
$$;
