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
-- active cards have postings: a delete removes them, a restore puts them back. No foreign key, to cards or to
-- tenants: a posting is only ever made from its card's row by the statement that wrote it, and a referential check
-- per posting (about 40 a card) would cost a 1000-card batch 40,000 index probes. card_mcp.erase_tenant finds the
-- table by its tenant_id column, as every tenant table.

CREATE TABLE card_mcp.search_postings (
    tenant_id  uuid NOT NULL,
    word       text COLLATE "C" NOT NULL,  -- a lexeme of the card's search_doc; "C": a prefix is a range
    card_id    uuid NOT NULL,
    weight     real NOT NULL               -- per occurrence in the card: 1.0 title, 0.4 tags, 0.2 values, 0.1 keys
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
     WHERE n.is_active
     ORDER BY 1, 2, 3;  -- in index order: each word's entries go in together, to pages already in memory
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

-- The full-text index over search_doc served the AND of the words, which the postings now answer: no statement
-- reads it any more, and every card write paid for it.
DROP INDEX card_mcp.cards_search_doc_idx;

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

-- A query's searched words, as every search reads them: its first 16 distinct words (lower case, letters and
-- digits) in the order written, numbered k from 1 in that order once stop words (no lexeme) are left out, with each
-- word's stemmed lexemes l, one row per (k, l).
-- PL/pgSQL, as search_typos below: its statements' plans are kept for the session, where an SQL function's are
-- made again on every call before PostgreSQL 18 (on a 250-card tenant that doubled a search's SQL time).
CREATE FUNCTION card_mcp.search_words(p_query text) RETURNS TABLE (k integer, w text, l text)
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH first_words AS (
        SELECT w, min(n) AS first
          FROM regexp_split_to_table(lower(left(p_query, 500)), '[^[:alnum:]]+') WITH ORDINALITY AS t(w, n)
         WHERE w <> ''
         GROUP BY w
         ORDER BY min(n)
         LIMIT 16
    )
    SELECT dense_rank() OVER (ORDER BY x.first)::integer, x.w, l
      FROM first_words AS x, unnest(tsvector_to_array(to_tsvector('english', x.w))) AS l;
END
$$;

-- The searched words (their k) that are looked up by trigrams as typos: words of 4 letters or more, no digit, that
-- start no word of the current tenant's active cards (they look misspelt; a word the tenant has is taken as
-- written). Decided on a search's first page and pinned in its cursor (search.py), so that a card with the right
-- spelling arriving between two pages changes no card's score: the score stays a function of the query, the card
-- and the cursor. Before, every such word was looked up, and in a 100,000-card tenant the postings of the words
-- merely like a correctly spelt one were two thirds of what the slowest searches read.
-- SECURITY DEFINER, like search_cards, and for the same reason: under the application role's policy the bounds of
-- a prefix's range were filters after the tenant's qual, not index conditions (2 million entries read per word).
CREATE FUNCTION card_mcp.search_typos(p_query text) RETURNS integer[]
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (
    SELECT coalesce(array_agg(x.k ORDER BY x.k), '{}')
      FROM (SELECT s.k, min(s.w) AS w, array_agg(s.l) AS stems FROM card_mcp.search_words(p_query) AS s GROUP BY s.k)
           AS x
     WHERE length(x.w) >= 4 AND x.w !~ '[[:digit:]]'
       AND NOT EXISTS (  -- one probe of the postings' index per stem
           SELECT FROM unnest(x.stems) AS stem
            WHERE EXISTS (
                SELECT FROM card_mcp.search_postings AS p
                 WHERE p.tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid)
                   AND p.word >= stem COLLATE "C"
                   AND p.word < (stem || CASE WHEN length(stem) >= 4 THEN chr(1114111) ELSE chr(1) END) COLLATE "C"))
    );
END
$$;
REVOKE ALL ON FUNCTION card_mcp.search_words(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_words(text) TO card_mcp_app;
REVOKE ALL ON FUNCTION card_mcp.search_typos(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_typos(text) TO card_mcp_app;

-- The active cards of the current tenant (app.current_tenant_id) that match p_query, best first, as (id, score):
-- at most p_limit of them (NULL: all), after the position (p_after_score, p_after_id) of a previous page, filtered
-- by type and by tags (all must match). The query's words are its first 16 distinct ones, lower case, letters and
-- digits; stop words are not searched. A card has a word when the word, stemmed, starts a word of its text
-- (prefix match; a stem of fewer than 4 letters must be the whole word: "us" is not a part of "usual", and the
-- prefixes "de", "la" or "us" matched a third of a tenant's cards); a word of 4 letters or more and no digit that it does not have, it may resemble (a typo, a
-- partial word): the best trigram word-similarity (at least 0.5) of the card's own lexemes to the word's stem.
-- With n searched words, of which the card has e and resembles others by similarities summing to f, and w the
-- weight of the words it has (per occurrence: title 1.0, tags 0.4, content values 0.2, content keys 0.1, the
-- weights cover density ranked them by before 0014):
--   score = (e + 0.5 x f / n + 0.5 x w / (w + 1)) / (n + 1)
-- in [0, 1), and in [e / (n + 1), (e + 1) / (n + 1)): a card with more of the words always ranks higher. Every
-- part of it is read from the posting lists (card_mcp.search_postings: the words' prefix ranges and the similar
-- lexemes, from the index alone), aggregated per card; no card is read, but for a type or tags filter. Before
-- 0014 the cards with every word were found by the full-text index and ranked by cover density (which also
-- rewarded the words close together): with prefixes of common words that AND cost 150-190 ms on a 100,000-card
-- tenant even when no card had every word, and 20 ms on a 1,000-card one. The score is a function of the query
-- and the card alone, so keyset paging on (score, id) never serves a card twice.
DROP FUNCTION card_mcp.search_cards_call(uuid, text, text, text[], double precision, timestamptz, uuid, integer,
    integer, text, text, double precision, double precision, integer, text, text, text, text, uuid, double precision,
    uuid, text);
DROP FUNCTION card_mcp.search_page(text, text, text[], double precision, timestamptz, uuid, integer, integer, text,
    text, double precision, double precision, integer);
DROP FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer);

CREATE FUNCTION card_mcp.search_cards(
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
AS $$
DECLARE
    v_tenant uuid := NULLIF(current_setting('app.current_tenant_id', true), '')::uuid;
    v_word_ts tsquery[];   -- per searched word (no stop word): its stemmed lexemes as prefixes
    v_typos integer[];     -- the words looked up as typos: p_typos, or decided now
    v_fuzzy text[];        -- per searched word: its stem where it is looked up as a typo (v_typos), else NULL
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
    -- The query read once: its first 16 distinct words in the order written; per searched word (stop words have no
    -- lexeme and are not searched) its tsquery of prefixes and its stem for the typo lookup; every (word, lexeme).
    WITH lexemes AS (
        SELECT * FROM card_mcp.search_words(p_query)
    ), per_word AS (
        SELECT k, min(w) AS w,
               to_tsquery('simple', string_agg(quote_literal(l) || CASE WHEN length(l) >= 4 THEN ':*' ELSE '' END,
                                               ' | ')) AS q,
               min(l) AS stem
          FROM lexemes
         GROUP BY k
    )
    SELECT (SELECT array_agg(q ORDER BY k) FROM per_word),
           (SELECT array_agg(CASE WHEN k = ANY (v_typos)
                                       AND length(w) >= 4 AND w !~ '[[:digit:]]'  -- a cursor's pin cannot widen it
                                  THEN stem END
                             ORDER BY k)
              FROM per_word),
           (SELECT array_agg(k ORDER BY k, l) FROM lexemes),
           (SELECT array_agg(l ORDER BY k, l) FROM lexemes)
      INTO v_word_ts, v_fuzzy, v_stem_n, v_stem;
    v_n := coalesce(cardinality(v_word_ts), 0);
    IF v_n = 0 THEN
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
                   AND NOT quote_literal(v.word)::tsvector @@ v_word_ts[i]) AS sim;
    END LOOP;

    -- Then the cards with some of the words, or words like them: counted and weighed from the postings alone (the
    -- index, no card read), best first; a card is read only for a type or tags filter.
    RETURN QUERY
    WITH hits AS (  -- per card and searched word: the weight of its lexemes that start with the word (has), or
                    -- the best similarity of its lexemes to the word (resembles); one pass, one aggregate
        SELECT p.card_id, s.n, sum(p.weight::double precision) AS weight, NULL::double precision AS similarity
          FROM unnest(v_stem_n, v_stem) AS s(n, stem)
          JOIN card_mcp.search_postings AS p
            ON p.tenant_id = v_tenant AND p.word >= s.stem COLLATE "C"
           AND p.word < (s.stem || CASE WHEN length(s.stem) >= 4 THEN chr(1114111) ELSE chr(1) END) COLLATE "C"
         GROUP BY p.card_id, s.n
        UNION ALL
        SELECT p.card_id, s.n, NULL, s.similarity::double precision
          FROM unnest(v_similar_n, v_similar_w, v_similar) AS s(n, word, similarity)
          JOIN card_mcp.search_postings AS p ON p.tenant_id = v_tenant AND p.word = s.word COLLATE "C"
    ), per_word AS (  -- a word the card has is not one it resembles
        SELECT h.card_id, max(h.weight) AS weight, CASE WHEN max(h.weight) IS NULL THEN max(h.similarity) END AS f
          FROM hits AS h
         GROUP BY h.card_id, h.n
    ), per_card AS (  -- sums in double precision, exact for these few float4 values: the same in any row order,
                      -- so a card's score cannot move by a rounding step between two pages planned differently
        SELECT k.card_id, count(k.weight) AS e, coalesce(sum(k.weight), 0) AS w, coalesce(sum(k.f), 0) AS f
          FROM per_word AS k
         GROUP BY k.card_id
    ), scored AS (
        SELECT m.card_id AS id, ((m.e + 0.5 * m.f / v_n + 0.5 * m.w / (m.w + 1)) / (v_n + 1))::double precision AS score
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

-- search_page and search_cards_call join the page's ids to cards by (tenant, id), the primary key, in so many
-- words: row-level security adds the tenant for the application role, but a caller it does not bind (a superuser,
-- as bench/search.py compares) joined on the id alone and hashed every card of every tenant (1.2 s at 1,000,000
-- cards); and search_page is declared to return about a page (ROWS 11), not a thousand rows, so a caller joining
-- its rows to cards (search.py's _PAGE) probes the primary key instead of hashing the tenant's cards (290 ms at
-- 100,000). Otherwise as in 0011.
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
        PERFORM set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', '100', true),
                set_config('hnsw.max_scan_tuples', '2147483647', true);
        RETURN QUERY
        WITH lexical AS (
            SELECT s.id, s.score
              FROM card_mcp.search_cards(p_words, p_card_type, p_tags, NULL, NULL, NULL, v_typos) AS s
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
               h.n = 1 OR (h.n <= p_limit AND h.bytes <= p_max_bytes), v_typos
          FROM (SELECT f.id, f.score, row_number() OVER w AS n,
                       sum(octet_length(c.content::text) + octet_length(c.title) + 300) OVER w AS bytes
                  FROM fused AS f
                  JOIN card_mcp.cards AS c ON c.tenant_id = v_tenant AND c.id = f.id
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
      JOIN card_mcp.cards AS c ON c.tenant_id = p_tenant_id AND c.id = h.id
     ORDER BY h.n;
END
$$;

REVOKE ALL ON FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer, integer[])
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer, integer[])
    TO card_mcp_app, card_mcp_admin;
REVOKE ALL ON FUNCTION card_mcp.search_page(text, text, text[], double precision, timestamptz, uuid, integer, integer,
    text, text, double precision, double precision, integer, integer[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_page(text, text, text[], double precision, timestamptz, uuid, integer,
    integer, text, text, double precision, double precision, integer, integer[]) TO card_mcp_app;
REVOKE ALL ON FUNCTION card_mcp.search_cards_call(uuid, text, text, text[], double precision, timestamptz, uuid,
    integer, integer, text, text, double precision, double precision, integer, integer[], text, text, text, text, uuid,
    double precision, uuid, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_cards_call(uuid, text, text, text[], double precision, timestamptz, uuid,
    integer, integer, text, text, double precision, double precision, integer, integer[], text, text, text, text, uuid,
    double precision, uuid, text) TO card_mcp_app;
