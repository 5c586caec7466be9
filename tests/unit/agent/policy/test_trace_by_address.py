"""`policy trace` (agent/policy/trace.py) with sides given by address, and the ipBlock step it reports."""

from __future__ import annotations

import pytest

from agent import identity as ids
from agent.endpoint import EndpointRecord
from agent.errors import UserError
from agent.policy.trace import Decider, Side, resolve_address, trace
from agent.policy.types import BY_ADDRESS, EGRESS, Action, Enforcement, PolicyEntry, PolicyKey, RuleInfo

BLOCK = ids.CIDR_BASE + 4
IPCACHE = {"10.0.0.0/8": BLOCK, "10.200.0.5/32": 1001}


def record(name: str, ip: str, identity: int, ep_id: int = 3) -> EndpointRecord:
    return EndpointRecord(name=name, node="n1", namespace="default", serviceaccount="default", labels={"app": name},
                          ip=ip, ep_id=ep_id, identity=identity, netns=f"/run/netns/{name}", netns_owned=True,
                          ifname="lxc", peer_ifname="eth0", cgroup="")


CLIENT = record("client", "10.200.0.4", 1000)
WEB = record("web", "10.200.0.5", 1001, ep_id=4)


def test_a_side_by_address_is_its_endpoint_else_what_the_ipcache_says():
    assert resolve_address("10.200.0.5", [CLIENT, WEB], IPCACHE, "--to-ip") == Side(WEB, 1001, "10.200.0.5")
    assert resolve_address(" 10.9.9.9", [CLIENT, WEB], IPCACHE, "--to-ip") == Side(None, BLOCK, "10.9.9.9")
    assert resolve_address("192.0.2.1", [CLIENT, WEB], IPCACHE, "--to-ip") == Side(None, ids.WORLD, "192.0.2.1")
    with pytest.raises(UserError, match=r"^--to-ip: '10.0.0.256' is not an IPv4 address$"):
        resolve_address("10.0.0.256", [CLIENT], IPCACHE, "--to-ip")


def test_the_step_an_ipblock_allowed_by_address_names_its_prefix():
    rule = RuleInfo(77, "default/out", "NetworkPolicy", "spec.egress[0].to[0].ipBlock", "allow")
    decider = Decider(
        policy={PolicyKey(CLIENT.ep_id, EGRESS, BY_ADDRESS | BLOCK, 0): PolicyEntry(Action.ALLOW, False, 77)},
        enforcement={(CLIENT.ep_id, EGRESS): Enforcement(True, rule_id=5)}, rules={77: rule},
        source="kernel of node n1", ipblock_cidrs={"10.0.0.0/8": BLOCK})
    out = trace(Side(CLIENT, 1000, CLIENT.ip), Side(WEB, 1001, WEB.ip), 6, 80, {("n1", "client"): decider})
    (step,) = out["steps"]
    assert out["verdict"] == "ALLOWED" and step["rule_id"] == 77
    assert step["by_address"] == {"address": "10.200.0.5", "prefix": "10.0.0.0/8"}
    # The same destination known only by its identity (no address): no ipBlock can match it.
    out = trace(Side(CLIENT, 1000, CLIENT.ip), Side(None, 1001), 6, 80, {("n1", "client"): decider})
    assert out["verdict"] == "DENIED" and "by_address" not in out["steps"][0]
