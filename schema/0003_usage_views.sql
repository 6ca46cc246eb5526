-- Views for analysts over the usage log. security_invoker: they run with the reader's rights, so row-level
-- security still applies. The application role with app.current_tenant_id set sees one tenant; with no tenant
-- set, nothing; the admin role sees every tenant. Durations are milliseconds; days are UTC.

-- Calls per UTC day and tool.
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

-- Calls that read or wrote each card, with the card's type and title (also for cards deleted since).
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

-- Calls per client (MCP client name and version, as the client reported them) and transport.
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
    TO card_mcp_app, card_mcp_admin;
