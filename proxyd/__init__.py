"""proxyd: a forward HTTP/WebSocket proxy daemon.

How a request flows through the package (each arrow is a module boundary)::

    client socket -> server.py (accept loop, ACL, connection limit)
        -> client.py (h11 server role: one task per connection, the request loop)
        -> http.rules (validate, strip hop-by-hop fields, Via, Max-Forwards, loop check)
        -> CONNECT?  http.tunnel (a byte pump with half-close)
        -> else      upstream.pool (an idle keep-alive socket, or upstream.connect)
                     -> http.relay (request up, 1xx and response down, bodies streamed)
        -> observe: metrics, the access log, the admin listener (/metrics /healthz /readyz)

Policy (what to do) lives in plain synchronous modules that take the time as an argument;
the trio shells (server, client, relay, tunnel, pool) only do the I/O they are told to.
"""

__version__ = "0.1.0"
