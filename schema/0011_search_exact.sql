-- Search that is exact (issue #16): a hit's score depends only on the query and that card, and what a card says is
-- searchable, its content's keys and numbers included.
--
-- 1. The stored full-text document gains the content's numbers (with its strings, weight C) and its keys (weight D,
--    below every value), so {"tone": [...]} is found by "tone" and {"founded": 2009} by "2009"; the word list used
--    for typos gains them too. The word list's trigram index goes: typos are looked up in the vocabulary below.
-- 2. A per-tenant vocabulary (every word any of its cards has had, kept by triggers) turns a query word's typos
--    into the tenant's real words with a trigram lookup over words, not over every card. It only finds candidates:
--    a card's credit for a typo is the similarity of its own best word, so the score never depends on other cards
--    (before, a word got a trigram lookup only while no card of the tenant matched it exactly, and a card inserted
--    between two pages could change another card's score and serve it twice).
-- 3. card_mcp.search_cards reads the query's first 16 distinct words in the order written (before: any 16).

ALTER TABLE card_mcp.cards DROP COLUMN search_doc, DROP COLUMN search_words;
ALTER TABLE card_mcp.cards
    ADD COLUMN search_doc tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, title), 'A')
        || setweight(to_tsvector('english'::regconfig, card_mcp.join_words(tags)), 'B')
        || setweight(jsonb_to_tsvector('english'::regconfig, content, '["string", "numeric"]'), 'C')
        || setweight(jsonb_to_tsvector('english'::regconfig, content, '["key"]'), 'D')
    ) STORED,
    ADD COLUMN search_words text GENERATED ALWAYS AS (
        card_mcp.join_words(tsvector_to_array(
            to_tsvector('simple'::regconfig, title)
            || to_tsvector('simple'::regconfig, card_mcp.join_words(tags))
            || jsonb_to_tsvector('simple'::regconfig, content, '["string", "numeric", "key"]')
        ))
    ) STORED;

CREATE INDEX cards_search_doc_idx ON card_mcp.cards USING gin (tenant_id, search_doc) WHERE is_active;

-- Every word (as in search_words) any card of the tenant has had. Never shrinks: a word no card has any more only
-- costs the lookup a row (a card's credit is checked against its own words).
CREATE TABLE card_mcp.search_vocabulary (
    tenant_id  uuid NOT NULL,
    word       text NOT NULL,
    CONSTRAINT search_vocabulary_pkey PRIMARY KEY (tenant_id, word),
    CONSTRAINT search_vocabulary_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id)
);
CREATE INDEX search_vocabulary_trgm_idx ON card_mcp.search_vocabulary
    USING gin (tenant_id, word card_mcp.gin_trgm_ops);

ALTER TABLE card_mcp.search_vocabulary ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.search_vocabulary FORCE ROW LEVEL SECURITY;
CREATE POLICY search_vocabulary_current ON card_mcp.search_vocabulary FOR ALL TO card_mcp_app
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY search_vocabulary_admin ON card_mcp.search_vocabulary FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT ON card_mcp.search_vocabulary TO card_mcp_app;  -- ON CONFLICT reads the row it meets
GRANT SELECT ON card_mcp.search_vocabulary TO card_mcp_admin;

INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
SELECT DISTINCT c.tenant_id, w
  FROM card_mcp.cards AS c, unnest(string_to_array(c.search_words, ' ')) AS w
 WHERE w <> ''
ON CONFLICT DO NOTHING;

-- New words of a statement's cards, once per statement, in word order (two writers never wait on each other in
-- opposite orders). SECURITY INVOKER: under the writer's own policy (its tenant's rows only).
CREATE FUNCTION card_mcp.learn_inserted_words() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
    SELECT DISTINCT n.tenant_id, w
      FROM new_cards AS n, unnest(string_to_array(n.search_words, ' ')) AS w
     WHERE w <> ''
     ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE FUNCTION card_mcp.learn_updated_words() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
    SELECT DISTINCT n.tenant_id, w
      FROM new_cards AS n
      JOIN old_cards AS o ON o.tenant_id = n.tenant_id AND o.id = n.id,
           unnest(string_to_array(n.search_words, ' ')) AS w
     WHERE w <> '' AND n.search_words IS DISTINCT FROM o.search_words
     ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE TRIGGER cards_learn_inserted_words AFTER INSERT ON card_mcp.cards
    REFERENCING NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.learn_inserted_words();
CREATE TRIGGER cards_learn_updated_words AFTER UPDATE ON card_mcp.cards
    REFERENCING OLD TABLE AS old_cards NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.learn_updated_words();

-- The active cards of the current tenant (app.current_tenant_id) that match p_query, best first, as (id, score):
-- at most p_limit of them (NULL: all), after the position (p_after_score, p_after_id) of a previous page, filtered
-- by type and by tags (all must match). The query's words are its first 16 distinct ones, lower case, letters and
-- digits. A card matches a word when the word, stemmed, starts a word of its text (full-text search, prefix
-- match): credit 1; or, for a word of 4 letters or more that is no stop word, when one of the card's own words is
-- similar to it (a typo, a partial word): credit that word's trigram word-similarity (at least 0.6). The score, in
-- [0, 1], is a function of the query and the card alone, so keyset paging on (score, id) never serves a card twice:
--   0.7 x full-text rank (cover density; title 1.0 > tags 0.4 > content values 0.2 > content keys 0.1; scaled to
--         [0, 1) by rank/(rank+1))
-- + 0.3 x the mean credit of the query's words.
CREATE OR REPLACE FUNCTION card_mcp.search_cards(
    p_query text,
    p_card_type text,
    p_tags text[],
    p_after_score double precision,
    p_after_id uuid,
    p_limit integer
) RETURNS TABLE (id uuid, score double precision)
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    ROWS 20
    SET search_path = pg_catalog, card_mcp, pg_temp
    SET pg_trgm.word_similarity_threshold = 0.6
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
    v_words text[];        -- the query's first 16 distinct words, lower case, in the order written
    v_word_ts tsquery[];   -- per word: its stemmed lexemes as prefixes; NULL for a stop word
    v_fuzzy text[];        -- per word: the word where it is looked up by trigrams too (4 letters, no stop word)
    v_ts tsquery;          -- every word, any may match
    v_similar_n bigint[];  -- (query word's position, tenant's word, similarity) of the tenant's words similar
    v_similar_word text[]; -- to a query word that the word's own prefixes do not match
    v_similar real[];
    v_similar_ts tsquery;  -- those words, stemmed, any may match
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- fail closed, like the policies
    END IF;
    SELECT array_agg(w ORDER BY first) INTO v_words
      FROM (SELECT w, min(n) AS first
              FROM regexp_split_to_table(lower(left(p_query, 500)), '[^[:alnum:]]+') WITH ORDINALITY AS t(w, n)
             WHERE w <> ''
             GROUP BY w
             ORDER BY min(n)
             LIMIT 16) AS first_words;
    IF v_words IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(q ORDER BY n),
           array_agg(CASE WHEN q IS NOT NULL AND length(w) >= 4 THEN w END ORDER BY n)
      INTO v_word_ts, v_fuzzy
      FROM unnest(v_words) WITH ORDINALITY AS x(w, n),
           LATERAL (SELECT to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) AS q
                      FROM unnest(tsvector_to_array(to_tsvector('english', w))) AS l) AS per_word;
    SELECT to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) INTO v_ts
      FROM unnest(tsvector_to_array(to_tsvector('english', array_to_string(v_words, ' ')))) AS l;

    -- Per fuzzy word: the tenant's words at least 0.6 similar to it that its own prefixes do not match (cards with
    -- those have credit 1 already).
    SELECT array_agg(x.n ORDER BY x.n, v.word), array_agg(v.word ORDER BY x.n, v.word),
           array_agg(word_similarity(x.w, v.word) ORDER BY x.n, v.word)
      INTO v_similar_n, v_similar_word, v_similar
      FROM unnest(v_fuzzy) WITH ORDINALITY AS x(w, n)
      JOIN card_mcp.search_vocabulary AS v ON v.tenant_id = v_tenant AND v.word %> x.w
     WHERE x.w IS NOT NULL
       AND NOT to_tsvector('english', v.word) @@ v_word_ts[x.n];
    SELECT to_tsquery('simple', string_agg(DISTINCT quote_literal(l), ' | ')) INTO v_similar_ts
      FROM unnest(v_similar_word) AS s(word), unnest(tsvector_to_array(to_tsvector('english', s.word))) AS l;

    RETURN QUERY
    WITH candidates AS (
        SELECT c.id, c.search_doc, string_to_array(c.search_words, ' ') AS words
          FROM card_mcp.cards AS c
         WHERE c.tenant_id = v_tenant AND c.is_active
           AND c.search_doc @@ (CASE WHEN v_similar_ts IS NULL THEN v_ts ELSE v_ts || v_similar_ts END)
           AND (p_card_type IS NULL OR c.card_type = p_card_type)
           AND (p_tags IS NULL OR c.tags @> p_tags)
    ), scored AS (
        SELECT m.id,
               0.7 * coalesce(ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', m.search_doc, v_ts, 32), 0)
               + 0.3 * (SELECT coalesce(sum(CASE WHEN q.ts IS NOT NULL AND m.search_doc @@ q.ts THEN 1
                                                 ELSE (SELECT coalesce(max(s.similarity), 0)
                                                         FROM unnest(v_similar_n, v_similar_word, v_similar)
                                                              AS s(n, word, similarity)
                                                        WHERE s.n = q.n AND s.word = ANY (m.words)) END), 0)
                          FROM unnest(v_word_ts) WITH ORDINALITY AS q(ts, n))
                     / cardinality(v_words) AS score
          FROM candidates AS m
    )
    SELECT s.id, s.score::double precision
      FROM scored AS s
     WHERE s.score > 0
       AND (p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id))
     ORDER BY s.score DESC, s.id DESC
     LIMIT p_limit;
END
$$;
