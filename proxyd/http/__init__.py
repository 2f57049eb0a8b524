"""HTTP/1.1 as a forward proxy speaks it: targets and heads (messages), the rules between hops
(rules), client access checks (access), request/response relaying (relay), CONNECT tunnels (tunnel).
"""
