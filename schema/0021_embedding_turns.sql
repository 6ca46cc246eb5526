-- requires extension: vector 0.8.0
--
-- The embedding queue's turns (issue #16's follow-up to 0020). 0020 shared each batch among the tenants whose
-- oldest queued card is oldest; behind as many backlogs as a batch has cards (`card-mcp embed --all` queues every
-- tenant's cards at once) that was first in, first out again. Now half a batch's tenants are those, and the other
-- half a window of every queued tenant in id order, a window further each batch (semantic.py's _TAKE): this
-- sequence counts the batches. Behind any number of backlogs a tenant's turn comes within (tenants queued / half a
-- batch) batches. Optional like 0006 and 0020 (the queue exists only where pgvector does), and applied after them.

CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA card_mcp;

CREATE SEQUENCE card_mcp.embedding_turns;
GRANT USAGE ON SEQUENCE card_mcp.embedding_turns TO card_mcp_admin;
