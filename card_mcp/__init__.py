"""card-mcp: brand cards for AI agents, kept in PostgreSQL and served over MCP."""

__version__ = "0.1.0"
