-- The usage views of 0003 with their durations rounded to 0.1 ms, as `card-mcp usage` and the usage_stats tool
-- print them: a duration measured in Python to the nanosecond is not known to better than a tenth of a
-- millisecond, and 3.5987660003229394 costs a reader more than it tells. Same columns, same types (float8), so
-- the views are replaced in place and keep their grants; they read card_mcp.card_usage by name, whatever
-- migration made it.

CREATE OR REPLACE VIEW card_mcp.usage_daily WITH (security_invoker = true) AS
SELECT u.tenant_id,
       (u.called_at AT TIME ZONE 'UTC')::date AS day,
       u.tool,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p95_ms,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 GROUP BY u.tenant_id, 2, u.tool;

CREATE OR REPLACE VIEW card_mcp.usage_by_card WITH (security_invoker = true) AS
SELECT u.tenant_id,
       c.card_id,
       k.card_type,
       k.title,
       coalesce(k.is_active, false) AS active,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p95_ms,
       min(u.called_at) AS first_at,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 CROSS JOIN LATERAL unnest(u.card_ids) AS c(card_id)
  LEFT JOIN card_mcp.cards AS k ON k.tenant_id = u.tenant_id AND k.id = c.card_id
 GROUP BY u.tenant_id, c.card_id, k.card_type, k.title, k.is_active;

CREATE OR REPLACE VIEW card_mcp.usage_by_client WITH (security_invoker = true) AS
SELECT u.tenant_id,
       u.client_name,
       u.client_version,
       u.transport,
       count(*) AS calls,
       count(*) FILTER (WHERE u.status = 'error') AS errors,
       round((percentile_cont(0.5) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p50_ms,
       round((percentile_cont(0.95) WITHIN GROUP (ORDER BY u.duration_ms))::numeric, 1)::float8 AS p95_ms,
       min(u.called_at) AS first_at,
       max(u.called_at) AS last_at
  FROM card_mcp.card_usage AS u
 GROUP BY u.tenant_id, u.client_name, u.client_version, u.transport;
