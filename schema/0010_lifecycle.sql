-- A tenant's data from arrival to erasure (issue #22): the usage log partitioned by day so that retention drops whole
-- partitions instead of deleting rows; the functions that keep partitions ahead of time and prune old ones; the
-- owner's right to erase a tenant's rows in every tenant table (found from the catalog); and the audit log of
-- erasures, kept under no tenant.

-- 1. card_usage, partitioned by called_at (one partition per UTC day; the rows from before this file by month).
--
-- Every key now includes the partition key (PostgreSQL requires it of a unique key on a partitioned table), after
-- tenant_id, which still leads: (tenant_id, usage_id, called_at). The table is rebuilt in this transaction: the old
-- one is renamed, the new one made, its partitions made to cover every existing row, the rows copied with their ids,
-- the identity carried on, and the old one dropped. Either all of it commits or none. Inserts wait for the copy (the
-- old table is locked from the rename on); at the sizes a single machine keeps before retention that is seconds.

SET LOCAL lock_timeout = '30s';  -- a long analyst query holding the table makes the migration fail, not hang

DROP VIEW card_mcp.usage_daily, card_mcp.usage_by_card, card_mcp.usage_by_client;  -- remade below, on the new table

ALTER TABLE card_mcp.card_usage RENAME TO card_usage_before_0010;
ALTER INDEX card_mcp.card_usage_pkey RENAME TO card_usage_before_0010_pkey;
ALTER INDEX card_mcp.card_usage_tenant_time_idx RENAME TO card_usage_before_0010_tenant_time_idx;
ALTER SEQUENCE card_mcp.card_usage_usage_id_seq RENAME TO card_usage_before_0010_usage_id_seq;
-- FORCE binds the owner, which has no policy on the usage log: without this, the copy below would read no row.
ALTER TABLE card_mcp.card_usage_before_0010 NO FORCE ROW LEVEL SECURITY;

CREATE TABLE card_mcp.card_usage (
    tenant_id        uuid             NOT NULL,
    usage_id         bigint           GENERATED ALWAYS AS IDENTITY,
    tool             text             NOT NULL,
    status           text             NOT NULL,
    error_code       text,
    card_ids         uuid[]           NOT NULL DEFAULT '{}',
    duration_ms      double precision NOT NULL,
    client_name      text             NOT NULL DEFAULT 'unknown',
    client_version   text,
    transport        text             NOT NULL,
    api_key_id       uuid,
    called_at        timestamptz      NOT NULL DEFAULT now(),
    connection_id    uuid,
    oauth_client_id  text,
    CONSTRAINT card_usage_pkey PRIMARY KEY (tenant_id, usage_id, called_at),
    CONSTRAINT card_usage_tenant_fkey FOREIGN KEY (tenant_id) REFERENCES card_mcp.tenants (tenant_id),
    CONSTRAINT card_usage_status_valid CHECK (status IN ('ok', 'error')),
    CONSTRAINT card_usage_error_code_valid CHECK ((status = 'ok') = (error_code IS NULL)),
    CONSTRAINT card_usage_transport_valid CHECK (transport IN ('stdio', 'http', 'memory'))
) PARTITION BY RANGE (called_at);
CREATE INDEX card_usage_tenant_time_idx ON card_mcp.card_usage (tenant_id, called_at);

-- Row-level security on the parent: every query through card_usage (the only way any role but the owner reaches the
-- rows) is under these policies, the same as before this file. Enabled now, forced once the rows are copied in.
ALTER TABLE card_mcp.card_usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY card_usage_current ON card_mcp.card_usage FOR ALL TO card_mcp_app
    USING (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid))
    WITH CHECK (tenant_id = (SELECT NULLIF(current_setting('app.current_tenant_id', true), '')::uuid));
CREATE POLICY card_usage_admin ON card_mcp.card_usage FOR SELECT TO card_mcp_admin USING (true);
CREATE POLICY card_usage_analyst ON card_mcp.card_usage FOR SELECT TO card_mcp_analyst USING (true);
CREATE POLICY card_usage_reader ON card_mcp.card_usage FOR SELECT TO card_mcp_reader
    USING (tenant_id = (SELECT r.tenant_id FROM card_mcp.readers AS r WHERE r.role_name = current_user::text));
GRANT SELECT, INSERT ON card_mcp.card_usage TO card_mcp_app;
GRANT SELECT ON card_mcp.card_usage TO card_mcp_admin, card_mcp_analyst, card_mcp_reader;

-- One partition [p_from, p_to) named p_name, made the way that does not block the log: created alone, then attached
-- (ATTACH takes SHARE UPDATE EXCLUSIVE on card_usage, so inserts and reads go on; CREATE ... PARTITION OF would take
-- ACCESS EXCLUSIVE). A partition is reached only through card_usage, whose policies then apply; reached directly it
-- has row-level security enabled and forced and no policy and no grant, so it shows nobody anything. Rows that went
-- to the default partition in the range (inserted while no partition covered it) move into the new one first, which
-- ATTACH would otherwise refuse. The owner's only (no EXECUTE granted): usage_partitions_ensure and this file call it.
CREATE FUNCTION card_mcp.create_usage_partition(p_name text, p_from timestamptz, p_to timestamptz) RETURNS void
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE format('CREATE TABLE card_mcp.%I (LIKE card_mcp.card_usage INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                   p_name);
    EXECUTE format('ALTER TABLE card_mcp.%I ADD CONSTRAINT %I CHECK (called_at >= %L AND called_at < %L)',
                   p_name, p_name || '_range', p_from, p_to);  -- lets ATTACH skip its scan
    IF to_regclass('card_mcp.card_usage_default') IS NOT NULL THEN
        EXECUTE format('WITH moved AS (DELETE FROM card_mcp.card_usage_default WHERE called_at >= $1 AND called_at < $2'
                       ' RETURNING *) INSERT INTO card_mcp.%I SELECT * FROM moved', p_name)
            USING p_from, p_to;
    END IF;
    EXECUTE format('ALTER TABLE card_mcp.%I ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY', p_name);
    EXECUTE format('ALTER TABLE card_mcp.card_usage ATTACH PARTITION card_mcp.%I FOR VALUES FROM (%L) TO (%L)',
                   p_name, p_from, p_to);
    EXECUTE format('ALTER TABLE card_mcp.%I DROP CONSTRAINT %I', p_name, p_name || '_range');
END
$$;
REVOKE ALL ON FUNCTION card_mcp.create_usage_partition(text, timestamptz, timestamptz) FROM PUBLIC;

-- The old rows' partitions: a month each before the current UTC month (a long history would otherwise make thousands
-- of tables), a day each from the first of this month to a week ahead. Then the default partition, the safety net
-- that catches a row no partition covers (the clock of a server that stopped maintaining them), so an insert never
-- fails; the next maintenance moves such rows into their day's partition.
DO $$
DECLARE
    v_first timestamptz;
    v_month_start timestamptz := date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_day timestamptz;
BEGIN
    SELECT date_trunc('month', min(called_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' INTO v_first
      FROM card_mcp.card_usage_before_0010;
    v_day := least(coalesce(v_first, v_month_start), v_month_start);
    WHILE v_day < v_month_start LOOP
        PERFORM card_mcp.create_usage_partition(
            'card_usage_m' || to_char(v_day AT TIME ZONE 'UTC', 'YYYYMM'), v_day,
            (v_day AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC');
        v_day := (v_day AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
    END LOOP;
    WHILE v_day < (date_trunc('day', now() AT TIME ZONE 'UTC') + interval '8 days') AT TIME ZONE 'UTC' LOOP
        PERFORM card_mcp.create_usage_partition(
            'card_usage_p' || to_char(v_day AT TIME ZONE 'UTC', 'YYYYMMDD'), v_day, v_day + interval '1 day');
        v_day := v_day + interval '1 day';
    END LOOP;
END
$$;
CREATE TABLE card_mcp.card_usage_default PARTITION OF card_mcp.card_usage DEFAULT;
ALTER TABLE card_mcp.card_usage_default ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;

INSERT INTO card_mcp.card_usage
       (tenant_id, usage_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport,
        api_key_id, called_at, connection_id, oauth_client_id)
OVERRIDING SYSTEM VALUE
SELECT tenant_id, usage_id, tool, status, error_code, card_ids, duration_ms, client_name, client_version, transport,
       api_key_id, called_at, connection_id, oauth_client_id
  FROM card_mcp.card_usage_before_0010;
-- New ids go on from the old ones (ids are unique per tenant and called_at; kept increasing for whoever reads them).
SELECT setval(pg_get_serial_sequence('card_mcp.card_usage', 'usage_id'),
              greatest((SELECT max(usage_id) FROM card_mcp.card_usage_before_0010), 0) + 1, false);
DROP TABLE card_mcp.card_usage_before_0010;
ALTER TABLE card_mcp.card_usage FORCE ROW LEVEL SECURITY;

-- The views of 0003, unchanged, over the new table (a view follows a table by identity, not by name).
CREATE VIEW card_mcp.usage_daily WITH (security_invoker = true) AS
SELECT u.tenant_id,
       (u.called_at AT TIME ZONE 'UTC')::date AS day,
       u.tool,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms) AS p95_ms,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 GROUP BY u.tenant_id, 2, u.tool;

CREATE VIEW card_mcp.usage_by_card WITH (security_invoker = true) AS
SELECT u.tenant_id,
       c.card_id,
       k.card_type,
       k.title,
       coalesce(k.is_active, false) AS active,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms) AS p95_ms,
       min(u.called_at) AS first_at,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 CROSS JOIN LATERAL unnest(u.card_ids) AS c(card_id)
  LEFT JOIN card_mcp.cards AS k ON k.tenant_id = u.tenant_id AND k.id = c.card_id
 GROUP BY u.tenant_id, c.card_id, k.card_type, k.title, k.is_active;

CREATE VIEW card_mcp.usage_by_client WITH (security_invoker = true) AS
SELECT u.tenant_id,
       u.client_name,
       u.client_version,
       u.transport,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms) AS p95_ms,
       min(u.called_at) AS first_at,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 GROUP BY u.tenant_id, u.client_name, u.client_version, u.transport;

GRANT SELECT ON card_mcp.usage_daily, card_mcp.usage_by_card, card_mcp.usage_by_client
    TO card_mcp_app, card_mcp_admin, card_mcp_analyst, card_mcp_reader;

-- 2. Partition maintenance, for the running server (the admin role) and `card-mcp migrate` / `usage prune`.

-- The daily partitions from today (UTC) to p_days_ahead days ahead (0-90) that do not exist yet, made; and the rows
-- that fell into the default partition moved into theirs. Returns the partitions made. Waits at most 2 seconds for a
-- lock (a long query on card_usage): it fails then and the next turn tries again, well before a day is missing.
CREATE FUNCTION card_mcp.usage_partitions_ensure(p_days_ahead integer) RETURNS SETOF text
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
AS $$
DECLARE
    v_today timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    v_day timestamptz;
    v_name text;
BEGIN
    -- One at a time across servers (several HTTP instances run this hourly); the second finds the work done.
    PERFORM pg_advisory_xact_lock(hashtext('card_mcp.card_usage partitions'));
    -- Days whose rows went to the default partition first (earliest first), then the days ahead.
    FOR v_day IN
        SELECT DISTINCT date_trunc('day', d.called_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
          FROM card_mcp.card_usage_default AS d
        UNION
        SELECT v_today + n * interval '1 day' FROM generate_series(0, least(greatest(p_days_ahead, 0), 90)) AS n
        ORDER BY 1
    LOOP
        v_name := 'card_usage_p' || to_char(v_day AT TIME ZONE 'UTC', 'YYYYMMDD');
        CONTINUE WHEN to_regclass('card_mcp.' || v_name) IS NOT NULL;
        PERFORM card_mcp.create_usage_partition(v_name, v_day, v_day + interval '1 day');
        RETURN NEXT v_name;
    END LOOP;
END
$$;

-- Drop the oldest p_max partitions that hold only rows called before p_before (their upper bound is at or before it),
-- and delete the default partition's rows before it (the safety net holds few rows, if any). A partition that
-- straddles the cut-off stays whole: retention never deletes rows of a kept partition. Returns the partitions dropped
-- with their bounds. Dropping takes ACCESS EXCLUSIVE on card_usage until the transaction ends (about 25 ms a
-- partition), so callers drop one at a time, a transaction each, and inserts go on between; it waits at most 2
-- seconds for the lock.
CREATE FUNCTION card_mcp.usage_prune(p_before timestamptz, p_max integer)
    RETURNS TABLE (partition_name text, range_from timestamptz, range_to timestamptz)
    LANGUAGE plpgsql
    SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    SET lock_timeout = '2s'
    SET TimeZone = 'UTC'  -- the bounds below are read back as text
AS $$
#variable_conflict use_column
DECLARE
    r record;
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
         WHERE b.range_to <= p_before
         ORDER BY b.range_to
         LIMIT greatest(p_max, 0)
    LOOP
        EXECUTE format('DROP TABLE card_mcp.%I', r.name);
        partition_name := r.name;
        range_from := r.range_from;
        range_to := r.range_to;
        RETURN NEXT;
    END LOOP;
    DELETE FROM card_mcp.card_usage_default AS d WHERE d.called_at < p_before;
END
$$;

-- The owner may read and delete the default partition's rows (the functions above run as the owner, and FORCE binds
-- it); nobody else has a policy there.
CREATE POLICY card_usage_default_owner ON card_mcp.card_usage_default FOR ALL TO CURRENT_USER
    USING (true) WITH CHECK (true);

REVOKE ALL ON FUNCTION card_mcp.usage_partitions_ensure(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION card_mcp.usage_prune(timestamptz, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION card_mcp.usage_partitions_ensure(integer) TO card_mcp_admin;
GRANT EXECUTE ON FUNCTION card_mcp.usage_prune(timestamptz, integer) TO card_mcp_admin;

-- 3. Erasing a tenant (`card-mcp tenants delete`, through the owner's URL).
--
-- The owner may read and delete the rows of every table that has a tenant_id column, through policies of its own
-- (FORCE binds the owner too): card_mcp.erase_policies_ensure gives them to every such table that lacks them. This
-- file runs it for the tables that exist now; card_mcp.erase_tenant runs it again first, so a tenant table added
-- later (or the optional pgvector tables of 0006, applied whenever the extension appears) is never left out of an
-- erase. On tenants, a FOR UPDATE lock too: the erase holds the tenant's row against new rows that would point to it.
CREATE FUNCTION card_mcp.erase_policies_ensure() RETURNS SETOF text
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t text;
    v_owner oid := (SELECT r.oid FROM pg_roles AS r WHERE r.rolname = current_user);
BEGIN
    FOR t IN
        SELECT c.relname::text
          FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
         WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
           AND a.attname = 'tenant_id' AND NOT a.attisdropped
           AND NOT EXISTS (SELECT FROM pg_policy AS p
                            WHERE p.polrelid = c.oid AND p.polname = c.relname || '_owner_erase'
                              AND v_owner = ANY (p.polroles))
         ORDER BY 1
    LOOP
        EXECUTE format('CREATE POLICY %I ON card_mcp.%I FOR SELECT TO %I USING (true)',
                       t || '_owner_erase_read', t, current_user);
        EXECUTE format('CREATE POLICY %I ON card_mcp.%I FOR DELETE TO %I USING (true)',
                       t || '_owner_erase', t, current_user);
        IF t = 'tenants' THEN
            EXECUTE format('CREATE POLICY tenants_owner_erase_lock ON card_mcp.tenants FOR UPDATE TO %I'
                           ' USING (true) WITH CHECK (false)', current_user);
        END IF;
        RETURN NEXT t;
    END LOOP;
END
$$;
REVOKE ALL ON FUNCTION card_mcp.erase_policies_ensure() FROM PUBLIC;
SELECT count(*) FROM card_mcp.erase_policies_ensure();

-- One line per erased tenant: its id and name, what was removed from each table, who erased it and when. The audit
-- of an erasure outlives the tenant, so it belongs to no tenant: no tenant_id column (an erase deletes from every
-- table that has one), readable by the owner and the analyst role.
CREATE TABLE card_mcp.tenant_erasures (
    erasure_id     bigint      GENERATED ALWAYS AS IDENTITY,
    erased_tenant  uuid        NOT NULL,
    tenant_name    text        NOT NULL,
    removed        jsonb       NOT NULL,  -- {"table": rows, ...}
    erased_by      text        NOT NULL DEFAULT current_user,
    erased_at      timestamptz NOT NULL DEFAULT now(),
    duration_ms    double precision NOT NULL,
    CONSTRAINT tenant_erasures_pkey PRIMARY KEY (erasure_id)
);
ALTER TABLE card_mcp.tenant_erasures ENABLE ROW LEVEL SECURITY;
ALTER TABLE card_mcp.tenant_erasures FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_erasures_owner ON card_mcp.tenant_erasures FOR ALL TO CURRENT_USER USING (true) WITH CHECK (true);
CREATE POLICY tenant_erasures_analyst ON card_mcp.tenant_erasures FOR SELECT TO card_mcp_analyst USING (true);
GRANT SELECT ON card_mcp.tenant_erasures TO card_mcp_analyst;

-- Erase the tenant called p_name: every row whose tenant_id is its id, in every table of the schema that has a
-- tenant_id column (found in the catalog now, so tables added later are included), children before the tables
-- their foreign keys point to, tenants last; then the audit line. Returns (table, rows removed) per table. Runs in
-- the caller's transaction: all of it or nothing. Deleting the tenant's API keys announces each on the revocation
-- channel (schema/0008_oauth.sql), so running servers forget them at once. no_data_found (P0002) for an unknown
-- name.
-- SECURITY INVOKER, EXECUTE for nobody but the owner (who alone has the policies it relies on).
CREATE FUNCTION card_mcp.erase_tenant(p_name text) RETURNS TABLE (table_name text, rows_removed bigint)
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    v_tenant uuid;
    v_started timestamptz := clock_timestamp();
    v_left text[];
    v_next text[];
    v_rows bigint;
    v_removed jsonb := '{}';
    t text;
BEGIN
    PERFORM card_mcp.erase_policies_ensure();
    -- Locked until the end: a call that is writing a row of this tenant finishes first (and its row is erased),
    -- and none starts (its foreign key to tenants waits for this lock, then finds no tenant).
    SELECT x.tenant_id INTO v_tenant FROM card_mcp.tenants AS x WHERE x.name = p_name FOR UPDATE;
    IF v_tenant IS NULL THEN
        RAISE EXCEPTION 'no tenant %', p_name USING ERRCODE = 'no_data_found';
    END IF;
    SELECT array_agg(c.relname::text ORDER BY c.relname) INTO v_left
      FROM pg_class AS c JOIN pg_attribute AS a ON a.attrelid = c.oid
     WHERE c.relnamespace = 'card_mcp'::regnamespace AND c.relkind IN ('r', 'p') AND NOT c.relispartition
       AND a.attname = 'tenant_id' AND NOT a.attisdropped;
    -- Children first: a table is deleted from once no table still waiting has a foreign key to it.
    WHILE cardinality(v_left) > 0 LOOP
        SELECT array_agg(x ORDER BY x) INTO v_next
          FROM unnest(v_left) AS x
         WHERE NOT EXISTS (SELECT FROM pg_constraint AS f JOIN pg_class AS child ON child.oid = f.conrelid
                            WHERE f.contype = 'f' AND f.confrelid = ('card_mcp.' || quote_ident(x))::regclass
                              AND child.relname::text = ANY (v_left) AND child.relname::text <> x);
        IF v_next IS NULL THEN
            RAISE EXCEPTION 'foreign keys in a circle among %', array_to_string(v_left, ', ');
        END IF;
        FOREACH t IN ARRAY v_next LOOP
            EXECUTE format('DELETE FROM card_mcp.%I WHERE tenant_id = $1', t) USING v_tenant;
            GET DIAGNOSTICS v_rows = ROW_COUNT;
            v_removed := v_removed || jsonb_build_object(t, v_rows);
            table_name := t;
            rows_removed := v_rows;
            RETURN NEXT;
        END LOOP;
        v_left := ARRAY(SELECT x FROM unnest(v_left) AS x WHERE x <> ALL (v_next));
    END LOOP;
    INSERT INTO card_mcp.tenant_erasures (erased_tenant, tenant_name, removed, duration_ms)
    VALUES (v_tenant, p_name, v_removed, 1000 * extract(epoch FROM clock_timestamp() - v_started));
END
$$;
REVOKE ALL ON FUNCTION card_mcp.erase_tenant(text) FROM PUBLIC;
