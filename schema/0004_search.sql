-- Ranked search: a stored full-text document (weights: title A, tags B, content strings C) and a stored list of
-- the card's distinct words (unstemmed, lower case) for trigram similarity (typos, partial words), each with a
-- GIN index that leads with tenant_id (btree_gin), so one tenant's matches are found without reading the rest.
--
-- Row-level security and these indexes: the operators @@ and <% are not LEAKPROOF, so under a policy PostgreSQL
-- must not evaluate them before the policy's condition, and an index on them goes unused: a query with words
-- would read every card of the tenant. card_mcp.search_cards therefore runs as card_mcp_admin (SECURITY DEFINER;
-- the admin role's own policy lets it see rows, so no policy stands between the planner and the indexes) and
-- filters by the tenant setting itself. It returns ids and scores only; the caller reads the cards with its own
-- rights, under its own policy.

CREATE EXTENSION IF NOT EXISTS pg_trgm WITH SCHEMA card_mcp;
CREATE EXTENSION IF NOT EXISTS btree_gin WITH SCHEMA card_mcp;

-- The words of a text[] joined by spaces. array_to_string is STABLE in the catalog (element output functions could
-- in general depend on settings); for text[] it is immutable, which generated columns require.
CREATE FUNCTION card_mcp.join_words(words text[]) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    RETURN pg_catalog.array_to_string(words, ' ');

ALTER TABLE card_mcp.cards
    ADD COLUMN search_doc tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, title), 'A')
        || setweight(to_tsvector('english'::regconfig, card_mcp.join_words(tags)), 'B')
        || setweight(jsonb_to_tsvector('english'::regconfig, content, '["string"]'), 'C')
    ) STORED,
    ADD COLUMN search_words text GENERATED ALWAYS AS (
        card_mcp.join_words(tsvector_to_array(
            to_tsvector('simple'::regconfig, title)
            || to_tsvector('simple'::regconfig, card_mcp.join_words(tags))
            || jsonb_to_tsvector('simple'::regconfig, content, '["string"]')
        ))
    ) STORED;

CREATE INDEX cards_search_doc_idx ON card_mcp.cards USING gin (tenant_id, search_doc) WHERE is_active;
CREATE INDEX cards_search_words_idx ON card_mcp.cards USING gin (tenant_id, search_words card_mcp.gin_trgm_ops)
    WHERE is_active;

-- The active cards of the current tenant (app.current_tenant_id) that match p_query, best first, as (id, score):
-- at most p_limit of them, after the position (p_after_score, p_after_id) of a previous page, filtered by type
-- and by tags (all must match). A card matches when a word of the query, stemmed, starts a word of its text
-- (full-text search, prefix match), or, for a query word that no card of the tenant matches that way (a typo, a
-- partial word), when one of its words is similar to it (trigrams). The score, in [0, 1], depends only on the
-- query and the card, never on the other cards, so keyset paging on (score, id) neither repeats nor skips a card
-- while others are inserted (unless an insert makes a query's unmatched word match, which stops its trigram
-- lookup):
--   0.7 x full-text rank (cover density, title 1.0 > tags 0.4 > content 0.2, scaled to [0, 1) by rank/(rank+1))
-- + 0.3 x the share of the query's words the card has (a similar word counts its trigram word-similarity).
CREATE FUNCTION card_mcp.search_cards(
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
    v_words text[];        -- the query's distinct words, lower case, at most 16
    v_word_ts tsquery[];   -- per word: its stemmed lexemes as prefixes; NULL for a stop word
    v_ts tsquery;          -- all of them, any may match
    v_fuzzy text[];        -- the words looked up by trigrams too: 4 letters or more, not stop words
BEGIN
    IF v_tenant IS NULL THEN
        RETURN;  -- fail closed, like the policies
    END IF;
    SELECT array_agg(w) INTO v_words
      FROM (SELECT DISTINCT w
              FROM regexp_split_to_table(lower(left(p_query, 500)), '[^[:alnum:]]+') AS w
             WHERE w <> ''
             LIMIT 16) AS distinct_words;
    IF v_words IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(q ORDER BY n), array_agg(w ORDER BY n) FILTER (WHERE q IS NOT NULL AND length(w) >= 4)
      INTO v_word_ts, v_fuzzy
      FROM unnest(v_words) WITH ORDINALITY AS x(w, n),
           LATERAL (SELECT to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) AS q
                      FROM unnest(tsvector_to_array(to_tsvector('english', w))) AS l) AS per_word;
    -- Trigrams are for words the full-text search cannot place (typos, partial words): a word that some card of
    -- this tenant matches as it is goes without, which keeps common words from dragging in thousands of cards.
    SELECT array_agg(w) INTO v_fuzzy
      FROM unnest(v_fuzzy) AS w
     WHERE NOT EXISTS (SELECT FROM card_mcp.cards AS c
                        WHERE c.tenant_id = v_tenant AND c.is_active
                          AND c.search_doc @@ to_tsquery('simple', (SELECT string_agg(quote_literal(l) || ':*', ' | ')
                                                                     FROM unnest(tsvector_to_array(to_tsvector('english', w))) AS l)));
    SELECT tsquery_or_all INTO v_ts
      FROM (SELECT to_tsquery('simple', string_agg(quote_literal(l) || ':*', ' | ')) AS tsquery_or_all
              FROM unnest(tsvector_to_array(to_tsvector('english', array_to_string(v_words, ' ')))) AS l) AS t;

    RETURN QUERY
    WITH fts AS (
        SELECT c.id
          FROM card_mcp.cards AS c
         WHERE c.tenant_id = v_tenant AND c.is_active AND c.search_doc @@ v_ts
    ), fuzzy AS (  -- (card, word) for a word the card lacks but has a similar word to (a typo, a partial word)
        SELECT m.id, w.word, word_similarity(w.word, m.search_words) AS similarity
          FROM unnest(v_fuzzy) AS w(word),
               LATERAL (SELECT c.id, c.search_words
                          FROM card_mcp.cards AS c
                         WHERE c.tenant_id = v_tenant AND c.is_active AND c.search_words %> w.word) AS m
    ), fuzzy_by_card AS (
        SELECT f.id, sum(f.similarity) AS similarity FROM fuzzy AS f GROUP BY f.id
    ), candidates AS (
        SELECT coalesce(fts.id, f.id) AS id, coalesce(f.similarity, 0) AS fuzzy
          FROM fts FULL JOIN fuzzy_by_card AS f ON f.id = fts.id
    ), scored AS (
        SELECT c.id,
               0.7 * coalesce(ts_rank_cd('{0.1, 0.2, 0.4, 1.0}', c.search_doc, v_ts, 32), 0)
               + 0.3 * ((SELECT count(*) FROM unnest(v_word_ts) AS q WHERE c.search_doc @@ q) + m.fuzzy)
                     / cardinality(v_words) AS score
          FROM candidates AS m
          JOIN card_mcp.cards AS c ON c.tenant_id = v_tenant AND c.id = m.id
         WHERE (p_card_type IS NULL OR c.card_type = p_card_type)
           AND (p_tags IS NULL OR c.tags @> p_tags)
    )
    SELECT s.id, s.score::double precision
      FROM scored AS s
     WHERE p_after_score IS NULL OR (s.score, s.id) < (p_after_score, p_after_id)
     ORDER BY s.score DESC, s.id DESC
     LIMIT p_limit;
END
$$;

-- Owned by the admin role, whose policy lets it see every card, so the search indexes can be used; the function
-- itself keeps to the tenant set in the caller's transaction (no tenant set: no rows).
GRANT CREATE ON SCHEMA card_mcp TO card_mcp_admin;
ALTER FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer) OWNER TO card_mcp_admin;
REVOKE CREATE ON SCHEMA card_mcp FROM card_mcp_admin;
REVOKE ALL ON FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.search_cards(text, text, text[], double precision, uuid, integer)
    TO card_mcp_app, card_mcp_admin;
