-- search_cards in fewer and smaller statements (issue #16): a search's SQL on a small tenant is mostly the executor
-- setting up and tearing down its plans, so the plans are made smaller (backend CPU per search_cards call on a
-- 250-card tenant, one word: 650 to 400 us; docs/benchmarks.md).
-- - The query is read in one plain aggregate; the typo words' stems and prefixes are worked out only when a word is
--   looked up as a typo (before, every search built a tsquery per word).
-- - When no typo lookup found a word like it (most searches), the cards are ranked by a statement without the typo
--   lookups' parts and without counting the tiers first (0016): its plan is a third of the size, and on the
--   100,000-card tenant counting the tiers cost more than it saved when no typo postings are to be spared (the
--   relevance set's queries, min of 3: p95 40.2 to 32.9 ms). The score is the same expression, f being 0, so every
--   page is the same as before.
-- The general statement (typo words with words like them) is 0016's.

-- pg_trgm's library loaded in this session, for the function's setting below (as in 0016).
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
    v_word text[];         -- the word of each (position, lexeme)
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
    -- (word, lexeme).
    SELECT max(s.k), array_agg(s.k ORDER BY s.k, s.l), array_agg(s.l ORDER BY s.k, s.l),
           array_agg(s.w ORDER BY s.k, s.l)
      INTO v_n, v_stem_n, v_stem, v_word
      FROM card_mcp.search_words(p_query) AS s;
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
         WHERE t.cards >= p_limit AND p_card_type IS NULL AND p_tags IS NULL
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
