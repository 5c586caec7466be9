"""Cilium-style program tests: scapy packet -> maps preloaded -> BPF_PROG_TEST_RUN -> check the
verdict, the conntrack entry and the emitted event. The skb mark (the L7 processor's SO_MARK) is
set through the test run's __sk_buff context (agent/datapath/testrun.py). No agent, no namespaces;
the pins live in a temporary bpffs directory removed at the end."""

from __future__ import annotations

import ctypes as ct

import pytest
from scapy.all import IP, TCP, UDP, Ether

from agent.datapath import maps
from agent.datapath.testrun import run_skb
from agent.policy.types import EGRESS, INGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from userspace_l7 import origdst

TC_ACT_OK, TC_ACT_SHOT = 0, 2
IFINDEX = 1  # the test run needs a real device: loopback
EP_IP, PEER_IP = "10.0.0.2", "10.0.0.3"
EP_ID, EP_IDENTITY, PEER_IDENTITY = 7, 1000, 2000


@pytest.fixture
def dp(tc_datapath):
    """The TC programs (conftest.py) with the peer in the ipcache."""
    tc_datapath.table("ipcache")[maps.ipcache_key_to_c(f"{PEER_IP}/32")] = maps.IpcacheEntryC(identity=PEER_IDENTITY)
    return tc_datapath


OPEN = Enforcement(False)


def set_endpoint(dp, ingress: Enforcement, egress: Enforcement = OPEN) -> None:
    dp.write_endpoint(IFINDEX, maps.endpoint_info_to_c(EP_IP, EP_IDENTITY, EP_ID, ingress, egress))


def run(dp, prog: str, pkt) -> int:
    result = run_skb(dp.functions[prog].fd, bytes(pkt), ifindex=IFINDEX).retval
    dp.drain_events()
    return result


def ct_entries(dp) -> dict:
    return {(maps.be32_to_ip(k.saddr), maps.be32_to_ip(k.daddr), k.sport, k.dport, k.proto, k.dir, k.ep_id): v
            for k, v in dp.table("ct_map").items()}


def out_pkt(**kw):
    return Ether() / IP(src=EP_IP, dst=PEER_IP) / TCP(sport=40000, dport=80, **kw)


def in_pkt(sport=50000, **kw):
    return Ether() / IP(src=PEER_IP, dst=EP_IP) / TCP(sport=sport, dport=80, **kw)


def test_new_flow_creates_conntrack_and_event(dp):
    set_endpoint(dp, Enforcement(False))
    assert run(dp, "from_container", out_pkt(flags="S")) == TC_ACT_OK
    entry = ct_entries(dp)[(EP_IP, PEER_IP, 40000, 80, 6, 1, EP_ID)]
    assert entry.packets_fwd == 1 and entry.remote_identity == PEER_IDENTITY
    ev = dp.events[-1]
    assert (ev.type, ev.verdict, ev.src_identity, ev.dst_identity) == (1, 1, EP_IDENTITY, PEER_IDENTITY)
    # The reply finds the entry through the reversed tuple and counts as a reply.
    reply = Ether() / IP(src=PEER_IP, dst=EP_IP) / TCP(sport=80, dport=40000, flags="SA")
    assert run(dp, "to_container", reply) == TC_ACT_OK
    assert ct_entries(dp)[(EP_IP, PEER_IP, 40000, 80, 6, 1, EP_ID)].packets_rev == 1
    assert len(dp.events) == 1, "established packets emit no events"


def test_default_deny_reports_the_selecting_rule(dp):
    set_endpoint(dp, Enforcement(True, False, rule_id=4242))
    assert run(dp, "to_container", in_pkt(flags="S")) == TC_ACT_SHOT
    ev = dp.events[-1]
    assert (ev.type, ev.verdict, ev.drop_reason, ev.rule_id) == (2, 2, 133, 4242)
    assert not ct_entries(dp)


def test_allow_entry_admits_and_deny_entry_wins(dp):
    set_endpoint(dp, Enforcement(True, False, rule_id=1))
    policy = dp.table("policy_map")
    allow = PolicyKey(EP_ID, INGRESS, PEER_IDENTITY, 6, 80, 16)
    policy[maps.policy_key_to_c(allow)] = maps.policy_entry_to_c(allow, PolicyEntry(Action.ALLOW, False, 11))
    assert run(dp, "to_container", in_pkt(flags="S")) == TC_ACT_OK
    assert dp.events[-1].rule_id == 11 and dp.events[-1].match == maps.MATCH_L3_L4
    deny = PolicyKey(EP_ID, INGRESS, 0, 6, 0, 0)  # any identity, any TCP port
    policy[maps.policy_key_to_c(deny)] = maps.policy_entry_to_c(deny, PolicyEntry(Action.DENY, False, 22))
    assert run(dp, "to_container", in_pkt(flags="S", sport=50001)) == TC_ACT_SHOT
    assert (dp.events[-1].drop_reason, dp.events[-1].rule_id) == (181, 22)


def test_revision_bump_rechecks_established_flows(dp):
    set_endpoint(dp, Enforcement(False))
    assert run(dp, "to_container", in_pkt(flags="S")) == TC_ACT_OK
    set_endpoint(dp, Enforcement(True, False, rule_id=9))  # now default deny...
    assert run(dp, "to_container", in_pkt(flags="A")) == TC_ACT_OK  # ...but the flow predates it
    cfg = dp.table("config_map")
    cfg[0] = maps.DatapathConfigC(policy_revision=cfg[0].policy_revision + 1)
    assert run(dp, "to_container", in_pkt(flags="A")) == TC_ACT_SHOT
    assert dp.events[-1].drop_reason == 182  # POLICY_REVOKED
    assert not ct_entries(dp), "the revoked flow's entry is gone"


@pytest.mark.parametrize("pkt,reason", [
    (Ether() / IP(src="10.9.9.9", dst=PEER_IP) / UDP(dport=53), 132),
    (Ether(type=0x0800) / bytes(IP(src=EP_IP, dst=PEER_IP, ihl=4) / TCP()), 134),
    (Ether(type=0x0800) / bytes(IP(src=EP_IP, dst=PEER_IP, proto=6))[:20], 135),
    (Ether() / IP(src=EP_IP, dst=PEER_IP, proto=17, frag=10) / (b"x" * 8), 155),
])
def test_bad_packets_from_the_endpoint(dp, pkt, reason):
    set_endpoint(dp, Enforcement(False))
    assert run(dp, "from_container", pkt) == TC_ACT_SHOT
    assert dp.events[-1].drop_reason == reason
    assert dp.metrics()[(reason, 1)][0] == 1


def test_event_struct_size_matches():
    assert ct.sizeof(maps.FlowEventC) == 64


def test_endpoint_table_array_and_overflow(dp):
    info = maps.endpoint_info_to_c(EP_IP, EP_IDENTITY, EP_ID, OPEN, OPEN)
    for ifindex in (5, 70000):  # inside the array, and beyond it (the hash)
        dp.write_endpoint(ifindex, info)
        assert dp.read_endpoint(ifindex) == bytes(info)
        assert ifindex in dp.read_endpoints()
        dp.delete_endpoint(ifindex)
        assert dp.read_endpoint(ifindex) is None


# ---- the L7 processor's upstream flows: the client's egress and the backend's ingress --------------

ROUTER_IP, IDENTITY_HOST = "10.0.0.1", 1  # the node's address the processor connects from
CLIENT_EP_ID, CLIENT_IDENTITY = 8, 3000
CLIENT_DENY_RULE, BACKEND_DENY_RULE = 4100, 4200
CT_F_PROXY_ID = 0x40
EVENT_FLOW_NEW, EVENT_DROP = 1, 2
DROP_POLICY, DROP_NO_ENDPOINT, DROP_POLICY_REVOKED, DROP_POLICY_CLIENT_EGRESS = 133, 145, 182, 183


def proxied(sport: int = 41000, flags: str = "S"):
    """A packet of the processor's upstream connection: from the node's address to the endpoint."""
    return Ether() / IP(src=ROUTER_IP, dst=EP_IP) / TCP(sport=sport, dport=80, flags=flags)


def set_rule(dp, ep_id: int, direction: int, identity: int, rule_id: int, action=Action.ALLOW) -> None:
    key = PolicyKey(ep_id, direction, identity, 6, 80, 16)
    dp.table("policy_map")[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(key, PolicyEntry(action, False, rule_id))


def del_rule(dp, ep_id: int, direction: int, identity: int) -> None:
    del dp.table("policy_map")[maps.policy_key_to_c(PolicyKey(ep_id, direction, identity, 6, 80, 16))]


def bump(dp) -> None:
    cfg = dp.table("config_map")
    c = cfg[0]
    c.policy_revision += 1
    cfg[0] = c


@pytest.fixture
def proxy(dp):
    """The endpoint as a backend that admits CLIENT_IDENTITY on port 80, and a client endpoint on
    another device, known to the datapath by ep_id, whose egress is under default deny."""
    dp.table("ipcache")[maps.ipcache_key_to_c(f"{ROUTER_IP}/32")] = maps.IpcacheEntryC(identity=IDENTITY_HOST)
    set_endpoint(dp, Enforcement(True, False, rule_id=BACKEND_DENY_RULE))
    set_rule(dp, EP_ID, INGRESS, CLIENT_IDENTITY, 11)
    set_client(dp, CLIENT_IDENTITY)
    return dp


def set_client(dp, identity: int) -> None:
    dp.write_endpoint_by_id(CLIENT_EP_ID, maps.endpoint_info_to_c(
        "10.0.0.9", identity, CLIENT_EP_ID, OPEN, Enforcement(True, False, rule_id=CLIENT_DENY_RULE)))


def mark(ep_id: int = CLIENT_EP_ID) -> int:
    return origdst.upstream_mark(None, ep_id)


def run_marked(dp, pkt, m: int) -> int:
    result = run_skb(dp.functions["to_container"].fd, bytes(pkt), ifindex=IFINDEX, mark=m).retval
    dp.drain_events()
    return result


def test_proxied_flow_needs_the_clients_egress_and_the_backends_ingress(proxy):
    dp = proxy
    # The client's egress does not allow the backend: dropped, reported as the client's egress.
    assert run_marked(dp, proxied(), mark()) == TC_ACT_SHOT
    ev = dp.events[-1]
    assert (ev.type, ev.dir, ev.ep_id, ev.drop_reason, ev.rule_id) == \
        (EVENT_DROP, EGRESS, CLIENT_EP_ID, DROP_POLICY_CLIENT_EGRESS, CLIENT_DENY_RULE)
    assert (ev.src_identity, ev.dst_identity) == (CLIENT_IDENTITY, EP_IDENTITY)
    assert dp.metrics()[(DROP_POLICY_CLIENT_EGRESS, EGRESS)][0] == 1
    assert not ct_entries(dp)

    # Allowed by both: admitted on the backend's ingress rule, tracked with the client's endpoint.
    set_rule(dp, CLIENT_EP_ID, EGRESS, EP_IDENTITY, 21)
    assert run_marked(dp, proxied(41001), mark()) == TC_ACT_OK
    ev = dp.events[-1]
    assert (ev.type, ev.dir, ev.ep_id, ev.rule_id, ev.src_identity) == \
        (EVENT_FLOW_NEW, INGRESS, EP_ID, 11, CLIENT_IDENTITY)
    entry = ct_entries(dp)[(ROUTER_IP, EP_IP, 41001, 80, 6, INGRESS, EP_ID)]
    assert (entry.remote_identity, entry.proxy_ep_id) == (CLIENT_IDENTITY, CLIENT_EP_ID)
    assert entry.flags & CT_F_PROXY_ID

    # The client's egress allows it, the backend's ingress does not: the backend's default deny.
    del_rule(dp, EP_ID, INGRESS, CLIENT_IDENTITY)
    assert run_marked(dp, proxied(41002), mark()) == TC_ACT_SHOT
    ev = dp.events[-1]
    assert (ev.dir, ev.ep_id, ev.drop_reason, ev.rule_id, ev.src_identity) == \
        (INGRESS, EP_ID, DROP_POLICY, BACKEND_DENY_RULE, CLIENT_IDENTITY)


def test_proxy_mark_of_an_unknown_endpoint_fails_closed(proxy):
    """A mark naming no endpoint is not the host: dropped even where the host is allowed."""
    dp = proxy
    set_rule(dp, EP_ID, INGRESS, IDENTITY_HOST, 12)
    assert run_marked(dp, proxied(), mark(99)) == TC_ACT_SHOT
    assert (dp.events[-1].drop_reason, dp.events[-1].src_identity) == (DROP_NO_ENDPOINT, IDENTITY_HOST)
    # Bits 16..23 set: not a proxy mark at all, so the packet is the host's, and the host is allowed.
    assert run_marked(dp, proxied(41001), mark() | 0x00010000) == TC_ACT_OK
    assert dp.events[-1].src_identity == IDENTITY_HOST


def test_proxied_flow_rechecks_the_clients_egress(proxy):
    """After a policy change an established proxied flow is decided again on both sides, the
    client's side from its endpoint as it is now, also for replies (which carry no mark)."""
    dp = proxy
    set_rule(dp, CLIENT_EP_ID, EGRESS, EP_IDENTITY, 21)
    assert run_marked(dp, proxied(), mark()) == TC_ACT_OK
    bump(dp)
    reply = Ether() / IP(src=EP_IP, dst=ROUTER_IP) / TCP(sport=80, dport=41000, flags="SA")
    assert run(dp, "from_container", reply) == TC_ACT_OK
    assert run_marked(dp, proxied(flags="A"), mark()) == TC_ACT_OK

    del_rule(dp, CLIENT_EP_ID, EGRESS, EP_IDENTITY)  # the client may no longer reach the backend
    bump(dp)
    assert run_marked(dp, proxied(flags="A"), mark()) == TC_ACT_SHOT
    ev = dp.events[-1]
    assert (ev.dir, ev.ep_id, ev.drop_reason, ev.rule_id, ev.src_identity) == \
        (EGRESS, CLIENT_EP_ID, DROP_POLICY_REVOKED, CLIENT_DENY_RULE, CLIENT_IDENTITY)
    assert not ct_entries(dp), "the revoked flow's entry is gone"


def test_proxied_flow_follows_the_clients_identity(proxy):
    """The client's identity is read from its endpoint at each re-check: a relabelled client
    that the backend does not admit is cut, and a client that left cuts its flows."""
    dp = proxy
    set_rule(dp, CLIENT_EP_ID, EGRESS, EP_IDENTITY, 21)
    assert run_marked(dp, proxied(), mark()) == TC_ACT_OK
    assert run_marked(dp, proxied(41001), mark()) == TC_ACT_OK
    set_client(dp, CLIENT_IDENTITY + 1)
    bump(dp)
    assert run_marked(dp, proxied(flags="A"), mark()) == TC_ACT_SHOT
    ev = dp.events[-1]
    assert (ev.dir, ev.ep_id, ev.drop_reason, ev.src_identity) == \
        (INGRESS, EP_ID, DROP_POLICY_REVOKED, CLIENT_IDENTITY + 1)

    dp.delete_endpoint_by_id(CLIENT_EP_ID)
    bump(dp)
    reply = Ether() / IP(src=EP_IP, dst=ROUTER_IP) / TCP(sport=80, dport=41001, flags="A")
    assert run(dp, "from_container", reply) == TC_ACT_SHOT
    assert (dp.events[-1].drop_reason, dp.events[-1].is_reply) == (DROP_POLICY_REVOKED, 1)
    assert not ct_entries(dp)
