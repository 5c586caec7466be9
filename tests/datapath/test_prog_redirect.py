"""Program tests (BPF_PROG_TEST_RUN) of the TC policy programs' L7-processor cases:

- to_container: a packet from a HOST address carrying an identity mark (the L7 processor's
  upstream connection on a client's behalf) is decided on the identity in the mark;
- from_container: a new TCP flow to the processor's address is a redirect (VERDICT_REDIRECTED),
  admitted whatever the egress policy.

No namespaces; the pins live in a temporary bpffs directory removed at the end."""

from __future__ import annotations

import shutil
import uuid

import pytest
from scapy.all import IP, TCP, UDP, Ether

from agent.datapath import maps
from agent.datapath.build import ensure_bpffs
from agent.datapath.tc import TcDatapath
from agent.datapath.testrun import run_skb
from agent.policy.types import EGRESS, INGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from userspace_l7.origdst import upstream_mark

TC_ACT_OK, TC_ACT_SHOT = 0, 2
IFINDEX = 1
EP_IP, PEER_IP, HOST_IP, ROUTER_IP = "10.0.0.2", "10.0.0.3", "10.0.0.1", "10.200.0.1"
EP_ID, EP_IDENTITY, PEER_IDENTITY, CLIENT_IDENTITY, OTHER_IDENTITY = 7, 1000, 2000, 3000, 3001
IDENTITY_HOST = 1
PROXY_PORT = 15001
VERDICT_FORWARDED, VERDICT_DROPPED, VERDICT_REDIRECTED = 1, 2, 4
CT_F_REDIRECT, CT_F_PROXY_ID = 0x20, 0x40


@pytest.fixture
def dp(tc_datapath):
    """The TC programs (conftest.py) with the peer, the host and the router in the ipcache."""
    ipcache = tc_datapath.table("ipcache")
    for ip, identity in ((PEER_IP, PEER_IDENTITY), (HOST_IP, IDENTITY_HOST), (ROUTER_IP, IDENTITY_HOST)):
        ipcache[maps.ipcache_key_to_c(f"{ip}/32")] = maps.IpcacheEntryC(identity=identity)
    return tc_datapath


def set_endpoint(dp, ingress: Enforcement, egress: Enforcement) -> None:
    dp.write_endpoint(IFINDEX, maps.endpoint_info_to_c(EP_IP, EP_IDENTITY, EP_ID, ingress, egress))


def allow(dp, direction: int, identity: int, port: int, rule_id: int) -> None:
    key = PolicyKey(EP_ID, direction, identity, 6, port, 16)
    dp.table("policy_map")[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(
        key, PolicyEntry(Action.ALLOW, False, rule_id))


def run(dp, prog: str, pkt, mark: int = 0) -> int:
    result = run_skb(dp.functions[prog].fd, bytes(pkt), ifindex=IFINDEX, mark=mark).retval
    dp.drain_events()
    return result


def ct_entry(dp, saddr, daddr, sport, dport, direction):
    for k, v in dp.table("ct_map").items():
        if (maps.be32_to_ip(k.saddr), maps.be32_to_ip(k.daddr), k.sport, k.dport, k.dir) == \
                (saddr, daddr, sport, dport, direction):
            return v
    return None


def bump(dp) -> None:
    dp.bump_policy_revision()


def proxied(sport=41000, flags="S"):
    """The L7 processor's upstream connection (from a host address) to the endpoint's port 80."""
    return Ether() / IP(src=ROUTER_IP, dst=EP_IP) / TCP(sport=sport, dport=80, flags=flags)


# ---- to_container: the identity in the processor's mark -------------------------------------------


def test_marked_host_packet_is_decided_on_the_client_identity(dp):
    set_endpoint(dp, Enforcement(True, False, rule_id=9), Enforcement(False))
    allow(dp, INGRESS, CLIENT_IDENTITY, 80, 11)
    assert run(dp, "to_container", proxied(), mark=upstream_mark(CLIENT_IDENTITY)) == TC_ACT_OK
    ev = dp.events[-1]
    assert (ev.verdict, ev.src_identity, ev.dst_identity, ev.rule_id) == \
        (VERDICT_FORWARDED, CLIENT_IDENTITY, EP_IDENTITY, 11)
    entry = ct_entry(dp, ROUTER_IP, EP_IP, 41000, 80, INGRESS)
    assert entry.remote_identity == CLIENT_IDENTITY and entry.flags & CT_F_PROXY_ID
    # Another client's identity, and no mark at all (the host itself), meet the default deny.
    assert run(dp, "to_container", proxied(41001), mark=upstream_mark(OTHER_IDENTITY)) == TC_ACT_SHOT
    assert (dp.events[-1].src_identity, dp.events[-1].drop_reason) == (OTHER_IDENTITY, 133)
    assert run(dp, "to_container", proxied(41002)) == TC_ACT_SHOT
    assert dp.events[-1].src_identity == IDENTITY_HOST


@pytest.mark.parametrize("mark", [0x0F000000 | CLIENT_IDENTITY, 0x0E000000, 0xFFFFFFFF])
def test_other_marks_are_not_identities(dp, mark):
    set_endpoint(dp, Enforcement(True, False, rule_id=9), Enforcement(False))
    allow(dp, INGRESS, CLIENT_IDENTITY, 80, 11)
    assert run(dp, "to_container", proxied(), mark=mark) == TC_ACT_SHOT
    assert dp.events[-1].src_identity == IDENTITY_HOST


def test_mark_from_a_non_host_address_is_ignored(dp):
    """Only the host's packets are believed: a peer's packet is its own identity, mark or not."""
    set_endpoint(dp, Enforcement(True, False, rule_id=9), Enforcement(False))
    allow(dp, INGRESS, CLIENT_IDENTITY, 80, 11)
    pkt = Ether() / IP(src=PEER_IP, dst=EP_IP) / TCP(sport=50000, dport=80, flags="S")
    assert run(dp, "to_container", pkt, mark=upstream_mark(CLIENT_IDENTITY)) == TC_ACT_SHOT
    assert dp.events[-1].src_identity == PEER_IDENTITY


def test_marked_flow_keeps_its_identity_across_policy_changes(dp):
    """A re-check after a revision bump decides on the identity the mark gave, also for a reply
    (which carries no mark), and a revoked allow for that client cuts the flow."""
    set_endpoint(dp, Enforcement(True, False, rule_id=9), Enforcement(False))
    allow(dp, INGRESS, CLIENT_IDENTITY, 80, 11)
    assert run(dp, "to_container", proxied(), mark=upstream_mark(CLIENT_IDENTITY)) == TC_ACT_OK
    bump(dp)
    reply = Ether() / IP(src=EP_IP, dst=ROUTER_IP) / TCP(sport=80, dport=41000, flags="SA")
    assert run(dp, "from_container", reply) == TC_ACT_OK
    assert ct_entry(dp, ROUTER_IP, EP_IP, 41000, 80, INGRESS).remote_identity == CLIENT_IDENTITY
    key = PolicyKey(EP_ID, INGRESS, CLIENT_IDENTITY, 6, 80, 16)
    del dp.table("policy_map")[maps.policy_key_to_c(key)]
    bump(dp)
    assert run(dp, "to_container", proxied(flags="A"), mark=upstream_mark(CLIENT_IDENTITY)) == TC_ACT_SHOT
    assert (dp.events[-1].drop_reason, dp.events[-1].src_identity) == (182, CLIENT_IDENTITY)


# ---- from_container: redirects to the L7 processor -----------------------------------------------


def to_proxy(dport=PROXY_PORT, sport=40000, flags="S", proto=TCP):
    l4 = proto(sport=sport, dport=dport, flags=flags) if proto is TCP else proto(sport=sport, dport=dport)
    return Ether() / IP(src=EP_IP, dst=ROUTER_IP) / l4


def test_flow_to_the_processor_is_redirected_whatever_the_egress_policy(dp):
    set_endpoint(dp, Enforcement(False), Enforcement(True, False, rule_id=5))  # egress default deny
    dp.set_proxy(ROUTER_IP, PROXY_PORT)
    assert run(dp, "from_container", to_proxy()) == TC_ACT_OK
    ev = dp.events[-1]
    assert (ev.type, ev.verdict, ev.dir, ev.src_identity, ev.dst_identity) == \
        (1, VERDICT_REDIRECTED, EGRESS, EP_IDENTITY, IDENTITY_HOST)
    assert ct_entry(dp, EP_IP, ROUTER_IP, 40000, PROXY_PORT, EGRESS).flags & CT_F_REDIRECT
    # Replies pass as for any tracked flow; a policy change does not cut the redirect.
    reply = Ether() / IP(src=ROUTER_IP, dst=EP_IP) / TCP(sport=PROXY_PORT, dport=40000, flags="SA")
    assert run(dp, "to_container", reply) == TC_ACT_OK
    bump(dp)
    assert run(dp, "from_container", to_proxy(flags="A")) == TC_ACT_OK
    # Its end is reported as a redirect too.
    run(dp, "from_container", to_proxy(flags="R"))
    assert (dp.events[-1].type, dp.events[-1].verdict) == (3, VERDICT_REDIRECTED)


@pytest.mark.parametrize("pkt", [to_proxy(dport=PROXY_PORT + 1), to_proxy(proto=UDP)],
                         ids=["another port", "udp"])
def test_other_flows_to_the_router_meet_the_egress_policy(dp, pkt):
    set_endpoint(dp, Enforcement(False), Enforcement(True, False, rule_id=5))
    dp.set_proxy(ROUTER_IP, PROXY_PORT)
    assert run(dp, "from_container", pkt) == TC_ACT_SHOT
    assert (dp.events[-1].verdict, dp.events[-1].rule_id) == (VERDICT_DROPPED, 5)


def test_no_processor_no_redirect(dp):
    set_endpoint(dp, Enforcement(False), Enforcement(True, False, rule_id=5))
    assert dp.proxy() is None
    assert run(dp, "from_container", to_proxy()) == TC_ACT_SHOT
    dp.set_proxy(ROUTER_IP, PROXY_PORT)
    dp.set_proxy(None)
    assert run(dp, "from_container", to_proxy(sport=40001)) == TC_ACT_SHOT


def test_allowed_egress_to_the_router_is_still_a_redirect(dp):
    """An open endpoint's flow to the processor is reported as a redirect as well."""
    set_endpoint(dp, Enforcement(False), Enforcement(False))
    dp.set_proxy(ROUTER_IP, PROXY_PORT)
    assert run(dp, "from_container", to_proxy()) == TC_ACT_OK
    assert dp.events[-1].verdict == VERDICT_REDIRECTED


def test_set_proxy_and_revision_bumps_leave_each_other_alone(dp):
    cfg = dp.table("config_map")
    revision = cfg[0].policy_revision
    dp.set_proxy(ROUTER_IP, PROXY_PORT)
    assert cfg[0].policy_revision == revision
    bump(dp)
    assert dp.proxy() == (ROUTER_IP, PROXY_PORT) and cfg[0].policy_revision == revision + 1
    with pytest.raises(ValueError):
        dp.set_proxy(ROUTER_IP, 0)


def test_upgrade_over_an_old_config_pin_keeps_the_revision():
    """An agent upgraded over pins of the 8-byte datapath_config replaces the map (the new programs
    would fail the verifier on it) and carries its policy_revision over."""
    from bcc import BPF

    pin_dir = f"/sys/fs/bpf/meshagent-test/progu-{uuid.uuid4().hex[:6]}"
    try:
        ensure_bpffs(pin_dir)
        old = BPF(text=f'BPF_TABLE_PINNED("array", u32, u64, config_map, 1, "{pin_dir}/config");')
        old["config_map"][0] = old["config_map"].Leaf(41)
        datapath = TcDatapath(pin_dir, {"CT_MAP_SIZE": 1024, "POLICY_MAP_SIZE": 1024, "IPCACHE_MAP_SIZE": 1024})
        datapath.load()
        assert datapath.table("config_map")[0].policy_revision == 41
        datapath.set_proxy(ROUTER_IP, PROXY_PORT)
        assert datapath.proxy() == (ROUTER_IP, PROXY_PORT)
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
