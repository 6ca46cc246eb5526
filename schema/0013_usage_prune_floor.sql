-- usage_prune (schema/0010_lifecycle.sql) runs as the owner for the admin role, which may delete no usage row of its
-- own: with a cut-off in the future it dropped today's partition and the ones made ahead, and the default
-- partition's rows, every tenant's calls up to that moment. The cut-off now stops at the start of the current UTC
-- day: retention (CARD_MCP_USAGE_RETENTION_DAYS is at least 1) and `card-mcp usage prune` never need later, and
-- today's calls, and the days ahead, are beyond the admin role's reach. Otherwise as in 0010.

CREATE OR REPLACE FUNCTION card_mcp.usage_prune(p_before timestamptz, p_max integer)
    RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
    SET TimeZone = 'UTC'  -- the bounds below are read back as text; date_trunc('day', ...) is the UTC day
AS $$
#variable_conflict use_column
DECLARE
    r record;
    v_before timestamptz := least(p_before, date_trunc('day', now()));
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('card_mcp.card_usage partitions'));
    FOR r IN
        SELECT b.name, b.range_from, b.range_to
          FROM (SELECT c.relname::text AS name,
                       substring(pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \(''([^'']+)''\)')::timestamptz
                           AS range_from,
                       substring(pg_get_expr(c.relpartbound, c.oid) FROM 'TO \(''([^'']+)''\)')::timestamptz
                           AS range_to
                  FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
                 WHERE i.inhparent = 'card_mcp.card_usage'::regclass) AS b
         WHERE b.range_to <= v_before
         ORDER BY b.range_to
         LIMIT greatest(p_max, 0)
    LOOP
        EXECUTE format('DROP TABLE card_mcp.%I', r.name);
        partition_name := r.name;
        range_from := r.range_from;
        range_to := r.range_to;
        RETURN NEXT;
    END LOOP;
    DELETE FROM card_mcp.card_usage_default AS d WHERE d.called_at < v_before;
END
$$;
