"""The shipped examples are valid resources (the demo applies them)."""


from agent.resources import load_paths
from tests.paths import REPO

EXAMPLES = REPO / "examples"


def test_examples_validate():
    kinds = {r.kind for r in load_paths([str(EXAMPLES)])}
    assert {"CiliumNetworkPolicy", "NetworkPolicy", "Service", "VirtualService", "DestinationRule",
            "Namespace"} <= kinds


def test_namespaces_example_selects_as_its_comments_say():
    """storefront's pods reach payments' api on 8443, unlabelled namespaces do not; tier=gold on 9090."""
    from agent.labels import security_labels
    from agent.policy.compiler import PolicyInput, compile_policies
    from agent.policy.lookup import lookup
    from agent.policy.types import INGRESS, EndpointInfo, IdentityInfo
    from agent.state import namespace_labels

    resources = load_paths([str(EXAMPLES / "namespaces.yaml")])
    ns = namespace_labels(tuple(r.body for r in resources if r.kind == "Namespace"))
    labels = {
        300: security_labels({"app": "api"}, "payments", "default", ns.get("payments")),
        301: security_labels({"app": "checkout"}, "shop", "default", ns.get("shop")),
        302: security_labels({"app": "checkout"}, "default", "default", ns.get("default")),
    }
    c = compile_policies([PolicyInput.from_body(r.kind, r.body) for r in resources if r.kind != "Namespace"],
                         [IdentityInfo(i, lb) for i, lb in labels.items()],
                         [EndpointInfo(1, "api", "payments", "10.200.0.9", 300, labels[300])])

    def verdict(peer: int, port: int) -> str:
        return lookup(c.entries, c.enforcement, 1, INGRESS, peer, 6, port).verdict

    assert (verdict(301, 8443), verdict(302, 8443), verdict(301, 9090)) == ("ALLOWED", "DENIED", "DENIED")
    assert verdict(300, 9090) == "ALLOWED" and verdict(300, 8443) == "DENIED"


def test_l7_routing_example_routes_as_its_comments_say():
    import random

    from tests.unit.userspace_l7.helpers import req
    from userspace_l7.routing import route
    from userspace_l7.snapshot import Client, L7Config

    docs = {r.kind: r.body for r in load_paths([str(EXAMPLES / "l7-routing.yaml")])}
    config = L7Config.from_dict({
        "services": [{"name": "store", "namespace": "default", "vip": "10.96.0.40",
                      "ports": [{"port": 80, "target_port": 8080}],
                      "backends": [{"ip": "10.200.0.7", "labels": {"app": "store", "version": "v1"}},
                                   {"ip": "10.200.0.8", "labels": {"app": "store", "version": "v2"}}]}],
        "virtual_services": [docs["VirtualService"]], "destination_rules": [docs["DestinationRule"]]})
    dst, rng = ("10.96.0.40", 80), random.Random(0)
    assert route(config, req("/healthz", host="store"), dst, rng).local_body == b"ok"
    moved = route(config, req("/catalog/7", host="store"), dst, rng)
    assert moved.status == 301 and moved.local_headers == (("location", "http://store/items/"),)
    canary = Client("web-canary", "default", {"track": "canary"})
    assert route(config, req("/", host="store"), dst, rng, canary).subset == "v2"
    assert route(config, req("/", host="store"), dst, rng).subset == "v1"
    assert route(config, req("/", host="store", headers={"x-beta": "1"}), dst, rng).route_name == "beta"
    assert config.cluster(config.services[("default", "store")], 80, "").policy.hash_by == ("header", "x-user")


def test_node_config_example_loads_with_every_key():
    from agent.node_config import _KEYS, load

    path = EXAMPLES / "node" / "agent.yaml"
    load(str(path))
    import yaml

    assert set(yaml.safe_load(path.read_text())) == set(_KEYS) - {"node_ip"}, "every key but node_ip is shown"


def test_ipblock_example_means_what_its_comments_say():
    """NetworkPolicy ipBlocks match pods by address; the CiliumNetworkPolicy's CIDR matches none."""
    from agent import identity as ids
    from agent.labels import security_labels
    from agent.policy.compiler import PolicyInput, compile_policies
    from agent.policy.lookup import address_match, lookup
    from agent.policy.types import EGRESS, INGRESS, EndpointInfo, IdentityInfo

    pods = {"client": ({"role": "client"}, "10.200.0.20", 1001), "db": ({"app": "db"}, "10.200.0.53", 1002),
            "other": ({"app": "other"}, "10.200.0.30", 1003), "batch": ({"role": "batch"}, "10.200.0.40", 1004)}
    eps = [EndpointInfo(i, name, "default", ip, ident, security_labels(lbls, "default", "default"))
           for i, (name, (lbls, ip, ident)) in enumerate(pods.items(), 1)]
    c = compile_policies([PolicyInput.from_body(r.kind, r.body) for r in load_paths([str(EXAMPLES / "ipblock.yaml")])],
                         [IdentityInfo(e.identity, e.labels) for e in eps], eps)
    ipcache = {**c.cidr_identities, **{f"{e.ip}/32": e.identity for e in eps}}
    ep_id = {e.name: e.ep_id for e in eps}

    def decide(src: str, direction: int, peer: str, port: int) -> str:
        ip = pods[peer][1] if peer in pods else peer
        identity = address_match(ipcache, ip) or ids.WORLD
        return lookup(c.entries, c.enforcement, ep_id[src], direction, identity, 6, port, ip, c.ipblock_cidrs).verdict

    assert decide("client", EGRESS, "other", 80) == "ALLOWED"  # a pod, by its address
    assert decide("client", EGRESS, "10.8.1.5", 80) == "ALLOWED"
    assert decide("client", EGRESS, "db", 5432) == "DENIED"  # the except
    assert decide("client", EGRESS, "192.0.2.1", 80) == "DENIED"
    assert decide("db", INGRESS, "client", 5432) == "ALLOWED"  # 10.200.0.20/32
    assert decide("db", INGRESS, "other", 5432) == "DENIED"
    assert decide("batch", EGRESS, "10.8.1.5", 80) == "ALLOWED"  # outside the cluster
    assert decide("batch", EGRESS, "other", 80) == "DENIED"  # Cilium: a pod is not matched by its address


def test_fqdn_example_allows_as_its_comments_say():
    """examples/fqdn-policy.yaml: which names the client may look up, and which looked-up addresses
    it may reach on 443."""
    from agent.dns.rules import decide
    from agent.labels import security_labels
    from agent.policy.compiler import PolicyInput, compile_policies
    from agent.policy.lookup import lookup
    from agent.policy.types import EGRESS, EndpointInfo, IdentityInfo

    resources = load_paths([str(EXAMPLES / "fqdn-policy.yaml")])
    labels = security_labels({"app": "client"}, "default", "default")
    cache = {"client": {"api.example.com.": ("192.0.2.10",), "x.y.cdn.example.com.": ("192.0.2.20",),
                        "www.example.com.": ("192.0.2.30",)}}
    c = compile_policies([PolicyInput.from_body(r.kind, r.body) for r in resources], [IdentityInfo(300, labels)],
                         [EndpointInfo(1, "client", "default", "10.200.0.9", 300, labels)], fqdn=cache)
    may = {n: decide(c.dns[1], n).allowed for n in ("api.example.com", "example.com", "a.b.example.com",
                                                     "web.default.svc.cluster.local", "web", "db", "evil.test")}
    assert may == {"api.example.com": True, "example.com": True, "a.b.example.com": False,
                   "web.default.svc.cluster.local": True, "web": True, "db": False, "evil.test": False}

    def verdict(ip: str, port: int) -> str:
        return lookup(c.entries, c.enforcement, 1, EGRESS, c.cidr_identities[f"{ip}/32"], 6, port).verdict

    assert (verdict("192.0.2.10", 443), verdict("192.0.2.20", 443), verdict("192.0.2.10", 80)) == \
        ("ALLOWED", "ALLOWED", "DENIED")
    assert "192.0.2.30/32" not in c.cidr_identities  # www.example.com: looked up, selected by no toFQDNs
