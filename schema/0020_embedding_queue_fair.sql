-- requires extension: vector 0.8.0
--
-- The embedding queue taken tenant by tenant (issue #16's follow-up). The worker took the oldest queued cards of
-- every tenant together, so a card one tenant wrote waited behind every card another tenant had queued before it:
-- a 10,000-card import, or `card-mcp embed --all`, kept a small tenant's new card out of semantic search for
-- minutes (found when tests/test_semantic.py's cards waited past their minute behind the rest of the suite's).
-- Now a batch is shared among the tenants whose oldest queued card is oldest (at most one tenant per card of the
-- batch), round robin: each one's oldest card first, then each one's second, and so on (semantic.py's _TAKE).
-- That reads each tenant's queue in order of age, which this index gives; the index over queued_at alone served
-- only the old order. Optional like 0006 (the queue exists only where pgvector does), and applied after it.

CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA card_mcp;

CREATE INDEX embedding_queue_tenant_queued_at_idx ON card_mcp.embedding_queue (tenant_id, queued_at, card_id);
DROP INDEX card_mcp.embedding_queue_queued_at_idx;
