"""The fast policy check before an upstream flow (userspace_l7/policy_check.py), over a stand-in kernel:
the decision is agent/policy/lookup.py's `decide_proxied`, as bpf/lib/policy.h decides the SYN."""

from __future__ import annotations

from agent import identity as ids
from agent.datapath import maps
from agent.policy.lookup import ALLOWED, AUDIT, Party, address_match, decide_proxied, longest_match, match_name
from agent.policy.types import ANY_IDENTITY, BY_ADDRESS, EGRESS, INGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from userspace_l7.policy_check import (
    POLICY_DENIED,
    POLICY_DENIED_CLIENT_EGRESS,
    POLICY_DENY,
    Denial,
    PolicyGate,
)

CLIENT, BACKEND = 3, 5
CLIENT_ID, BACKEND_ID = 1003, 2001
BACKEND_IP, PORT = "10.200.0.11", 8080
ON, OFF = Enforcement(True, rule_id=90), Enforcement(False)


class FakeKernel:
    """The pinned maps as dicts; counts the lookups a real one would make syscalls for."""

    def __init__(self, entries=None, client_egress=OFF, backend_ingress=OFF):
        self.entries: dict[PolicyKey, PolicyEntry] = dict(entries or {})
        self.ipblocks: dict[str, int] = {}  # ipblock_cidrs
        self.rev = 7
        self.lookups = 0
        self.set_endpoints(client_egress, backend_ingress)

    def set_endpoints(self, client_egress, backend_ingress):
        self.endpoints = {
            CLIENT: maps.endpoint_info_to_c("10.200.0.21", CLIENT_ID, CLIENT, OFF, client_egress),
            BACKEND: maps.endpoint_info_to_c(BACKEND_IP, BACKEND_ID, BACKEND, backend_ingress, OFF),
        }

    def revision(self):
        return self.rev

    def endpoint(self, ep_id):
        self.lookups += 1
        return self.endpoints.get(ep_id)

    def longest(self, ep_id, direction, identity, proto, port):
        self.lookups += 1
        hit = longest_match(self.entries, ep_id, direction, identity, proto, port)
        return (match_name(hit[0]), hit[1]) if hit else None

    def ipblock(self, ip):
        self.lookups += 1
        return address_match(self.ipblocks, ip)


def gate(kernel):
    return PolicyGate(kernel, {BACKEND_IP: BACKEND}.get)


def allow(ep, direction, identity, rule, port=PORT):
    return {PolicyKey(ep, direction, identity, 6, port, 16): PolicyEntry(Action.ALLOW, False, rule)}


def deny(ep, direction, identity, rule, port=PORT):
    return {PolicyKey(ep, direction, identity, 6, port, 16): PolicyEntry(Action.DENY, False, rule)}


def test_no_enforcement_allows():
    assert gate(FakeKernel()).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None


def test_the_clients_egress_default_deny_is_the_clients_drop():
    k = FakeKernel(client_egress=ON)
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) == Denial(90, EGRESS, POLICY_DENIED_CLIENT_EGRESS,
                                                                         "none")
    k.entries.update(allow(CLIENT, EGRESS, BACKEND_ID, 11))
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, 9090) is not None  # another port


def test_the_backends_ingress_decides_next_and_names_deny_rules_apart():
    k = FakeKernel(backend_ingress=ON)
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) == Denial(90, INGRESS, POLICY_DENIED, "none")
    k.entries.update(deny(BACKEND, INGRESS, ANY_IDENTITY, 12))
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) == Denial(12, INGRESS, POLICY_DENY, "L4-Only")
    # an identity-only client (no endpoint here) meets the backend's ingress policy alone
    assert gate(k).check(None, 4242, BACKEND_IP, PORT).rule_id == 12


def test_a_flow_both_sides_deny_is_the_clients():
    k = FakeKernel({**deny(CLIENT, EGRESS, BACKEND_ID, 21), **deny(BACKEND, INGRESS, CLIENT_ID, 22)}, ON, ON)
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT).rule_id == 21


def test_audit_lets_the_flow_through():
    k = FakeKernel(client_egress=Enforcement(True, audit=True, rule_id=91))
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None
    # and decide_proxied reports the client's audit when the backend allows (policy_can_access_proxied)
    into = Party(BACKEND, BACKEND_ID, OFF)
    v, side = decide_proxied(k.longest, Party(CLIENT, CLIENT_ID, Enforcement(True, True, 91)), into, 6, PORT)
    assert (v.verdict, v.rule_id, side) == (AUDIT, 91, EGRESS)
    v, side = decide_proxied(k.longest, Party(CLIENT, CLIENT_ID, OFF), into, 6, PORT)
    assert (v.verdict, side) == (ALLOWED, INGRESS)


def test_backends_not_on_this_node_are_not_decided_here():
    k = FakeKernel(client_egress=ON)
    assert gate(k).check(CLIENT, CLIENT_ID, "192.0.2.9", PORT) is None  # no TC program of ours sees that SYN
    k.endpoints[BACKEND] = maps.endpoint_info_to_c("10.200.0.99", BACKEND_ID, BACKEND, OFF, OFF)
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None  # snapshot and kernel disagree: the kernel
    del k.endpoints[CLIENT]
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None  # the client left: the kernel drops it


def test_decisions_last_until_the_revision_moves():
    k = FakeKernel(client_egress=ON)
    g = gate(k)
    assert g.check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is not None
    before, gen = k.lookups, g.generation
    # a cached denial costs one revision read (to never answer a stale 403), no policy lookups
    assert g.check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is not None and k.lookups == before
    k.entries.update(allow(CLIENT, EGRESS, BACKEND_ID, 11))
    k.rev += 1  # the agent bumps it with every policy change
    assert g.check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None and g.generation == gen + 1
    before = k.lookups
    assert g.check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None and k.lookups == before
    assert not g.refresh()
    k.rev += 1
    assert g.refresh() and g.generation == gen + 2
    g.invalidate({}.get)  # a new snapshot: nothing is a local endpoint any more
    assert g.check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None


def test_networkpolicy_ipblocks_match_both_sides_by_address():
    """The processor's check looks each side's address up in ipblock_cidrs, as policy_can_access_proxied
    does: the client's egress by the backend's address, the backend's ingress by the client's."""
    block = ids.CIDR_BASE + 3
    k = FakeKernel(client_egress=ON, backend_ingress=ON)
    k.ipblocks = {"10.200.0.0/24": block}
    k.entries.update(allow(CLIENT, EGRESS, BY_ADDRESS | block, 31))
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) == Denial(90, INGRESS, POLICY_DENIED, "none")
    k.entries.update(allow(BACKEND, INGRESS, BY_ADDRESS | block, 32))
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT) is None
    # an identity-only client has no address here: no ipBlock matches it
    assert gate(k).check(None, 4242, BACKEND_IP, PORT) == Denial(90, INGRESS, POLICY_DENIED, "none")
    k.ipblocks = {}
    assert gate(k).check(CLIENT, CLIENT_ID, BACKEND_IP, PORT).rule_id == 90
