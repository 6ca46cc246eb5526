-- A lexical search_cards call in two PL/pgSQL functions where it took six (issue #16, docs/benchmarks.md "Search
-- over stdio"). On a 250-card tenant its statement took 3.3x get_card's, and a count of the functions' own time
-- (track_functions) showed where: search_cards_call 200 us of its own, search_page 200 (a probe of each hit's card
-- for its size), search_cards 330, search_typos 160 and search_words 56, twice (the query read once to decide the
-- typo words, and again to rank), record_call 120.
-- - card_mcp.search_lexical is a lexical page whole: the query read once, the typo words decided in the same
--   statement (0014's search_typos, on the words already read), the ranking of 0018 unchanged, and each hit's
--   size and whether it is kept (search_page's, before), in the ranking's statement. search_page's lexical branch
--   is this function; card_mcp.search_cards is a page of it without sizes (for the hybrid ranking).
-- - card_mcp.search_cards_call no longer reads the card of the row after the page (it only says that more exist).
-- Every page is the one 0019 served: the same expressions on the same values (tests/test_search.py compares every
-- page of the relevance set's queries, cursors followed, with 0018's and 0019's functions).

-- pg_trgm's library loaded in this session, for the function's setting below (as in 0016).
SELECT card_mcp.similarity('', '');

-- The query's searched words as in 0014, in SQL that PostgreSQL inlines into the statement that reads them (an SQL
-- function with no SET clause, not SECURITY DEFINER), so planned once with it: as PL/pgSQL it cost each call of it
-- about 50 us of its own (track_functions), twice a search. Every name in it is pg_catalog's, which is searched
-- first whatever the caller's search_path.
CREATE OR REPLACE FUNCTION card_mcp.search_words(p_query text) RETURNS TABLE (k integer, w text, l text)
    LANGUAGE sql STABLE
AS $$
    WITH first_words AS (
        SELECT t.w, min(t.n) AS first
          FROM pg_catalog.regexp_split_to_table(pg_catalog.lower(pg_catalog.left(p_query, 500)), '[^[:alnum:]]+')
               WITH ORDINALITY AS t(w, n)
         WHERE t.w <> ''
         GROUP BY t.w
         ORDER BY min(t.n)
         LIMIT 16
    )
    SELECT (pg_catalog.dense_rank() OVER (ORDER BY x.first))::integer, x.w, l.l
      FROM first_words AS x,
           pg_catalog.unnest(pg_catalog.tsvector_to_array(pg_catalog.to_tsvector('pg_catalog.english', x.w))) AS l(l)
$$;

-- One lexical page of the current tenant's cards (card_mcp.search_cards's ranking, 0018), as (id, score, kept,
-- typos), best first: at most p_limit + 1 hits after the cursor's position, each marked kept when it belongs to
-- the page (at most p_limit hits and p_max_bytes of cards, at least one), with the words looked up as typos, for
-- the cursor to pin.
CREATE FUNCTION card_mcp.search_lexical(
    p_query text,
    p_card_type text,
    p_tags text[],
    p_after_score double precision,
    p_after_id uuid,
    p_limit integer,       -- NULL: every hit
    p_max_bytes integer,   -- NULL: no page (kept is not worked out, nor any card read for its size)
    p_typos integer[]      -- the words looked up as typos, as a cursor pinned them; NULL: decide now
) RETURNS TABLE (id uuid, score double precision, kept boolean, typos integer[])
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    ROWS 11
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
    v_word text[];         -- the word of each (position, lexeme)
    v_n integer;           -- how many words are searched
    v_similar_n integer[]; -- (searched word's position, tenant's lexeme, similarity) of the tenant's lexemes similar
    v_similar_w text[];    -- to a searched word's stem that the word's own prefixes do not match
    v_similar real[];
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- fail closed, like the policies
    END IF;
    -- The query read once: its first 16 distinct words in the order written, stop words (no lexeme) left out; every
    -- (word, lexeme); and, unless a cursor pinned them, the words looked up as typos, as card_mcp.search_typos (0014)
    -- decides them: 4 letters or more, no digit, and no lexeme of the word starts a word of the tenant's cards (one
    -- probe of the postings' index per lexeme).
    SELECT max(y.k), array_agg(y.k ORDER BY y.k, y.l), array_agg(y.l ORDER BY y.k, y.l),
           array_agg(y.w ORDER BY y.k, y.l),
           coalesce(p_typos, array_agg(DISTINCT y.k) FILTER (WHERE y.typo), '{}')
      INTO v_n, v_stem_n, v_stem, v_word, v_typos
      FROM (SELECT s.k, s.w, s.l,
                   p_typos IS NULL AND length(s.w) >= 4 AND s.w !~ '[[:digit:]]'
                   AND NOT bool_or(p_typos IS NULL AND EXISTS (
                           SELECT FROM card_mcp.search_postings AS p
                            WHERE p.tenant_id = v_tenant AND p.word >= s.l COLLATE "C"
                              AND p.word < (s.l || CASE WHEN length(s.l) >= 4 THEN chr(1114111) ELSE chr(1) END)
                                  COLLATE "C")) OVER (PARTITION BY s.k) AS typo
              FROM card_mcp.search_words(p_query) AS s) AS y;
    IF coalesce(v_n, 0) = 0 THEN
        RETURN;  -- no words, or stop words only
    END IF;
    IF cardinality(v_typos) > 0 THEN
        -- Per searched word looked up as a typo: its stem, and its own prefixes as a tsquery.
        SELECT array_agg(CASE WHEN x.k = ANY (v_typos)
                                   AND length(x.w) >= 4 AND x.w !~ '[[:digit:]]'  -- a cursor's pin cannot widen it
                              THEN x.stem END
                         ORDER BY x.k),
               array_agg(x.q ORDER BY x.k)
          INTO v_fuzzy, v_fuzzy_ts
          FROM (SELECT s.k, min(s.w) AS w, min(s.l) AS stem,
                       to_tsquery('simple', string_agg(quote_literal(s.l)
                                                       || CASE WHEN length(s.l) >= 4 THEN ':*' ELSE '' END, ' | ')) AS q
                  FROM unnest(v_stem_n, v_word, v_stem) AS s(k, w, l)
                 GROUP BY s.k) AS x;
    END IF;

    -- Per fuzzy word: the tenant's lexemes at least 0.5 similar to its stem that its own prefixes do not match
    -- (cards with those have the word already), best first. One word at a time: each its own trigram index scan.
    FOR i IN 1 .. coalesce(cardinality(v_fuzzy), 0) LOOP
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

    -- No word like a typo word (none looked up, or none like it in the tenant): the words' own postings alone, one
    -- aggregate per card, every card scored. Cheaper than the general statement below, for a small tenant (its
    -- plan is a third of the size) and for a big one (counting the tiers first cost more than it saved when no
    -- typo lookup's postings are to be spared): the same score, f being 0.
    IF v_similar_n IS NULL THEN
        RETURN QUERY
        WITH has AS (  -- per card: the searched words it has (word k as bit k), and their postings' weight
            SELECT p.card_id, bit_or(1 << s.n) AS has, sum(p.weight::double precision) AS w
              FROM unnest(v_stem_n, v_stem) AS s(n, stem)
             CROSS JOIN LATERAL (
                   SELECT p.card_id, p.weight
                     FROM card_mcp.search_postings AS p
                    WHERE p.tenant_id = v_tenant AND p.word >= s.stem COLLATE "C"
                      AND p.word < (s.stem || CASE WHEN length(s.stem) >= 4 THEN chr(1114111) ELSE chr(1) END)
                          COLLATE "C"
                   OFFSET 0) AS p
             GROUP BY p.card_id
        ), scored AS (
            SELECT h.card_id AS id,
                   ((bit_count(h.has::bit(32)) + 0.5 * h.w / (h.w + 1)) / (v_n + 1))::double precision AS score
              FROM has AS h
        ), ranked AS (
            SELECT s.id, s.score
              FROM scored AS s
             WHERE (p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id))
               AND (p_card_type IS NULL AND p_tags IS NULL
                    OR EXISTS (SELECT FROM card_mcp.cards AS c
                                WHERE c.tenant_id = v_tenant AND c.id = s.id AND c.is_active
                                  AND (p_card_type IS NULL OR c.card_type = p_card_type)
                                  AND (p_tags IS NULL OR c.tags @> p_tags)))
             ORDER BY s.score DESC, s.id DESC
             LIMIT p_limit + 1
        )
        SELECT h.id, h.score, h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
          FROM (SELECT r.id, r.score, row_number() OVER w AS n,
                       sum(CASE WHEN p_max_bytes IS NOT NULL THEN  -- a probe of the primary key per hit
                                (SELECT octet_length(c.content::text) + octet_length(c.title) + 300
                                   FROM card_mcp.cards AS c WHERE c.tenant_id = v_tenant AND c.id = r.id) END) OVER w
                           AS bytes
                  FROM ranked AS r
                WINDOW w AS (ORDER BY r.score DESC, r.id DESC)) AS h
         ORDER BY h.score DESC, h.id DESC;
        RETURN;
    END IF;

    -- Then the cards with some of the words, or words like them, from the postings alone (the index, no card read);
    -- a card is read only for a type or tags filter.
    RETURN QUERY
    WITH has AS MATERIALIZED (  -- per card: the searched words it has (word k as bit k, e of them), and their
                                -- postings' weight
        SELECT p.card_id, bit_or(1 << s.n) AS has, bit_count(bit_or(1 << s.n)::bit(32)) AS e,
               sum(p.weight::double precision) AS w
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
                  FROM (SELECT h.e, count(*) AS cards FROM has AS h GROUP BY 1) AS x
                 -- past a cursor, a card in its tier may or may not come after it; every card in a lower tier does
                 WHERE p_after_score IS NULL OR x.e < floor(p_after_score * (v_n + 1))) AS t
         WHERE t.cards >= p_limit + 1 AND p_card_type IS NULL AND p_tags IS NULL
    ), hits AS (
        SELECT h.card_id, h.has, h.w, 0 AS resembles, 0::double precision AS similarity
          FROM has AS h
         WHERE h.e >= (SELECT f.e FROM fewest AS f)
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
                                      WHERE h.e >= (SELECT f.e FROM fewest AS f))
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
    ), ranked AS (
        SELECT s.id, s.score
          FROM scored AS s
         WHERE (p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id))
           AND (p_card_type IS NULL AND p_tags IS NULL
                OR EXISTS (SELECT FROM card_mcp.cards AS c
                            WHERE c.tenant_id = v_tenant AND c.id = s.id AND c.is_active
                              AND (p_card_type IS NULL OR c.card_type = p_card_type)
                              AND (p_tags IS NULL OR c.tags @> p_tags)))
         ORDER BY s.score DESC, s.id DESC
         LIMIT p_limit + 1
    )
    SELECT h.id, h.score, h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
      FROM (SELECT r.id, r.score, row_number() OVER w AS n,
                   sum(CASE WHEN p_max_bytes IS NOT NULL THEN
                            (SELECT octet_length(c.content::text) + octet_length(c.title) + 300
                               FROM card_mcp.cards AS c WHERE c.tenant_id = v_tenant AND c.id = r.id) END) OVER w
                       AS bytes
              FROM ranked AS r
            WINDOW w AS (ORDER BY r.score DESC, r.id DESC)) AS h
     ORDER BY h.score DESC, h.id DESC;
END
$$;


-- The tenant's cards that match p_query, best first, as (id, score): at most p_limit (NULL: all), as before.
-- What the hybrid ranking reads; card_mcp.search_lexical ranks.
CREATE OR REPLACE FUNCTION card_mcp.search_cards(
    p_query text,
    p_card_type text,
    p_tags text[],
    p_after_score double precision,
    p_after_id uuid,
    p_limit integer,
    p_typos integer[] DEFAULT NULL
) RETURNS TABLE (id uuid, score double precision)
    LANGUAGE sql STABLE
    ROWS 20
AS $$
    SELECT l.id, l.score
      FROM card_mcp.search_lexical(p_query, p_card_type, p_tags, p_after_score, p_after_id, p_limit - 1, NULL,
                                   p_typos) AS l
$$;

-- One page of a search, as in 0019, but a lexical one is card_mcp.search_lexical's.
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
        SELECT l.id, l.score, l.kept, l.typos
          FROM card_mcp.search_lexical(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit, p_max_bytes,
                                       p_typos) AS l;
    ELSE
        v_typos := coalesce(p_typos, card_mcp.search_typos(p_words));
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

-- A search_cards call, as in 0016, but a lexical page is card_mcp.search_lexical's (search_page's lexical branch,
-- one call fewer), and the row after the page is not read.
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
    IF p_vector IS NULL AND coalesce(p_words, '') <> '' THEN  -- a lexical page: search_page's, without its call
        SELECT array_agg(p.id ORDER BY n), array_agg(p.score ORDER BY n), array_agg(p.kept ORDER BY n), min(p.typos)
          INTO v_ids, v_scores, v_kept, v_typos
          FROM card_mcp.search_lexical(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit, p_max_bytes,
                                       p_typos)
               WITH ORDINALITY AS p(id, score, kept, typos, n);
    ELSE
        SELECT array_agg(p.id ORDER BY n), array_agg(p.score ORDER BY n), array_agg(p.kept ORDER BY n), min(p.typos)
          INTO v_ids, v_scores, v_kept, v_typos
          FROM card_mcp.search_page(p_words, p_card_type, p_tags, p_after_score, p_after_updated, p_after_id, p_limit,
                                    p_max_bytes, p_vector, p_model, p_floor, p_ceiling, p_depth, p_typos)
               WITH ORDINALITY AS p(id, score, kept, typos, n);
    END IF;
    PERFORM card_mcp.record_call(
        p_tenant_id, p_tool, 'ok', NULL,
        coalesce((SELECT array_agg(h.id ORDER BY h.n) FROM unnest(v_ids, v_kept) WITH ORDINALITY AS h(id, kept, n)
                   WHERE h.kept), '{}'::uuid[]),
        p_elapsed_ms + 1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()),
        p_client_name, p_client_version, p_transport, p_api_key_id, p_connection_id, p_oauth_client_id
    );
    RETURN QUERY
    SELECT h.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at,
           h.score, h.kept, v_typos
      FROM unnest(v_ids, v_scores, v_kept) WITH ORDINALITY AS h(id, score, kept, n)
      LEFT JOIN LATERAL (  -- a probe per hit of the page, never a hash of the tenant's cards; the row after the
                           -- page only says that more exist, and is not read
           SELECT c.* FROM card_mcp.cards AS c WHERE h.kept AND c.tenant_id = p_tenant_id AND c.id = h.id
           OFFSET 0) AS c ON true
     ORDER BY h.n;
END
$$;

REVOKE ALL ON FUNCTION card_mcp.search_lexical(text, text, text[], double precision, uuid, integer, integer, integer[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_lexical(text, text, text[], double precision, uuid, integer, integer,
                                                  integer[])
    TO card_mcp_app, card_mcp_admin;
