"""Proxy auto-config (PAC): a JavaScript ``FindProxyForURL(url, host)`` decides the route list.

The pieces, in the order a script meets them:

* ``fetch.py``     the script's text from a file or an http(s) URL (a small h11 GET);
* ``script.py``    static facts about the text: version hash, whether results may be cached;
* ``engine.py``    one QuickJS context (``js.py`` is the typed wrapper of quickjs-ng) with our
                   helper library ``helpers.js`` (isPlainHostName ... FindProxyForURLEx) and the
                   script; time and memory limits; rebuilt after a runaway;
* ``thread.py``    the single OS thread every QuickJS call runs on;
* ``evaluator.py`` the trio side: runs evaluations on that thread and answers the script's DNS
                   questions between rounds, because JavaScript cannot call into Python;
* ``cache.py``     the LRU of results the router keeps for cacheable scripts;
* ``localaddr.py`` what ``myIpAddress()`` answers.

The router (routing/router.py) loads, refreshes and evaluates through these.
"""
