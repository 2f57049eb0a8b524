"""Watching the daemon: metrics (every metric defined once), the access log, the admin listener."""
