"""How a request reaches its origin: connecting (connect.py) and reusing idle sockets (pool.py)."""
