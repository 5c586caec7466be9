"""The shared per-node L7 processor (SPEC §5).

Layout, one job per module:

- ``config``   the frozen snapshot the processor reads (built from the JSON file the agent writes);
- ``routing``  pure routing decisions: VirtualService match, weighted pick, faults, retries (sans-IO);
- ``balancer`` per-(service, subset) load-balancer pickers (ROUND_ROBIN, LEAST_REQUEST, RANDOM);
- ``outlier``  outlier detection as a pure state machine with an injected clock;
- ``http1``    sans-IO HTTP/1.1 on httptools: bytes in, events out, errors that name the culprit;
- ``pool``     upstream keep-alive connection pool (asyncio);
- ``flows``    L7 flow records, batched to a file or unix socket;
- ``metrics``  istio_* metrics, aggregated in plain dicts and exported at scrape time;
- ``server``   the only module that runs the proxy on asyncio/uvloop; ``__main__`` is its CLI.
"""
