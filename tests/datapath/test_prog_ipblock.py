"""NetworkPolicy ipBlocks matched by address in the kernel (bpf/lib/policy.h policy_lookup_by_address),
against its Python mirror (agent/policy/lookup.py) and against CiliumNetworkPolicy's CIDR meaning.

BPF_PROG_TEST_RUN on the TC programs (conftest.py tc_datapath): no agent, no namespaces. The maps hold
what agent/reconcile.py compute() writes for one endpoint under policies the real compiler compiled:
the ipcache (CIDR prefixes, then every endpoint's /32 over them), ipblock_cidrs, the policy entries
and the endpoint's enforcement.
"""

from __future__ import annotations

import ipaddress
import random

import pytest
from scapy.all import IP, TCP, UDP, Ether

from agent import identity as ids
from agent.datapath import maps
from agent.datapath.testrun import run_skb
from agent.labels import security_labels
from agent.policy.compiler import PolicyInput, compile_policies
from agent.policy.lookup import address_match, lookup
from agent.policy.types import EGRESS, INGRESS, CompiledPolicy, EndpointInfo, Enforcement, IdentityInfo

TC_ACT_OK, TC_ACT_SHOT = 0, 2
IFINDEX = 1  # the test run needs a real device: loopback
EP_IP, EP_ID, EP_IDENTITY = "10.0.0.2", 7, 1000
EVENT_FLOW_NEW, EVENT_DROP = 1, 2
VERDICTS = {1: "ALLOWED", 2: "DENIED", 6: "AUDIT"}
MATCH = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all"}

# Peers with an identity of their own: two pods of this node, a pod of another node, the host.
PODS = {"a": ("10.0.0.3", 2000), "b": ("10.0.0.4", 2001), "r": ("10.1.0.5", 3000)}
HOST_IP = "10.0.0.1"
WORLD_IPS = ("10.0.0.77", "10.2.0.9", "192.0.2.4")
LABELS = {identity: security_labels({"app": app}, "default", "default") for app, (_, identity) in PODS.items()}
LABELS[EP_IDENTITY] = security_labels({"app": "web"}, "default", "default")


def np_doc(name: str, spec: dict) -> PolicyInput:
    return PolicyInput("NetworkPolicy", "default", name, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec}, False)


def cnp_doc(name: str, spec: dict) -> PolicyInput:
    return PolicyInput("CiliumNetworkPolicy", "default", name, {
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": name, "namespace": "default"}, "spec": spec}, False)


def compile_for_web(*policies: PolicyInput) -> CompiledPolicy:
    return compile_policies(list(policies), [IdentityInfo(i, dict(lbls)) for i, lbls in LABELS.items()],
                            [EndpointInfo(EP_ID, "web", "default", EP_IP, EP_IDENTITY, dict(LABELS[EP_IDENTITY]))])


def load(dp, c: CompiledPolicy) -> None:
    """The maps as compute() fills them for this node (and as Sync bumps the revision after)."""
    for name in ("ipcache", "ipblock_cidrs", "policy_map"):
        dp.table(name).clear()
    ipcache = dict(c.cidr_identities)
    ipcache[f"{HOST_IP}/32"] = ids.HOST
    for ip, identity in (*PODS.values(), (EP_IP, EP_IDENTITY)):
        ipcache[f"{ip}/32"] = identity
    for prefix, identity in ipcache.items():
        dp.table("ipcache")[maps.ipcache_key_to_c(prefix)] = maps.IpcacheEntryC(identity=identity)
    for prefix, identity in c.ipblock_cidrs.items():
        dp.table("ipblock_cidrs")[maps.ipcache_key_to_c(prefix)] = maps.IpcacheEntryC(identity=identity)
    for key, entry in c.entries.items():
        dp.table("policy_map")[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(key, entry)
    off = Enforcement(False)
    dp.write_endpoint(IFINDEX, maps.endpoint_info_to_c(EP_IP, EP_IDENTITY, EP_ID,
                                                       c.enforcement.get((EP_ID, INGRESS), off),
                                                       c.enforcement.get((EP_ID, EGRESS), off)))
    dp.bump_policy_revision()


_sports = iter(range(20000, 65000))


def syn(direction: int, peer_ip: str, proto: int = 6, dport: int = 80, sport: int | None = None):
    sport = sport or next(_sports)
    l4 = TCP(sport=sport, dport=dport, flags="S") if proto == 6 else UDP(sport=sport, dport=dport)
    src, dst = (EP_IP, peer_ip) if direction == EGRESS else (peer_ip, EP_IP)
    # MACs given: scapy would otherwise ARP for them (about 0.15 s a packet)
    return Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src=src, dst=dst) / l4


def kernel(dp, direction: int, pkt) -> tuple[str, int, str]:
    """(verdict, rule id, match) of the event the first packet of a flow emits (a drop's match: none)."""
    prog = "from_container" if direction == EGRESS else "to_container"
    retval = run_skb(dp.functions[prog].fd, bytes(pkt), ifindex=IFINDEX).retval
    dp.drain_events()
    ev = dp.events[-1]
    assert ev.type in (EVENT_FLOW_NEW, EVENT_DROP)
    assert (retval == TC_ACT_OK) == (ev.type == EVENT_FLOW_NEW)
    return VERDICTS[ev.verdict], ev.rule_id, MATCH[ev.match]


def mirror(c: CompiledPolicy, direction: int, peer_ip: str, proto: int = 6, port: int = 80) -> tuple[str, int, str]:
    ipcache = {**c.cidr_identities, f"{HOST_IP}/32": ids.HOST, **{f"{ip}/32": i for ip, i in PODS.values()}}
    identity = address_match(ipcache, peer_ip) or ids.WORLD
    v = lookup(c.entries, c.enforcement, EP_ID, direction, identity, proto, port, peer_ip, c.ipblock_cidrs)
    return v.verdict, v.rule_id, v.match


def rule_path(c: CompiledPolicy, rule_id: int) -> str:
    return c.rules[rule_id].path


# ---- the cases the issue names ----------------------------------------------------------------

EXCEPT_B = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/4", "except": ["10.0.0.4/32"]}}]}]}


def test_np_egress_ipblock_allows_every_pod_but_the_except(tc_datapath):
    dp = tc_datapath
    c = compile_for_web(np_doc("out", EXCEPT_B))
    load(dp, c)
    for ip in (PODS["a"][0], PODS["r"][0], HOST_IP, "10.2.0.9"):
        verdict, rule, _ = kernel(dp, EGRESS, syn(EGRESS, ip))
        assert verdict == "ALLOWED" and rule_path(c, rule) == "spec.egress[0].to[0].ipBlock", ip
    verdict, rule, _ = kernel(dp, EGRESS, syn(EGRESS, PODS["b"][0]))
    assert verdict == "DENIED" and c.rules[rule].action == "default-deny"
    assert kernel(dp, EGRESS, syn(EGRESS, "192.0.2.4"))[0] == "DENIED"  # outside 0.0.0.0/4


def test_np_ingress_ipblock_of_one_pod_admits_that_pod_only(tc_datapath):
    dp = tc_datapath
    c = compile_for_web(np_doc("in", {"podSelector": {"matchLabels": {"app": "web"}},
                                      "ingress": [{"from": [{"ipBlock": {"cidr": f"{PODS['a'][0]}/32"}}],
                                                   "ports": [{"port": 80}]}]}))
    load(dp, c)
    verdict, rule, match = kernel(dp, INGRESS, syn(INGRESS, PODS["a"][0]))
    assert (verdict, rule_path(c, rule), match) == ("ALLOWED", "spec.ingress[0].from[0].ipBlock", "L3-L4")
    assert kernel(dp, INGRESS, syn(INGRESS, PODS["a"][0], dport=81))[0] == "DENIED"
    assert kernel(dp, INGRESS, syn(INGRESS, PODS["a"][0], proto=17))[0] == "DENIED"
    for ip in (PODS["b"][0], PODS["r"][0], HOST_IP):
        assert kernel(dp, INGRESS, syn(INGRESS, ip))[0] == "DENIED", ip


def test_cnp_cidr_still_matches_no_pod(tc_datapath):
    """Cilium's meaning: a pod's /32 in the ipcache shadows the CIDR; only addresses outside match."""
    dp = tc_datapath
    c = compile_for_web(cnp_doc("out", {"endpointSelector": {"matchLabels": {"app": "web"}},
                                        "egress": [{"toCIDRSet": [{"cidr": "0.0.0.0/4",
                                                                   "except": ["10.0.0.4/32"]}]}]}))
    load(dp, c)
    assert not list(dp.table("ipblock_cidrs").items())
    for ip in (PODS["a"][0], PODS["b"][0], PODS["r"][0], HOST_IP):
        assert kernel(dp, EGRESS, syn(EGRESS, ip))[0] == "DENIED", ip
    assert kernel(dp, EGRESS, syn(EGRESS, "10.2.0.9"))[0] == "ALLOWED"


def test_recheck_follows_the_ipblock(tc_datapath):
    """An established flow admitted by address is cut when the ipBlock's except takes its peer, and one
    that stands keeps the ipBlock as its rule (policy_recheck passes the address too)."""
    dp = tc_datapath
    allow_all = {**EXCEPT_B, "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/4"}}]}]}
    c = compile_for_web(np_doc("out", allow_all))
    load(dp, c)
    flows = {ip: syn(EGRESS, ip) for ip in (PODS["a"][0], PODS["b"][0])}
    for pkt in flows.values():
        assert kernel(dp, EGRESS, pkt)[0] == "ALLOWED"
    c = compile_for_web(np_doc("out", EXCEPT_B))
    load(dp, c)  # bumps the revision
    for ip, pkt in flows.items():
        again = pkt.copy()
        again[TCP].flags = "A"
        retval = run_skb(dp.functions["from_container"].fd, bytes(again), ifindex=IFINDEX).retval
        dp.drain_events()
        if ip == PODS["b"][0]:
            assert retval == TC_ACT_SHOT and dp.events[-1].drop_reason == 182  # POLICY_REVOKED
        else:
            assert retval == TC_ACT_OK
    kept = [v for k, v in dp.table("ct_map").items() if maps.be32_to_ip(k.daddr) == PODS["a"][0]]
    assert len(kept) == 1 and rule_path(c, kept[0].rule_id) == "spec.egress[0].to[0].ipBlock"
    assert not [k for k in dp.table("ct_map").keys() if maps.be32_to_ip(k.daddr) == PODS["b"][0]]


def test_an_identity_only_proxy_mark_is_not_matched_by_address(tc_datapath):
    """A peer known by the L7 processor's identity mark has the proxy's address, not its own."""
    from userspace_l7 import origdst

    dp = tc_datapath
    c = compile_for_web(np_doc("in", {"podSelector": {"matchLabels": {"app": "web"}},
                                      "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/4"}}]}]}))
    load(dp, c)
    assert kernel(dp, INGRESS, syn(INGRESS, HOST_IP))[0] == "ALLOWED"  # the host, by its address
    pkt = syn(INGRESS, HOST_IP)
    retval = run_skb(dp.functions["to_container"].fd, bytes(pkt), ifindex=IFINDEX,
                     mark=origdst.MARK_MAGIC_IDENTITY | PODS["a"][1]).retval
    dp.drain_events()
    assert retval == TC_ACT_SHOT and dp.events[-1].src_identity == PODS["a"][1]


# ---- randomized: the kernel decides as the mirror does ------------------------------------------

CIDRS = ("0.0.0.0/0", "0.0.0.0/4", "10.0.0.0/24", "10.0.0.3/32", "10.0.0.4/31", "10.1.0.0/16", "192.0.2.0/24")


def _block(rng: random.Random) -> dict:
    cidr = rng.choice(CIDRS)
    inside = [x for x in CIDRS if x != cidr and _subnet(x, cidr)]
    return {"cidr": cidr, "except": rng.sample(inside, rng.randrange(0, min(2, len(inside)) + 1))}


def _subnet(inner: str, outer: str) -> bool:
    return ipaddress.ip_network(inner).subnet_of(ipaddress.ip_network(outer))


def _ports(rng: random.Random, np: bool) -> list:
    out = []
    for _ in range(rng.randrange(0, 3)):
        port = rng.choice([80, 81, 53])
        proto = rng.choice(["TCP", "UDP"])
        out.append({"port": port, "protocol": proto} if np else {"port": str(port), "protocol": proto})
    return out


def random_np(rng: random.Random, name: str) -> PolicyInput:
    spec: dict = {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress", "Egress"]}
    for section, field in (("ingress", "from"), ("egress", "to")):
        rules = []
        for _ in range(rng.randrange(0, 3)):
            peers = [{"ipBlock": _block(rng)} if rng.random() < 0.7 else
                     {"podSelector": {"matchLabels": {"app": rng.choice("abr")}}} for _ in range(rng.randrange(0, 3))]
            rule: dict = {field: peers} if peers else {}
            if ports := _ports(rng, True):
                rule["ports"] = ports
            rules.append(rule)
        spec[section] = rules
    return np_doc(name, spec)


def random_cnp(rng: random.Random, name: str) -> PolicyInput:
    spec: dict = {"endpointSelector": {"matchLabels": {"app": "web"}}}
    for section in rng.sample(["ingress", "egress", "ingressDeny", "egressDeny"], rng.randrange(1, 3)):
        peer = "from" if section.startswith("ingress") else "to"
        rule: dict = rng.choice([{f"{peer}CIDRSet": [_block(rng)]},
                                 {f"{peer}Endpoints": [{"matchLabels": {"app": rng.choice("abr")}}]},
                                 {f"{peer}Entities": [rng.choice(["world", "host", "cluster"])]}])
        if ports := _ports(rng, False):
            rule["toPorts"] = [{"ports": ports}]
        spec[section] = [rule]
    return cnp_doc(name, spec)


@pytest.mark.parametrize("seed", range(3))
def test_kernel_agrees_with_the_mirror(tc_datapath, seed):
    dp = tc_datapath
    rng = random.Random(20260114 + seed)
    seen = {"by_address": 0, "denied": 0, "allowed": 0}
    peers = [ip for ip, _ in PODS.values()] + [HOST_IP, *WORLD_IPS]
    for trial in range(25):
        policies = [random_np(rng, "np0")]
        policies += [random_cnp(rng, f"cnp{i}") for i in range(rng.randrange(0, 3))]
        policies += [random_np(rng, "np1")] if rng.random() < 0.3 else []
        c = compile_for_web(*policies)
        load(dp, c)
        for direction in (INGRESS, EGRESS):
            for ip in peers:
                for proto, port in ((6, 80), (6, 81), (17, 53)):
                    got = kernel(dp, direction, syn(direction, ip, proto, port))
                    want = mirror(c, direction, ip, proto, port)
                    if want[0] == "DENIED":
                        want = (*want[:2], "none")  # a drop event carries no match type
                    assert got == want, (trial, direction, ip, proto, port, [p.body["spec"] for p in policies])
                    seen["denied" if got[0] == "DENIED" else "allowed"] += 1
                    if got[0] == "ALLOWED" and c.rules.get(got[1]) and c.rules[got[1]].path.endswith("ipBlock") \
                            and ip not in WORLD_IPS:
                        seen["by_address"] += 1
    assert all(n >= 20 for n in seen.values()), seen
