-- The order a card's content keys were written in (issue #16, ranking). jsonb keeps an object's keys shortest
-- first, and the model reads a card as text (semantic.card_text): from jsonb, "do" and "dont" came before
-- "summary", whoever wrote the summary first. On the tuned half of tests/data/relevance.json the model alone ranked
-- paraphrases at MRR 0.551 reading cards in jsonb's order and 0.652 in their authors' order (every generic order
-- tried, alphabetical, shortest or longest value first, strings before lists, 0.53 to 0.59: docs/benchmarks.md).
--
-- key_order holds the paths of the content's keys, depth first, in the order written (models.key_order: at most
-- 256 of them and 16 KiB, which covers more text than the model reads), e.g. [["summary"], ["facts"],
-- ["facts", "founded"]]; NULL where it is not known (cards written before this migration, or imported: read in
-- jsonb's order, as before). A card restored from an older version keeps its current order. It only orders the
-- text a card is embedded from: a key it does not list comes after those it lists, so a stale order never hides
-- anything. Not part of a card's identity: the content hash is taken over sorted keys, so content written again
-- in another order is the same card, in its first order.

ALTER TABLE card_mcp.cards ADD COLUMN key_order jsonb;
