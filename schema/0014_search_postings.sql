-- Search at any tenant size (issue #16): posting lists, so that ranking the cards that have only some of a query's
-- words reads small index entries instead of every such card's document.
--
-- Before, a query none of whose cards has every word (say eight words, each common) scored every card with any of
-- them: 18,274 cards of a 100,000-card tenant, each read, tested against every word and typo and ranked (939 ms).
-- Now card_mcp.search_postings holds, per tenant, one row per (lexeme, active card) with the lexeme's best field
-- in that card (title 1.0, tags 0.4, content values 0.2, content keys 0.1, the weights the ranking has always
-- given them), in one covering btree: a query word's prefix is one range of it, read from the index alone. The
-- cards with some of the words are counted and ranked by an aggregate over those entries (no card is read), and
-- only the page's cards are read afterwards. The cards with every word are still found by the full-text index and
-- ranked by cover density, as before.
--
-- Kept by statement-level triggers on card_mcp.cards (whatever writes cards writes its postings in the same
-- statement: one INSERT per statement, through the transition tables), under the writer's own policy. Only
-- active cards have postings: a delete removes them, a restore puts them back. No foreign key to cards, as for
-- card_versions: a posting is only ever made from its card's row by the statement that wrote it.

CREATE TABLE card_mcp.search_postings (
    tenant_id  uuid NOT NULL,
    word       text COLLATE "C" NOT NULL,  -- a lexeme of the card's search_doc; "C": a prefix is a range
    card_id    uuid NOT NULL,
    weight     real NOT NULL,              -- per occurrence in the card: 1.0 title, 0.4 tags, 0.2 values, 0.1 keys
    CONSTRAINT search_postings_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id)
);

ALTER TABLE card_mcp.search_postings ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.search_postings FORCE ROW LEVEL SECURITY;
CREATE POLICY search_postings_current ON card_mcp.search_postings FOR ALL TO card_mcp_app
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY search_postings_admin ON card_mcp.search_postings FOR ALL TO card_mcp_admin
    USING (true) WITH CHECK (true);
GRANT SELECT, INSERT, DELETE ON card_mcp.search_postings TO card_mcp_app;  -- a card's, as it is written
GRANT SELECT ON card_mcp.search_postings TO card_mcp_admin;

-- A lexeme's weight in a card, from its occurrences' weights in the card's search_doc (A title, B tags, C content
-- values, D content keys): the sum of 1.0, 0.4, 0.2 and 0.1 per occurrence, as cover density ranks a card for a
-- word it has (ts_rank_cd with the weights '{0.1, 0.2, 0.4, 1.0}' the ranking has always used).
-- An expression of built-ins, with no SET clause, so that PostgreSQL inlines it into the statements that call it.
CREATE FUNCTION card_mcp.posting_weight(p_weights text[]) RETURNS real
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN GREATEST(
    1.0 * pg_catalog.cardinality(pg_catalog.array_positions(p_weights, 'A'))
    + 0.4 * pg_catalog.cardinality(pg_catalog.array_positions(p_weights, 'B'))
    + 0.2 * pg_catalog.cardinality(pg_catalog.array_positions(p_weights, 'C'))
    + 0.1 * pg_catalog.cardinality(pg_catalog.array_positions(p_weights, 'D')),
    0.1)::real;
REVOKE ALL ON FUNCTION card_mcp.posting_weight(text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.posting_weight(text[]) TO card_mcp_app;  -- the triggers run as the writer

-- SECURITY INVOKER: under the writer's own policy (its tenant's rows only).
CREATE FUNCTION card_mcp.post_inserted_cards() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_postings (tenant_id, word, card_id, weight)
    SELECT n.tenant_id, l.lexeme, n.id, card_mcp.posting_weight(l.weights)
      FROM new_cards AS n, unnest(n.search_doc) AS l
     WHERE n.is_active;
    RETURN NULL;
END
$$;

-- A card whose words or activity changed: its old postings go (found by its old lexemes, through the primary key),
-- its new ones come, if it is active.
CREATE FUNCTION card_mcp.post_updated_cards() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    DELETE FROM card_mcp.search_postings AS p
     USING old_cards AS o
      JOIN new_cards AS n ON n.tenant_id = o.tenant_id AND n.id = o.id,
           unnest(tsvector_to_array(o.search_doc)) AS w
     WHERE o.is_active
       AND (n.search_doc IS DISTINCT FROM o.search_doc OR NOT n.is_active)
       AND p.tenant_id = o.tenant_id AND p.word = w AND p.card_id = o.id;
    INSERT INTO card_mcp.search_postings (tenant_id, word, card_id, weight)
    SELECT n.tenant_id, l.lexeme, n.id, card_mcp.posting_weight(l.weights)
      FROM new_cards AS n
      JOIN old_cards AS o ON o.tenant_id = n.tenant_id AND o.id = n.id,
           unnest(n.search_doc) AS l
     WHERE n.is_active
       AND (n.search_doc IS DISTINCT FROM o.search_doc OR NOT o.is_active);
    RETURN NULL;
END
$$;

CREATE TRIGGER cards_post_inserted AFTER INSERT ON card_mcp.cards
    REFERENCING NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.post_inserted_cards();
CREATE TRIGGER cards_post_updated AFTER UPDATE ON card_mcp.cards
    REFERENCING OLD TABLE AS old_cards NEW TABLE AS new_cards
    FOR EACH STATEMENT EXECUTE FUNCTION card_mcp.post_updated_cards();

-- The cards there are, after the triggers: CREATE TRIGGER locks cards against writes until this migration commits,
-- so no card written meanwhile is left without postings. (About 25 postings a card; 1,000,000 cards take minutes.)
INSERT INTO card_mcp.search_postings (tenant_id, word, card_id, weight)
SELECT c.tenant_id, l.lexeme, c.id, card_mcp.posting_weight(l.weights)
  FROM card_mcp.cards AS c, unnest(c.search_doc) AS l
 WHERE c.is_active;
-- The covering index the ranking reads, built once over the backfill (a sort) rather than row by row.
ALTER TABLE card_mcp.search_postings
    ADD CONSTRAINT search_postings_pkey PRIMARY KEY (tenant_id, word, card_id) INCLUDE (weight);
ANALYZE card_mcp.search_postings;

-- Typos are looked up for words of letters only: a number, a code or a version ("2009", "sku4471", "v2") has no
-- typo worth correcting, and every other number of the tenant resembles it ("topic123" is 0.5 like "topic456", so
-- one such query word matched a thousand lexemes, and twenty thousand cards). The vocabulary keeps no such word: in
-- a catalogue of numbered cards they were most of it, and every tenant's lookup scanned them in the trigram index.
DELETE FROM card_mcp.search_vocabulary WHERE word ~ '[[:digit:]]';
ANALYZE card_mcp.search_vocabulary;

CREATE OR REPLACE FUNCTION card_mcp.learn_inserted_words() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
    SELECT DISTINCT n.tenant_id, w
      FROM new_cards AS n, unnest(tsvector_to_array(n.search_doc)) AS w
     WHERE w !~ '[[:digit:]]'
     ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION card_mcp.learn_updated_words() RETURNS trigger
    LANGUAGE plpgsql SECURITY INVOKER
    SET search_path = pg_catalog, card_mcp, pg_temp
AS $$
BEGIN
    INSERT INTO card_mcp.search_vocabulary (tenant_id, word)
    SELECT DISTINCT n.tenant_id, w
      FROM new_cards AS n
      JOIN old_cards AS o ON o.tenant_id = n.tenant_id AND o.id = n.id,
           unnest(tsvector_to_array(n.search_doc)) AS w
     WHERE n.search_doc IS DISTINCT FROM o.search_doc AND w !~ '[[:digit:]]'
     ORDER BY 1, 2
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END
$$;

-- The active cards of the current tenant (app.current_tenant_id) that match p_query, best first, as (id, score):
-- at most p_limit of them (NULL: all), after the position (p_after_score, p_after_id) of a previous page, filtered
-- by type and by tags (all must match). The query's words are its first 16 distinct ones, lower case, letters and
-- digits; stop words are not searched. A card has a word when the word, stemmed, starts a word of its text
-- (prefix match); a word of 4 letters or more, no digit, it does not have it may resemble (a typo, a partial word): the best
-- trigram word-similarity (at least 0.5) of the card's own lexemes to the word's stem. With n searched words, of
-- which the card has e and resembles others by similarities summing to f:
--   a card with every word (e = n):  score = (n + 0.5 x r) / (n + 1), r its full-text rank (cover density, which
--     rewards the words close together; title 1.0 > tags 0.4 > content values 0.2 > content keys 0.1) scaled to
--     [0, 1) by rank / (rank + 1);
--   any other card:                  score = (e + 0.5 x f / n + 0.49 x w / n) / (n + 1), w the sum over the words
--     it has of each word's best field (the same weights, from card_mcp.search_postings).
-- in [0, 1), and in [e / (n + 1), (e + 1) / (n + 1)): a card with more of the words always ranks higher. So the
-- cards that have every word are ranked first, alone (an AND of the words, which the full-text index answers),
-- and the others, when the page is not full, from the posting lists alone. The score is a function of the query
-- and the card alone, so keyset paging on (score, id) never serves a card twice.
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
    v_word_ts tsquery[];   -- per searched word (no stop word): its stemmed lexemes as prefixes
    v_fuzzy text[];        -- per searched word: its stem where it is looked up by trigrams too (4+ letters, no digit)
    v_stem_n integer[];    -- (searched word's position, one of its stemmed lexemes): the prefixes of the postings
    v_stem text[];
    v_n integer;           -- how many words are searched
    v_ts tsquery;          -- every word, any may match
    v_all tsquery;         -- every word, all must match
    v_similar_n integer[]; -- (searched word's position, tenant's lexeme, similarity) of the tenant's lexemes similar
    v_similar_w text[];    -- to a searched word's stem that the word's own prefixes do not match
    v_similar real[];
    v_found integer := 0;  -- cards that have every word, on this page
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- fail closed, like the policies
    END IF;
    -- The query read once: its first 16 distinct words in the order written; per searched word (stop words have no
    -- lexeme and are not searched) its tsquery of prefixes and its stem for the typo lookup; every (word, lexeme).
    WITH first_words AS (
        SELECT w, min(n) AS first
          FROM regexp_split_to_table(lower(left(p_query, 500)), '[^[:alnum:]]+') WITH ORDINALITY AS t(w, n)
         WHERE w <> ''
         GROUP BY w
         ORDER BY min(n)
         LIMIT 16
    ), lexemes AS (
        SELECT dense_rank() OVER (ORDER BY x.first)::integer AS k, x.w, l
          FROM first_words AS x, unnest(tsvector_to_array(to_tsvector('english', x.w))) AS l
    ), per_word AS (
        SELECT k, min(w) AS w, to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) AS q,
               min(l) AS stem
          FROM lexemes
         GROUP BY k
    )
    SELECT (SELECT array_agg(q ORDER BY k) FROM per_word),
           (SELECT array_agg(CASE WHEN length(w) >= 4 AND w !~ '[[:digit:]]' THEN stem END ORDER BY k) FROM per_word),
           (SELECT string_agg(q::text, ' | ' ORDER BY k)::tsquery FROM per_word),
           (SELECT string_agg('(' || q::text || ')', ' & ' ORDER BY k)::tsquery FROM per_word),
           (SELECT array_agg(k ORDER BY k, l) FROM lexemes),
           (SELECT array_agg(l ORDER BY k, l) FROM lexemes)
      INTO v_word_ts, v_fuzzy, v_ts, v_all, v_stem_n, v_stem;
    v_n := coalesce(cardinality(v_word_ts), 0);
    IF v_n = 0 THEN
        RETURN;  -- no words, or stop words only
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
                   AND NOT quote_literal(v.word)::tsvector @@ v_word_ts[i]) AS sim;
    END LOOP;

    -- Then the cards with some of the words, or words like them: counted and weighed from the postings alone (the
    -- index, no card read), best first; a card is read only for a type or tags filter.
    RETURN QUERY
    WITH has AS (  -- per card and searched word it has: the weight of its lexemes that start with the word
        SELECT p.card_id, s.n, sum(p.weight) AS weight
          FROM unnest(v_stem_n, v_stem) AS s(n, stem)
          JOIN card_mcp.search_postings AS p
            ON p.tenant_id = v_tenant AND p.word >= s.stem COLLATE "C" AND p.word < (s.stem || chr(1114111)) COLLATE "C"
         GROUP BY p.card_id, s.n
    ), resembles AS (  -- per card and searched word it resembles: the best similarity of its lexemes to the word
        SELECT p.card_id, s.n, max(s.similarity) AS similarity
          FROM unnest(v_similar_n, v_similar_w, v_similar) AS s(n, word, similarity)
          JOIN card_mcp.search_postings AS p ON p.tenant_id = v_tenant AND p.word = s.word COLLATE "C"
         GROUP BY p.card_id, s.n
    ), per_card AS (
        SELECT k.card_id,
               count(*) FILTER (WHERE k.weight IS NOT NULL) AS e,
               coalesce(sum(k.weight), 0) AS w,
               coalesce(sum(k.similarity) FILTER (WHERE k.weight IS NULL), 0) AS f
          FROM (SELECT coalesce(h.card_id, r.card_id) AS card_id, h.weight, r.similarity
                  FROM has AS h FULL JOIN resembles AS r ON r.card_id = h.card_id AND r.n = h.n) AS k
         GROUP BY k.card_id
    ), scored AS (
        SELECT m.card_id AS id, ((m.e + 0.5 * m.f / v_n + 0.5 * m.w / (m.w + 1)) / (v_n + 1))::double precision AS score
          FROM per_card AS m
         WHERE m.e < v_n
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
     LIMIT p_limit - v_found;
END
$$;
