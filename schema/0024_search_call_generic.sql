-- search_cards_call's own statements planned once per session (issue #16, docs/benchmarks.md "Mixed HTTP
-- throughput"). Its three statements (the page gathered into arrays, the usage row naming the page's cards, and the
-- cards read by one probe of the primary key per hit) take their values from PL/pgSQL variables, so under the
-- default plan_cache_mode each could be planned again for every call: the function's own time (track_functions,
-- a 250-card tenant, 1,500 one-word searches in a loop as the application role) was 223 us of a 0.83 ms call, and
-- 95 us of a 0.59 ms call with its plans kept. Every one of them is a probe or a scan of what the page returned,
-- whose plan no value changes.
--
-- search_page keeps the default: the setting would reach the functions it calls, and its listing (a search without
-- words) needs a plan for the call's own values to seek a cursor's position in the index of updated cards. It
-- plans its big-tenant hybrid statement for the call's values itself (0015), and search_lexical and
-- search_hybrid_exact keep their generic plans (0016, 0019).

ALTER FUNCTION card_mcp.search_cards_call(
    uuid, text, text, text[], double precision, timestamptz, uuid, integer, integer, text, text, double precision,
    double precision, integer, integer[], text, text, text, text, uuid, double precision, uuid, text
) SET plan_cache_mode = force_generic_plan;

ALTER FUNCTION card_mcp.search_page(
    text, text, text[], double precision, timestamptz, uuid, integer, integer, text, text, double precision,
    double precision, integer, integer[]
) SET plan_cache_mode = auto;
