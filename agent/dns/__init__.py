"""The node's DNS proxy: every DNS query an endpoint sends reaches it (bpf/redirect.c sends port 53 here).

    zone.py      MeshZone: the mesh's own names (Services, ServiceEntry hosts, endpoints), pure
    message.py   the wire format through dnslib: parse a query, build answers and errors, pure
    cache.py     DnsCache (forwarded answers by their TTLs) and WireCache (ready answers), pure
    upstream.py  Upstreams: forwarding to the node's resolvers, bounded in time
    proxy.py     DnsProxy: UDP and TCP servers, the order of the steps, flows and counters

Part of the agent process: it runs one asyncio loop in a thread of its own (proxy.py says why).
"""
