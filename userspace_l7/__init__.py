"""The shared per-node L7 processor (SPEC §5).

Layout, one job per module:

- ``snapshot``      the frozen routing snapshot the processor reads (built from the JSON file the
  agent writes): services, their upstream hosts, VirtualServices and DestinationRules;
- ``routing``       pure routing decisions: VirtualService match, weighted pick, faults, retries (sans-IO);
- ``routecache``    routing decisions that need no dice, cached per snapshot;
- ``balancer``      per-(service, subset) load-balancer pickers (ROUND_ROBIN, LEAST_REQUEST, RANDOM, hash);
- ``outlier``       outlier detection as a pure state machine with an injected clock;
- ``http1``         sans-IO HTTP/1.1 on httptools: bytes in, events out, errors that name the culprit;
- ``pool``          upstream keep-alive connection pool (asyncio);
- ``tunnel``        upgraded connections (WebSocket and other Upgrades) spliced after the backend's 101;
- ``origdst``       where a redirected connection was going and who sent it, from the datapath's map;
- ``admission``     each client endpoint's share of a worker's file descriptors (sans-IO);
- ``listener``      the listening socket and its accept loop, which backs off when out of descriptors;
- ``policy_check``  the kernel's policy verdict on an upstream flow, asked before it is dialled;
- ``flags``         Envoy's response flags, the one table of why an answer is what it is;
- ``flow_export``   L7 flow records, batched to a file or the agent's unix socket;
- ``istio_metrics`` istio_* metrics, aggregated in plain dicts and exported at scrape time;
- ``server``        the only module that runs the proxy on asyncio/uvloop; ``__main__`` is its CLI.
"""
