-- A typo's lookup in the tenant's vocabulary through a GiST index of (tenant, word trigrams) (issue #16).
--
-- card_mcp.search_cards looks a word the tenant lacks up among the tenant's lexemes (card_mcp.search_vocabulary)
-- for the ones like it (pg_trgm's word similarity, at least 0.5). The GIN index of 0011 over (tenant_id, word
-- trigrams) keeps one posting list per trigram across every tenant and one per tenant across its every word, and
-- intersecting those cost more than comparing the word with each of the tenant's lexemes: on a tenant of about
-- 2,900 lexemes (every tenant of the 1,000,000-card benchmark), 7 ms through the index, 5 ms by reading the
-- tenant's vocabulary whole (which is what the plan did), per typo word. A query in a language the tenant does
-- not write in has four or five such words, so 20-25 ms of a 1,000-card tenant's 25 ms p95 went here. A GiST index
-- over the same pair descends by tenant and then by trigram signature: 0.5-1.3 ms a word.
--
-- btree_gist gives GiST the tenant's uuid (it is a trusted extension: the database's owner may create it, as the
-- other extensions here). The GIN index is dropped: nothing else reads it.

CREATE EXTENSION IF NOT EXISTS btree_gist WITH SCHEMA card_mcp;

CREATE INDEX search_vocabulary_similar_idx ON card_mcp.search_vocabulary
    USING gist (tenant_id, word card_mcp.gist_trgm_ops);
DROP INDEX card_mcp.search_vocabulary_trgm_idx;
ANALYZE card_mcp.search_vocabulary;
