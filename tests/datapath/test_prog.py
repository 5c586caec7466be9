"""Cilium-style program tests: scapy packet -> maps preloaded -> BPF_PROG_TEST_RUN -> check the
verdict, the conntrack entry and the emitted event. No agent, no namespaces; the pins live in a
temporary bpffs directory removed at the end."""

from __future__ import annotations

import ctypes as ct
import shutil
import uuid

import pytest
from scapy.all import IP, TCP, UDP, Ether

from agent.datapath import maps
from agent.datapath.loader import Datapath
from agent.datapath.testrun import run_skb
from agent.policy.types import INGRESS, Action, Enforcement, PolicyEntry, PolicyKey

TC_ACT_OK, TC_ACT_SHOT = 0, 2
IFINDEX = 1  # the test run needs a real device: loopback
EP_IP, PEER_IP = "10.0.0.2", "10.0.0.3"
EP_ID, EP_IDENTITY, PEER_IDENTITY = 7, 1000, 2000


@pytest.fixture
def dp():
    datapath = Datapath(f"/sys/fs/bpf/meshagent-test/prog-{uuid.uuid4().hex[:6]}",
                        {"CT_MAP_SIZE": 1024, "POLICY_MAP_SIZE": 1024, "IPCACHE_MAP_SIZE": 1024})
    try:
        datapath.load()
        events: list[maps.FlowEventC] = []
        datapath.open_events(lambda ev: events.append(maps.FlowEventC.from_buffer_copy(bytes(ev))))
        datapath.events = events
        ipcache = datapath.table("ipcache")
        ipcache[maps.ipcache_key_to_c(f"{PEER_IP}/32")] = maps.IpcacheEntryC(identity=PEER_IDENTITY)
        yield datapath
    finally:
        shutil.rmtree(datapath.bpffs_dir, ignore_errors=True)


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
