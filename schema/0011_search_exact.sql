-- Search that is exact (issue #16): a hit's score depends only on the query and that card, and what a card says is
-- searchable, its content's keys and numbers included.
--
-- 1. The stored full-text document gains the content's numbers (with its strings, weight C) and its keys (weight D,
--    below every value), so {"tone": [...]} is found by "tone" and {"founded": 2009} by "2009". The word list and
--    its trigram index go: typos are looked up in the vocabulary below.
-- 2. A per-tenant vocabulary (every stemmed word, lexeme, any of its cards has had, kept by triggers) turns a query
--    word's typos into the tenant's real lexemes with a trigram lookup over lexemes, not over every card. It only
--    finds candidates: a card's credit for a typo is the similarity of its own best lexeme, so the score never
--    depends on other cards (before, a word got a trigram lookup only while no card of the tenant matched it
--    exactly, and a card inserted between two pages could change another card's score and serve it twice).
-- 3. card_mcp.search_cards reads the query's first 16 distinct words in the order written (before: any 16).

ALTER TABLE card_mcp.cards DROP COLUMN search_doc, DROP COLUMN search_words;
ALTER TABLE card_mcp.cards
    ADD COLUMN search_doc tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, title), 'A')
        || setweight(to_tsvector('english'::regconfig, card_mcp.join_words(tags)), 'B')
        || setweight(jsonb_to_tsvector('english'::regconfig, content, '["string", "numeric"]'), 'C')
        || setweight(jsonb_to_tsvector('english'::regconfig, content, '["key"]'), 'D')
    ) STORED;

CREATE INDEX cards_search_doc_idx ON card_mcp.cards USING gin (tenant_id, search_doc) WHERE is_active;

-- Every lexeme (as in search_doc) any card of the tenant has had. Never shrinks: a lexeme no card has any more only
-- costs the lookup a row (a card's credit is checked against its own lexemes).
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
  FROM card_mcp.cards AS c, unnest(tsvector_to_array(c.search_doc)) AS w
ON CONFLICT DO NOTHING;
ANALYZE card_mcp.search_vocabulary;  -- its trigram index, not a scan of the tenant's whole vocabulary

-- New words of a statement's cards, once per statement, in word order (two writers never wait on each other in
-- opposite orders). SECURITY INVOKER: under the writer's own policy (its tenant's rows only).
CREATE FUNCTION card_mcp.learn_inserted_words() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
    SELECT DISTINCT n.tenant_id, w
      FROM new_cards AS n, unnest(tsvector_to_array(n.search_doc)) AS w
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
           unnest(tsvector_to_array(n.search_doc)) AS w
     WHERE n.search_doc IS DISTINCT FROM o.search_doc
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
-- digits; stop words are not searched. A card has a word when the word, stemmed, starts a word of its text
-- (full-text search, prefix match); a word of 4 letters or more it does not have it may resemble (a typo, a partial
-- word): the best trigram word-similarity (at least 0.5) of the card's own lexemes to the word's stem. With n searched words, of
-- which the card has e and resembles others by similarities summing to f, and r its full-text rank (cover density;
-- title 1.0 > tags 0.4 > content values 0.2 > content keys 0.1; scaled to [0, 1) by rank/(rank+1)):
--   score = (e + 0.5 x f / n + 0.5 x r) / (n + 1)
-- in [0, 1), and in [e / (n + 1), (e + 1) / (n + 1)): a card with more of the words always ranks higher. So the
-- cards that have every word are ranked first, alone (an AND of the words, which the index answers without
-- reading the cards that share one common word), and the others only while the page is not full. The score is a
-- function of the query and the card alone, so keyset paging on (score, id) never serves a card twice.
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
    SET pg_trgm.word_similarity_threshold = 0.5
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
    v_words text[];        -- the query's first 16 distinct words, lower case, in the order written
    v_word_ts tsquery[];   -- per searched word (no stop word): its stemmed lexemes as prefixes
    v_fuzzy text[];        -- per searched word: its stem where it is looked up by trigrams too (4 letters or more)
    v_n integer;           -- how many words are searched
    v_ts tsquery;          -- every word, any may match
    v_all tsquery;         -- every word, all must match
    v_similar_n bigint[];  -- (searched word's position, tenant's lexeme, similarity) of the tenant's lexemes similar
    v_similar_q tsquery[]; -- to a searched word's stem that the word's own prefixes do not match
    v_similar real[];
    v_similar_ts tsquery;  -- those lexemes, any may match
    v_found integer := 0;  -- cards that have every word, on this page
    v_top integer;         -- the most words a card below the previous page's last may have
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
    SELECT array_agg(per_word.q ORDER BY x.n),
           array_agg(CASE WHEN length(x.w) >= 4 THEN per_word.stem END ORDER BY x.n)
      INTO v_word_ts, v_fuzzy
      FROM unnest(v_words) WITH ORDINALITY AS x(w, n),
           LATERAL (SELECT to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) AS q, min(l) AS stem
                      FROM unnest(tsvector_to_array(to_tsvector('english', x.w))) AS l) AS per_word
     WHERE per_word.q IS NOT NULL;
    v_n := coalesce(cardinality(v_word_ts), 0);
    IF v_n = 0 THEN
        RETURN;  -- no words, or stop words only
    END IF;
    SELECT string_agg(q, ' | ')::tsquery, string_agg('(' || q || ')', ' & ')::tsquery INTO v_ts, v_all
      FROM unnest(v_word_ts::text[]) AS q;

    -- Per fuzzy word: the tenant's lexemes at least 0.5 similar to its stem that its own prefixes do not match
    -- (cards with those have the word already), best first.
    -- One word at a time: each lookup is its own trigram index scan.
    FOR i IN 1 .. v_n LOOP
        CONTINUE WHEN v_fuzzy[i] IS NULL;
        SELECT v_similar_n || array_agg(i::bigint ORDER BY sim.similarity DESC, sim.word),
               v_similar_q || array_agg(quote_literal(sim.word)::tsquery ORDER BY sim.similarity DESC, sim.word),
               v_similar || array_agg(sim.similarity ORDER BY sim.similarity DESC, sim.word)
          INTO v_similar_n, v_similar_q, v_similar
          FROM (SELECT v.word, word_similarity(v_fuzzy[i], v.word) AS similarity
                  FROM card_mcp.search_vocabulary AS v
                 WHERE v.tenant_id = v_tenant AND v.word %> v_fuzzy[i]
                   AND NOT quote_literal(v.word)::tsvector @@ v_word_ts[i]) AS sim;
    END LOOP;
    IF cardinality(v_similar_q) = 0 THEN
        v_similar_n := NULL;
    ELSE
        SELECT string_agg(DISTINCT q::text, ' | ')::tsquery INTO v_similar_ts FROM unnest(v_similar_q) AS q;
    END IF;

    -- The cards that have every word rank above all others: first them alone, unless an earlier page is past them.
    IF p_after_score IS NULL OR p_after_score >= v_n::double precision / (v_n + 1) THEN
        RETURN QUERY
        SELECT c.id, ((v_n + 0.5 * ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', c.search_doc, v_ts, 32))
                      / (v_n + 1))::double precision AS score
          FROM card_mcp.cards AS c
         WHERE c.tenant_id = v_tenant AND c.is_active AND c.search_doc @@ v_all
           AND (p_card_type IS NULL OR c.card_type = p_card_type)
           AND (p_tags IS NULL OR c.tags @> p_tags)
           AND (p_after_score IS NULL
                OR ((v_n + 0.5 * ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', c.search_doc, v_ts, 32)) / (v_n + 1), c.id)
                   < (p_after_score, p_after_id))
         ORDER BY 2 DESC, 1 DESC
         LIMIT p_limit;
        GET DIAGNOSTICS v_found = ROW_COUNT;
        IF v_found >= p_limit THEN
            RETURN;
        END IF;
    END IF;

    -- Then the cards with some of the words, or words like them, by how many words they have: only as many of
    -- those groups are scored as it takes to fill the page, counting as available only the groups below the one
    -- the previous page ended in (v_top; the score's e is floor(score x (n + 1)), the margin is for rounding).
    v_top := CASE WHEN p_after_score IS NULL THEN v_n ELSE floor(p_after_score * (v_n + 1) + 1e-6)::integer END;
    RETURN QUERY
    WITH partial AS MATERIALIZED (  -- the cards with some of the words, and how many (not their documents)
        SELECT c.id,
               (SELECT count(*) FROM unnest(v_word_ts) AS q(ts) WHERE c.search_doc @@ q.ts)::integer AS e
          FROM card_mcp.cards AS c
         WHERE c.tenant_id = v_tenant AND c.is_active AND c.search_doc @@ v_ts AND NOT c.search_doc @@ v_all
           AND (p_card_type IS NULL OR c.card_type = p_card_type)
           AND (p_tags IS NULL OR c.tags @> p_tags)
    ), groups AS (
        SELECT m.e, count(*) AS cards FROM partial AS m WHERE m.e < v_top GROUP BY m.e
    ), cut AS (  -- the fewest words a scored card has: enough cards with more, surely after the cursor
        SELECT coalesce(max(g.e) FILTER (WHERE g.available >= p_limit - v_found), 0) AS fewest
          FROM (SELECT groups.e, sum(groups.cards) OVER (ORDER BY groups.e DESC) AS available FROM groups) AS g
    ), candidates AS (  -- and, only when those do not fill the page, the cards with none but words like them
        SELECT m.id, m.e FROM partial AS m
        UNION ALL
        SELECT c.id, 0
          FROM card_mcp.cards AS c
         WHERE (SELECT cut.fewest FROM cut) = 0 AND v_similar_ts IS NOT NULL
           AND c.tenant_id = v_tenant AND c.is_active AND c.search_doc @@ v_similar_ts AND NOT c.search_doc @@ v_ts
           AND (p_card_type IS NULL OR c.card_type = p_card_type)
           AND (p_tags IS NULL OR c.tags @> p_tags)
    ), chosen AS MATERIALIZED (  -- the groups the page needs, their documents read again, one by primary key
        SELECT m.id, m.e,
               (SELECT d.search_doc FROM card_mcp.cards AS d WHERE d.tenant_id = v_tenant AND d.id = m.id) AS doc
          FROM candidates AS m
         WHERE m.e <= v_top AND m.e >= (SELECT cut.fewest FROM cut)
    ), credited AS (
        SELECT m.id, m.doc AS search_doc, m.e,
               CASE WHEN v_similar_n IS NULL THEN 0
                    ELSE (SELECT coalesce(sum(best.similarity), 0)
                            FROM (SELECT max(s.similarity) AS similarity
                                    FROM unnest(v_similar_n, v_similar_q, v_similar) AS s(n, q, similarity)
                                   WHERE m.doc @@ s.q AND NOT m.doc @@ v_word_ts[s.n]
                                   GROUP BY s.n) AS best) END AS f
          FROM chosen AS m
    ), scored AS (
        SELECT k.id,
               ((k.e + 0.5 * k.f / v_n + 0.5 * ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', k.search_doc, v_ts, 32))
                / (v_n + 1))::double precision AS score
          FROM credited AS k
    )
    SELECT s.id, s.score
      FROM scored AS s
     WHERE s.score > 0
       AND (p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id))
     ORDER BY s.score DESC, s.id DESC
     LIMIT p_limit - v_found;
END
$$;

-- One page of a search, as (id, score, kept), best first: p_limit + 1 rows at most, so the caller can tell whether
-- more exist; kept marks the page itself (at most p_limit hits and about p_max_bytes of cards, always the first).
-- Under the caller's own policy (SECURITY INVOKER), in the tenant set in its transaction.
--   no words (p_words NULL or empty): the newest-updated first, after (p_after_updated, p_after_id); score 0.
--   words: card_mcp.search_cards, after (p_after_score, p_after_id).
--   words and a query vector (p_vector, its model p_model; semantic search): a card's score is 0.2 x its lexical
--     score + 0.8 x its own vector's cosine similarity to the query, scaled from the model's floor..ceiling
--     (p_floor, p_ceiling) to 0..1: a function of the query and the card alone, so keyset paging on (score, id)
--     never serves a card twice. Candidates: every lexical match (uncapped), and the cards whose vectors are above
--     the floor: a tenant with at most 5,000 vectors compares every one (exact; a few thousand take a millisecond
--     or two); a bigger one takes its p_depth nearest through the HNSW index, whose iterative scan reads on, with
--     no tuple budget, until that many of its own are found (other tenants' vectors never starve it); the caller
--     grows p_depth with the pages already served, so page N never runs out of the candidates page 1 had.
CREATE FUNCTION card_mcp.search_page(
    p_words text, p_card_type text, p_tags text[], p_after_score double precision, p_after_updated timestamptz,
    p_after_id uuid, p_limit integer, p_max_bytes integer, p_vector text, p_model text, p_floor double precision,
    p_ceiling double precision, p_depth integer
) RETURNS TABLE (id uuid, score double precision, kept boolean)
    LANGUAGE plpgsql
    SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    IF coalesce(p_words, '') = '' THEN
        RETURN QUERY
        SELECT h.id, 0::double precision,
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes)
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
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes)
          FROM (SELECT s.id, s.score, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM card_mcp.search_cards(p_words, p_card_type, p_tags, p_after_score, p_after_id, p_limit + 1)
                       AS s
                  JOIN card_mcp.cards AS c ON c.id = s.id
                 WHERE c.is_active
                WINDOW w AS (ORDER BY s.score DESC, s.id DESC)) AS h
         ORDER BY h.n;
    ELSE
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '100', true),
                set_config('hnsw.max_scan_tuples', '2147483647', true);
        RETURN QUERY
        WITH lexical AS (
            SELECT s.id, s.score FROM card_mcp.search_cards(p_words, p_card_type, p_tags, NULL, NULL, NULL) AS s
        ), few AS (
            SELECT count(*) <= 5000 AS yes FROM (SELECT FROM card_mcp.card_vectors LIMIT 5001) AS v
        ), exact AS (
            SELECT v.card_id AS id
              FROM card_mcp.card_vectors AS v
             WHERE (SELECT f.yes FROM few AS f) AND v.model = p_model
               AND 1 - (v.embedding OPERATOR(card_mcp.<=>) p_vector::card_mcp.halfvec) > p_floor
        ), nearest AS (
            SELECT n.id
              FROM (SELECT c.id, 1 - (v.embedding OPERATOR(card_mcp.<=>) p_vector::card_mcp.halfvec) AS similarity
                      FROM card_mcp.card_vectors AS v
                      JOIN card_mcp.cards AS c ON c.tenant_id = v.tenant_id AND c.id = v.card_id
                     WHERE NOT (SELECT f.yes FROM few AS f) AND c.is_active AND v.model = p_model
                       AND (p_card_type IS NULL OR c.card_type = p_card_type)
                       AND (p_tags IS NULL OR c.tags @> p_tags)
                     ORDER BY v.embedding OPERATOR(card_mcp.<=>) p_vector::card_mcp.halfvec
                     LIMIT p_depth) AS n
             WHERE n.similarity > p_floor
        ), candidates AS (
            SELECT l.id FROM lexical AS l UNION SELECT e.id FROM exact AS e UNION SELECT n.id FROM nearest AS n
        ), fused AS (
            SELECT k.id,
                   (0.2 * coalesce(l.score, 0)
                    + 0.8 * least(greatest((coalesce(1 - (v.embedding OPERATOR(card_mcp.<=>)
                                                          p_vector::card_mcp.halfvec), 0)
                                            - p_floor) / (p_ceiling - p_floor), 0), 1))::double precision AS score
              FROM candidates AS k
              LEFT JOIN lexical AS l ON l.id = k.id
              LEFT JOIN card_mcp.card_vectors AS v ON v.card_id = k.id AND v.model = p_model
        )
        SELECT h.id, h.score,
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes)
          FROM (SELECT f.id, f.score, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM fused AS f
                  JOIN card_mcp.cards AS c ON c.id = f.id
                 WHERE c.is_active AND (p_after_score IS NULL OR (f.score, f.id) < (p_after_score, p_after_id))
                   AND (p_card_type IS NULL OR c.card_type = p_card_type)
                   AND (p_tags IS NULL OR c.tags @> p_tags)
                WINDOW w AS (ORDER BY f.score DESC, f.id DESC)
                 ORDER BY f.score DESC, f.id DESC
                 LIMIT p_limit + 1) AS h
         ORDER BY h.n;
    END IF;
END
$$;

-- search_cards as one statement (one round trip, like get_card_call): the tenant set transaction-locally, the page
-- ranked (card_mcp.search_page), its usage row written (`ok`, naming the cards of the page), committed with the
-- statement; the cards (kept: the page; one more unkept row when more exist). Only reads: its commit does not wait
-- for the WAL flush.
CREATE FUNCTION card_mcp.search_cards_call(
    p_tenant_id uuid, p_words text, p_card_type text, p_tags text[], p_after_score double precision,
    p_after_updated timestamptz, p_after_id uuid, p_limit integer, p_max_bytes integer, p_vector text, p_model text,
    p_floor double precision, p_ceiling double precision, p_depth integer,
    p_tool text, p_client_name text, p_client_version text, p_transport text, p_api_key_id uuid,
    p_elapsed_ms double precision, p_connection_id uuid, p_oauth_client_id text
) RETURNS TABLE (
    id uuid, card_type text, title text, content jsonb, tags text[], version integer, content_hash text,
    created_at timestamptz, updated_at timestamptz, score double precision, kept boolean
)
    LANGUAGE plpgsql
    SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
DECLARE
    v_ids uuid[];
    v_scores double precision[];
    v_kept boolean[];
BEGIN
    PERFORM set_config('app.current_tenant_id', p_tenant_id::text, true),
            set_config('synchronous_commit', 'off', true);
    SELECT array_agg(p.id ORDER BY n), array_agg(p.score ORDER BY n), array_agg(p.kept ORDER BY n)
      INTO v_ids, v_scores, v_kept
      FROM card_mcp.search_page(p_words, p_card_type, p_tags, p_after_score, p_after_updated, p_after_id, p_limit,
                                p_max_bytes, p_vector, p_model, p_floor, p_ceiling, p_depth)
           WITH ORDINALITY AS p(id, score, kept, n);
    PERFORM card_mcp.record_call(
        p_tenant_id, p_tool, 'ok', NULL,
        coalesce((SELECT array_agg(h.id ORDER BY h.n) FROM unnest(v_ids, v_kept) WITH ORDINALITY AS h(id, kept, n)
                   WHERE h.kept), '{}'::uuid[]),
        p_elapsed_ms + 1000 * extract(epoch FROM clock_timestamp() - statement_timestamp()),
        p_client_name, p_client_version, p_transport, p_api_key_id, p_connection_id, p_oauth_client_id
    );
    RETURN QUERY
    SELECT c.id, c.card_type, c.title, c.content, c.tags, c.version, c.content_hash, c.created_at, c.updated_at,
           h.score, h.kept
      FROM unnest(v_ids, v_scores, v_kept) WITH ORDINALITY AS h(id, score, kept, n)
      JOIN card_mcp.cards AS c ON c.id = h.id
     ORDER BY h.n;
END
$$;

REVOKE ALL ON FUNCTION card_mcp.search_page(text, text, text[], double precision, timestamptz, uuid, integer, integer,
    text, text, double precision, double precision, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_page(text, text, text[], double precision, timestamptz, uuid, integer,
    integer, text, text, double precision, double precision, integer) TO card_mcp_app;
REVOKE ALL ON FUNCTION card_mcp.search_cards_call(uuid, text, text, text[], double precision, timestamptz, uuid,
    integer, integer, text, text, double precision, double precision, integer, text, text, text, text, uuid,
    double precision, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_cards_call(uuid, text, text, text[], double precision, timestamptz, uuid,
    integer, integer, text, text, double precision, double precision, integer, text, text, text, text, uuid,
    double precision, uuid, text) TO card_mcp_app;
