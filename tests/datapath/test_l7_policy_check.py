"""The L7 processor's policy check (userspace_l7/policy_check.py) against the TC program it stands in
for: on the same pinned maps, for randomly drawn policies, the check denies exactly the proxied SYNs
to_container drops, names the same rule and the same drop reason, and allows the rest.

No agent, no namespaces: the TC programs loaded for BPF_PROG_TEST_RUN (conftest.py tc_datapath), a
backend endpoint on loopback's ifindex, a client endpoint known by its ep_id, the processor's upstream
SYN marked with the client's endpoint (MARK_MAGIC_PROXY_EGRESS).
"""

from __future__ import annotations

import random

from scapy.all import IP, TCP, Ether

from agent.datapath import maps
from agent.datapath.reasons import reason_name
from agent.datapath.testrun import run_skb
from agent.policy.types import (
    ANY_IDENTITY,
    ANY_PROTO,
    BY_ADDRESS,
    EGRESS,
    INGRESS,
    Action,
    Enforcement,
    PolicyEntry,
    PolicyKey,
)
from userspace_l7 import origdst
from userspace_l7.policy_check import KernelPolicy, PolicyGate

TC_ACT_OK, TC_ACT_SHOT = 0, 2
IFINDEX = 1  # the test run needs a real device: loopback
ROUTER_IP, IDENTITY_HOST = "10.0.0.1", 1
BACKEND_IP, BACKEND_EP, BACKEND_ID = "10.0.0.2", 7, 1000
CLIENT_IP, CLIENT_EP, CLIENT_ID = "10.0.0.9", 8, 3000
PORT = 80
EVENT_DROP = 2


def enforcement(rng: random.Random, rule_id: int) -> Enforcement:
    return rng.choice([Enforcement(False), Enforcement(True, False, rule_id), Enforcement(True, True, rule_id)])


# NetworkPolicy ipBlocks (ipblock_cidrs): a block holding both endpoints' addresses, and the client's own /32.
BLOCK, CLIENT_BLOCK = 1 << 24, (1 << 24) + 1
IPBLOCKS = {"10.0.0.0/24": BLOCK, f"{CLIENT_IP}/32": CLIENT_BLOCK}


def entries(rng: random.Random, ep_id: int, direction: int, peer: int) -> dict[PolicyKey, PolicyEntry]:
    """A few entries of one endpoint and direction: for the peer, anyone or an ipBlock holding the peer's
    address, TCP or any protocol, port 80, the block 64..127 or any port; allow or deny, some audited."""
    out = {}
    for _ in range(rng.randrange(0, 4)):
        proto = rng.choice([6, 6, ANY_PROTO])
        port, prefix = rng.choice([(80, 16), (64, 10), (0, 0)]) if proto else (0, 0)
        identity = rng.choice([peer, ANY_IDENTITY, BY_ADDRESS | BLOCK, BY_ADDRESS | CLIENT_BLOCK])
        key = PolicyKey(ep_id, direction, identity, proto, port, prefix)
        out[key] = PolicyEntry(rng.choice([Action.ALLOW, Action.DENY]), rng.random() < 0.2, rng.randrange(100, 999))
    return out


def test_the_check_decides_as_to_container_does(tc_datapath):
    dp = tc_datapath
    dp.table("ipcache")[maps.ipcache_key_to_c(f"{ROUTER_IP}/32")] = maps.IpcacheEntryC(identity=IDENTITY_HOST)
    for prefix, identity in IPBLOCKS.items():
        dp.table("ipblock_cidrs")[maps.ipcache_key_to_c(prefix)] = maps.IpcacheEntryC(identity=identity)
    kernel = KernelPolicy(dp.bpffs_dir)
    rng = random.Random(20260113)
    policy = dp.table("policy_map")
    seen = {"allowed": 0, "client": 0, "backend": 0}
    try:
        for trial in range(200):
            policy.clear()
            egress, ingress = enforcement(rng, 4100), enforcement(rng, 4200)
            client = maps.endpoint_info_to_c(CLIENT_IP, CLIENT_ID, CLIENT_EP, Enforcement(False), egress)
            backend = maps.endpoint_info_to_c(BACKEND_IP, BACKEND_ID, BACKEND_EP, ingress, Enforcement(False))
            dp.write_endpoint_by_id(CLIENT_EP, client)
            dp.write_endpoint_by_id(BACKEND_EP, backend)
            dp.write_endpoint(IFINDEX, backend)
            drawn = {**entries(rng, CLIENT_EP, EGRESS, BACKEND_ID), **entries(rng, BACKEND_EP, INGRESS, CLIENT_ID)}
            for key, entry in drawn.items():
                policy[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(key, entry)
            dp.bump_policy_revision()

            syn = Ether() / IP(src=ROUTER_IP, dst=BACKEND_IP) / TCP(sport=20000 + trial, dport=PORT, flags="S")
            verdict = run_skb(dp.functions["to_container"].fd, bytes(syn), ifindex=IFINDEX,
                              mark=origdst.upstream_mark(CLIENT_ID, CLIENT_EP)).retval
            dp.drain_events()
            denial = PolicyGate(kernel, {BACKEND_IP: BACKEND_EP}.get).check(CLIENT_EP, CLIENT_ID, BACKEND_IP, PORT)
            what = (trial, egress, ingress, drawn)
            if verdict == TC_ACT_OK:
                assert denial is None, what
                seen["allowed"] += 1
                continue
            ev = dp.events[-1]
            assert ev.type == EVENT_DROP and denial is not None, what
            assert (denial.rule_id, denial.reason) == (ev.rule_id, reason_name(ev.drop_reason)), what
            assert denial.direction == ev.dir, what
            seen["client" if ev.dir == EGRESS else "backend"] += 1
    finally:
        kernel.close()
    assert all(n >= 10 for n in seen.values()), seen  # each outcome drawn often enough to mean something
