"""The shared HTTP cache (RFC 9111): policy (pure decisions), store (SQLite WAL index + body
files), coalesce (one fetch per key, followers read while the writer writes), transaction (the trio
shell that drives a lookup: serve, revalidate, or fetch and store)."""
